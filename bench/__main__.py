"""`make bench`: every benchmark in one run, figures printed side by side.

  (a)+(c) bench.engine     worker vs in-process vLLM; 1 vs 16 concurrent streams
  (b)     bench.transport  the worker's stream ceiling with an engine that emits tokens as fast as it can
  (d)     bench.downloads  downloads through the hive vs plain hf_hub_download; resume after a cut
          bench.ssh_preflight  `setup add-node` and `setup check-node --ssh-only` against sshd on
                           127.0.0.1, split into keeper start-up, SSH connection setup, remote commands, our code
          bench.contract   worker vs in-process vLLM with logprobs, with a JSON schema, and 32 concurrent
                           streams: median ratios with bootstrap 95 % intervals over 30 alternating rounds
          bench.queen      warm start through the queen (keeper start-up, queen, worker TTFT) vs
                           straight to the worker; cold-start overhead on top of the engine start
          bench.keeper     the keeper's own cost: `rbee-keeper --version` and `infer --worker … -n 1`
                           against a bare gRPC client, whole processes, one loaded worker
          bench.engine_config  dtype × thread settings for the default model (TTFT, 1-stream and 32-stream
                           tokens/s) vs the worker with no flags, alternating rounds, bootstrap intervals
          bench.soak       64 concurrent streams for 60 s against one CPU worker with 8 slots
                           (`python -m bench.soak --minutes 10` for the issue's figure)
          bench.tls        mutual TLS vs plain: the stream ceiling (flood engine), and on two real workers
                           tokens/s, TTFT and a fresh channel's handshake over 20 alternating rounds
          bench.limits     hostile clients: daemon memory under 16 unauthenticated 60 MB calls (hive, queen,
                           worker); a worker's health while a 16 MB prompt is in flight

          bench.openai     the openai client against the queen's front door vs vLLM's own OpenAI server (added
                           TTFT, tokens/s ratios at 1 and 32 streams) and the proxy's ceiling (flood engine)

          bench.admission  a request that waits for a busy slot: the queen's admission queue vs the keeper's
                           old 1/2/4 s retry loop (slot freed → first token, ratio of medians; stand-in workers)

          bench.placement  the placement decision for 100 nodes and 1000 workers (p50, p99; goal p99 ≤ 1 ms)
          bench.spread     requests per replica over 2 and 4 stand-in replicas behind the front door, 64 clients
                           (max/min, goal ≤ 1.1)

Pick some with `make bench BENCH_ARGS="transport ssh_preflight"`.
"""

from __future__ import annotations

import importlib
import sys

ALL = ("transport", "downloads", "ssh_preflight", "queen", "keeper", "engine", "engine_config", "soak", "contract", "tls", "limits", "openai", "admission", "placement", "spread")


def main(argv: list[str]) -> int:
    chosen = [a for a in argv if not a.startswith("-")] or list(ALL)
    unknown = [c for c in chosen if c not in ALL]
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; choose from {', '.join(ALL)}", file=sys.stderr)
        return 1
    for name in chosen:
        print(f"\n=== bench.{name} ===", flush=True)
        module = importlib.import_module(f"bench.{name}")
        module.main([])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
