"""Downloads through the hive vs plain ``hf_hub_download``, same file, same run.

A hub-like server on 127.0.0.1 serves one large LFS file. Each round fetches
it twice, in alternating order so machine noise hits both alike:

* through a real ``rbee-hive daemon`` (DownloadModel stream, from the request
  to the catalog entry: metadata, transfer, sha256 check, registration);
* with ``hf_hub_download`` in a fresh Python process, timing the call only.

Then the time to resume after a connection cut at 50 %: from the moment the
server cuts the connection to the moment the hive's ranged request for the
rest arrives (backoff of 100 ms ± 20 % included), and the whole download.

Run: .venv/bin/python -m bench.downloads [--size-mb 400] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rbee.v1 import provisioning_pb2, provisioning_pb2_grpc
from tests.fixtures.common import VENV_BIN
from tests.fixtures.hive import start_hive_process
from tests.hubserver import HubServer, write_blob

REPO = "bench/big"
FILE = "model.safetensors"

_PLAIN = """
import json, sys, time
from huggingface_hub import hf_hub_download
t = time.perf_counter()
path = hf_hub_download(sys.argv[1], sys.argv[2], cache_dir=sys.argv[3], endpoint=sys.argv[4])
print(json.dumps({"seconds": time.perf_counter() - t, "path": path}))
"""


def plain_download(hub: HubServer, cache: Path) -> float:
    done = subprocess.run(
        [str(VENV_BIN / "python"), "-c", _PLAIN, REPO, FILE, str(cache), hub.endpoint],
        capture_output=True, text=True, timeout=1800,
        env={"HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"hf_hub_download failed: {done.stderr[-2000:]}")
    return float(json.loads(done.stdout.strip().splitlines()[-1])["seconds"])


async def hive_download(stub: Any, md: Any, remove_after: bool = True) -> tuple[float, provisioning_pb2.ModelEntry]:
    started = time.perf_counter()
    entry = None
    async for msg in stub.DownloadModel(provisioning_pb2.DownloadModelRequest(model_ref=f"hf:{REPO}"), metadata=md, timeout=1800):
        if msg.HasField("model"):
            entry = msg.model
    seconds = time.perf_counter() - started
    if entry is None:
        raise RuntimeError("the hive ended the download without an entry")
    if remove_after:
        await stub.RemoveModel(provisioning_pb2.RemoveModelRequest(model_ref=f"hf:{REPO}"), metadata=md, timeout=60)
    return seconds, entry


async def run(size_mb: int, rounds: int, resumes: int) -> dict:
    size = size_mb * 1_000_000
    with tempfile.TemporaryDirectory(prefix="rbee-bench-dl-", dir=str(Path.home())) as tmp:
        work = Path(tmp)
        blob = write_blob(work / "blob.bin", size, seed=42)
        hub = HubServer(work / "hub").start()
        hive = None
        try:
            hub.add_repo(REPO, {FILE: blob})
            hive = await start_hive_process(work / "home", extra_env={"HF_ENDPOINT": hub.endpoint})
            stub = provisioning_pb2_grpc.ProvisioningServiceStub(hive._channel())
            plain_s: list[float] = []
            hive_s: list[float] = []
            for i in range(rounds):
                order = ("plain", "hive") if i % 2 == 0 else ("hive", "plain")
                for which in order:
                    if which == "plain":
                        plain_s.append(plain_download(hub, work / f"cache-{i}"))
                        subprocess.run(["rm", "-rf", str(work / f"cache-{i}")], check=True)
                    else:
                        seconds, _ = await hive_download(stub, hive.md)
                        hive_s.append(seconds)
            resume_ms: list[float] = []
            resume_total_s: list[float] = []
            for _ in range(resumes):
                before = len(hub.records)
                hub.cut_at(REPO, FILE, size // 2)
                seconds, _ = await hive_download(stub, hive.md)
                cut_t = [t for kind, name, _off, t in hub.events if kind == "cut"][-1]
                resumed = [r for r in hub.records[before:] if r.role == "cdn" and r.range]
                resume_ms.append((resumed[0].t - cut_t) * 1000)
                resume_total_s.append(seconds)
        finally:
            if hive is not None:
                await hive.close()
            hub.stop()
    plain_mbs = [size / s / 1e6 for s in plain_s]
    hive_mbs = [size / s / 1e6 for s in hive_s]
    return {
        "file_mb": size_mb,
        "rounds": rounds,
        "plain_hf_hub_download_mb_s": round(statistics.median(plain_mbs), 1),
        "through_hive_mb_s": round(statistics.median(hive_mbs), 1),
        "ratio_hive_to_plain": round(statistics.median(hive_mbs) / statistics.median(plain_mbs), 3),
        "per_round_ratio": [round(h / p, 3) for h, p in zip(hive_mbs, plain_mbs)],
        "plain_mb_s_all": [round(x, 1) for x in plain_mbs],
        "hive_mb_s_all": [round(x, 1) for x in hive_mbs],
        "resume_after_cut_at_50pct_ms": round(statistics.median(resume_ms), 1),
        "resume_ms_all": [round(x, 1) for x in resume_ms],
        "download_with_cut_s": round(statistics.median(resume_total_s), 2),
    }


def bench_downloads(size_mb: int = 400, rounds: int = 5, resumes: int = 3) -> dict:
    return asyncio.run(run(size_mb, rounds, resumes))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench.downloads", description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--resumes", type=int, default=3)
    args = parser.parse_args(argv)
    result = bench_downloads(args.size_mb, args.rounds, args.resumes)
    print(f"file: {result['file_mb']} MB, {result['rounds']} rounds (alternating order), median figures")
    print(f"  plain hf_hub_download : {result['plain_hf_hub_download_mb_s']:8.1f} MB/s   {result['plain_mb_s_all']}")
    print(f"  through rbee-hive     : {result['through_hive_mb_s']:8.1f} MB/s   {result['hive_mb_s_all']}")
    print(f"  ratio hive/plain      : {result['ratio_hive_to_plain']:8.3f}        per round {result['per_round_ratio']}")
    print(f"  resume after a cut at 50%: {result['resume_after_cut_at_50pct_ms']:.0f} ms from the cut to the ranged request "
          f"{result['resume_ms_all']}; whole download {result['download_with_cut_s']} s")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
