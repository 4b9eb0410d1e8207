"""The real llm-worker-rbee program (flags, server, signals, callback, exit
codes) with a FakeEngine instead of vLLM, for fast process-level tests.

Run: python -m tests.unit.worker.fake_worker_main <worker flags>
FAKE_ENGINE_MODE (fast|slow|gated|hang), FAKE_ENGINE_DELAY (s, slow mode),
FAKE_ENGINE_LOAD_ERROR (message: loading fails with it),
FAKE_ENGINE_DIE_AFTER (requests: health checks fail after that many),
FAKE_ENGINE_DEATH (a code, e.g. ENGINE_OOM_KILLED: with FAKE_ENGINE_DIE_AFTER,
the engine's processes "die" with it after that many requests, as VllmEngine reports),
FAKE_ENGINE_HOLD_LOAD=1 (loading never finishes).
FAKE_WORKER_PROBE (paths joined by "|", "{ppid}" for the hive's pid): before
anything else, the worker tries to read each and prints "probe PATH: read"
(with "marker found" when FAKE_WORKER_PROBE_MARKER, in hex, is in it) or "probe PATH:
denied ERRNO": what code in a worker can reach of its hive.
"""

from __future__ import annotations

import os
import sys

from rbee.errors import RbeeError
from rbee_worker.server import Settings, main
from tests.unit.worker.fakes import FakeEngine


def fake_engine(settings: Settings) -> FakeEngine:
    error = os.environ.get("FAKE_ENGINE_LOAD_ERROR")
    die_after = os.environ.get("FAKE_ENGINE_DIE_AFTER")
    death = os.environ.get("FAKE_ENGINE_DEATH")
    return FakeEngine(
        mode=os.environ.get("FAKE_ENGINE_MODE", "fast"),
        delay=float(os.environ.get("FAKE_ENGINE_DELAY", "0.01")),
        max_model_len=settings.max_model_len,
        load_error=RbeeError("MODEL_LOAD_FAILED", error, {"model_path": settings.model_path}) if error else None,
        die_after_requests=int(die_after) if die_after else None,
        death=RbeeError(death, f"fake engine process {death}", {"pid": "4242"}, ["Give the worker fewer slots"]) if death else None,
        hold_load=os.environ.get("FAKE_ENGINE_HOLD_LOAD") == "1",
    )


def probe() -> None:
    import errno

    marker = bytes.fromhex(os.environ.get("FAKE_WORKER_PROBE_MARKER", ""))
    for path in filter(None, os.environ.get("FAKE_WORKER_PROBE", "").split("|")):
        path = path.replace("{ppid}", str(os.getppid()))
        try:
            with open(path, "rb") as fh:
                data = fh.read(1 << 20)
        except OSError as exc:
            print(f"probe {path}: denied {errno.errorcode.get(exc.errno or 0, exc.errno)}", flush=True)
            continue
        found = " marker found" if marker and marker in data else ""
        print(f"probe {path}: read{found}", flush=True)
    names = [n for n in ("HF_TOKEN", "RBEE_HIVE_API_KEY") if n in os.environ]
    print(f"probe environment: {', '.join(names) or 'no secrets'}", flush=True)


if __name__ == "__main__":
    probe()
    sys.exit(main(sys.argv[1:], engine_factory=fake_engine))
