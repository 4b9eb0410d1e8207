"""queen-rbee: the orchestrator of rbee's nodes (registry, SSH, hives)."""

from __future__ import annotations

from pathlib import Path

import typer

from rbee.cli_common import make_app, run_app, run_daemon

ACTOR = "queen-rbee"

app = make_app(ACTOR, "The orchestrator: registers nodes, reaches them over SSH, installs rbee and starts their hives.")


@app.command()
def daemon(
    port: int = typer.Option(None, "--port", help="Port of the gRPC server (default 7800; RBEE_QUEEN_PORT)."),
    host: str = typer.Option(None, "--host", help="Address to bind (default 127.0.0.1; RBEE_QUEEN_HOST)."),
    api_key: str = typer.Option(
        None, "--api-key",
        help="Key clients must present (RBEE_QUEEN_API_KEY keeps it out of ps). Default: $RBEE_HOME/queen.key, "
        "created on first start (mode 600), where rbee-keeper on this machine finds it.",
    ),  # fmt: skip
    api_key_file: Path = typer.Option(
        None, "--api-key-file", help="Read the key from this file (mode 600; RBEE_QUEEN_API_KEY_FILE)."
    ),
    insecure: bool = typer.Option(
        None, "--insecure",
        help="With --host beyond loopback, serve plain gRPC instead of mutual TLS with a certificate of the "
        "queen's cluster CA: keys cross the network in clear (RBEE_QUEEN_INSECURE).",
    ),  # fmt: skip
    http_port: int = typer.Option(
        None, "--http-port",
        help="Port of the OpenAI-compatible HTTP API (default 8080; 0 = off; RBEE_QUEEN_HTTP_PORT).",
    ),  # fmt: skip
    http_host: str = typer.Option(None, "--http-host", help="Address of the HTTP API (default: --host; RBEE_QUEEN_HTTP_HOST)."),
    http_cert: Path = typer.Option(
        None, "--http-cert",
        help="Certificate (PEM) the HTTP API serves beyond loopback, one browsers trust (default: one of the "
        "cluster CA's; RBEE_QUEEN_HTTP_CERT). Needs --http-key.",
    ),  # fmt: skip
    http_key: Path = typer.Option(None, "--http-key", help="Private key (PEM) of --http-cert (RBEE_QUEEN_HTTP_KEY)."),
    http_cold_start_wait: str = typer.Option(
        None, "--http-cold-start-wait",
        help="How long an HTTP request waits for a model to load before 503 with Retry-After (default 300s; "
        "RBEE_QUEEN_HTTP_COLD_START_WAIT).",
    ),  # fmt: skip
    queue_length: int = typer.Option(
        None, "--queue-length",
        help="Requests that may wait for a slot when every worker of a model is busy, per model (default 64; "
        "0 = ALL_SLOTS_BUSY at once; RBEE_QUEEN_QUEUE_LENGTH).",
    ),  # fmt: skip
    queue_wait: str = typer.Option(
        None, "--queue-wait",
        help="How long a request waits in that queue before ALL_SLOTS_BUSY (default 60s; RBEE_QUEEN_QUEUE_WAIT).",
    ),  # fmt: skip
    keep_alive: str = typer.Option(
        None, "--keep-alive",
        help="How long an idle worker stays loaded when its request and model do not say: a duration (5m, 30s, "
        "1h30m) or seconds; 0 = stop it after each request; -1 = never (default 5m; RBEE_QUEEN_KEEP_ALIVE).",
    ),  # fmt: skip
    idle_sleep: bool = typer.Option(
        None, "--idle-sleep",
        help="Put an idle CUDA worker whose keep-alive ran out to sleep (vLLM's sleep mode: GPU memory freed, "
        "woken by its next request) rather than stop it; needs hives with RBEE_HIVE_WORKER_SLEEP_MODE=1 "
        "(RBEE_QUEEN_IDLE_SLEEP).",
    ),  # fmt: skip
    metrics_public: bool = typer.Option(
        None, "--metrics-public",
        help="Serve GET /metrics (Prometheus) without a key; by default it needs the queen's key or one from "
        "`rbee-keeper keys create --name NAME` (RBEE_QUEEN_METRICS_PUBLIC).",
    ),  # fmt: skip
) -> None:
    """Run the queen in the foreground until SIGTERM or Ctrl+C.

    On stop it shuts down the hives it started, and only those.

    Example: queen-rbee daemon --port 7800 --http-port 8080
    """
    from rbee_queen.server import serve
    from rbee_queen.settings import load_settings

    if api_key:
        from rbee.auth import argv_key_warning
        from rbee.narration import Narrator

        Narrator(ACTOR)("⚠️", argv_key_warning("RBEE_QUEEN_API_KEY", "--api-key-file or $RBEE_HOME/queen.key"), "warn")

    async def main() -> int:
        return await serve(load_settings(
            port=port, host=host, api_key=api_key, api_key_file=api_key_file, insecure=insecure,
            http_port=http_port, http_host=http_host, http_cert=http_cert, http_key=http_key,
            http_cold_start_wait=http_cold_start_wait, metrics_public=metrics_public, keep_alive=keep_alive,
            queue_length=queue_length, queue_wait=queue_wait, idle_sleep=idle_sleep,
        ))  # fmt: skip

    run_daemon(ACTOR, main)


def main() -> None:
    run_app(app, ACTOR)


if __name__ == "__main__":
    main()
