"""llm-worker-rbee's command line: its flags, their checks and the
``Settings`` they give (``settings_from`` names the flag that is wrong); the
program's name, exit codes and the environment variables its keys come in.
``program.py`` runs the worker from these settings.
"""

from __future__ import annotations

import argparse
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from rbee.config import MAX_SLOTS
from rbee.errors import RbeeError

if TYPE_CHECKING:
    from rbee.tls import TlsIdentity

ACTOR = "llm-worker-rbee"
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_PORT_IN_USE = 3
ENV_API_KEY = "RBEE_WORKER_API_KEY"
ENV_CALLBACK_KEY = "RBEE_CALLBACK_API_KEY"
# The key that opens Shutdown (S13 admin scope); the hive sets it at spawn.
ENV_ADMIN_KEY = "RBEE_WORKER_ADMIN_KEY"

# vLLM batches concurrent requests. On CPU each extra sequence slows every
# other one (2 cores: 16 concurrent prompts share ~50-100 tokens/s), so a few
# slots keep streams usable; a GPU has the headroom for many more.
DEFAULT_SLOTS = {"cpu": 8, "cuda": 32}
# How often the engine's processes are checked once the model is loaded: an
# engine that died (e.g. its process was OOM-killed) turns the worker FAILED.
ENGINE_CHECK_INTERVAL_S = 10.0
# How long in-flight requests may finish once a shutdown starts (SIGTERM, or a
# Shutdown request that names no drain timeout).
DEFAULT_DRAIN_TIMEOUT_S = 30.0


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # bad flags: our format, exit 1 (not argparse's 2)
        print(f"[{ACTOR}] ❌ INVALID_ARGUMENT: {message}", flush=True)
        print(f"    → run `{self.prog} --help` for the flags", flush=True)
        sys.exit(EXIT_ERROR)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="llm-worker-rbee", description="Serve one model with vLLM over rbee's InferenceService.")
    p.add_argument("--version", action="store_true", help="print the worker and engine versions and exit")
    p.add_argument("--model", help="model folder (a Hugging Face layout vLLM can load)")
    p.add_argument("--backend", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--device", type=int, default=0, help="GPU index for cuda (0 for cpu)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, help="port to listen on")
    p.add_argument("--api-key", help=f"key clients must present (or set {ENV_API_KEY}; keeps it out of ps)")
    p.add_argument("--api-key-file", help="read the key from this file (mode 600; RBEE_WORKER_API_KEY_FILE)")
    p.add_argument("--callback", metavar="HOST:PORT", help="the hive's WorkerCallbackService")
    p.add_argument("--tls-cert", metavar="FILE", help="serve mutual TLS with this certificate chain (PEM); the hive issues one per worker")
    p.add_argument("--tls-key", metavar="FILE", help="the certificate's private key (PEM, mode 600)")
    p.add_argument("--tls-ca", metavar="FILE", help="the cluster CA that clients' and the hive's certificates must chain to")
    p.add_argument("--insecure", action="store_true", help="allow listening beyond loopback without TLS (keys cross the network in clear)")
    p.add_argument("--worker-id", help="default: generated")
    p.add_argument("--model-ref", help="what the hive calls the model (default: the path)")
    p.add_argument("--slots", type=int, help=f"concurrent requests, 1 to {MAX_SLOTS} (default 8 on cpu, 32 on cuda)")
    p.add_argument("--max-model-len", type=int, default=2048, help="context cap (default min(model's, 2048))")
    p.add_argument(
        "--dtype", default="auto",
        help="auto (default: chosen from the hardware, docs/hive.md), float32, bfloat16 or float16",
    )  # fmt: skip
    p.add_argument(
        "--engine-check-interval", type=float, default=ENGINE_CHECK_INTERVAL_S, metavar="S",
        help=f"seconds between engine liveness checks (default {ENGINE_CHECK_INTERVAL_S:g})",
    )
    return p


@dataclass(frozen=True)
class Settings:
    model_path: str
    backend: str
    device: int
    host: str
    port: int
    api_key: str
    callback: str | None
    callback_key: str
    worker_id: str
    model_ref: str
    slots: int
    max_model_len: int
    dtype: str
    engine_check_interval_s: float = ENGINE_CHECK_INTERVAL_S
    # Empty: the inference key opens Shutdown too (a worker started by hand).
    admin_key: str = ""
    # Mutual TLS (S13): certificate chain, key and cluster CA files; empty = plain.
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""
    insecure: bool = False


def settings_from(args: argparse.Namespace, env: dict[str, str]) -> Settings:
    """Check the flags; RbeeError names the one that is wrong."""

    def bad(flag: str, message: str, suggestion: str) -> RbeeError:
        return RbeeError("INVALID_ARGUMENT", f"{flag}: {message}", {"flag": flag}, [suggestion])

    if not args.model:
        raise bad("--model", "is required", "Pass --model PATH to a model folder")
    model = Path(args.model).expanduser()
    if not model.exists():
        raise RbeeError(
            "MODEL_NOT_FOUND",
            f"Model path not found: {model}",
            {"model_path": str(model)},
            ["Check the path, or download the model with `rbee-keeper models download MODEL --node NODE`"],
        )
    if args.port is None:
        raise bad("--port", "is required", "Pass --port P (the hive picks one from 7910 upward)")
    if not 0 <= args.port <= 65535:
        raise bad("--port", f"{args.port} is not a TCP port", "Use a port between 1 and 65535")
    api_key = args.api_key or env.get(ENV_API_KEY, "")
    key_file = args.api_key_file or env.get("RBEE_WORKER_API_KEY_FILE")
    if not api_key and key_file:
        from rbee.auth import read_key_file

        api_key = read_key_file(Path(key_file), "--api-key-file")
    if not api_key:
        raise bad("--api-key", f"no API key given (flag or {ENV_API_KEY})", f"Set {ENV_API_KEY} or pass --api-key")
    slots = args.slots if args.slots is not None else DEFAULT_SLOTS[args.backend]
    if not 1 <= slots <= MAX_SLOTS:
        raise bad("--slots", f"must be between 1 and {MAX_SLOTS} (got {slots})", f"Use --slots 1 to {MAX_SLOTS}")
    if args.max_model_len < 1:
        raise bad("--max-model-len", f"must be at least 1 (got {args.max_model_len})", "Use a positive length")
    if not args.engine_check_interval > 0:
        raise bad("--engine-check-interval", "must be more than 0", "Use e.g. --engine-check-interval 10")
    from rbee.dtype import normalize as normalize_dtype

    try:
        normalize_dtype(args.dtype)
    except RbeeError as err:
        raise bad("--dtype", err.message, err.suggestions[0]) from None
    if args.device < 0:
        raise bad("--device", f"must be 0 or more (got {args.device})", "Use --device 0")
    return Settings(
        model_path=str(model.resolve()),
        backend=args.backend,
        device=args.device,
        host=args.host,
        port=args.port,
        api_key=api_key,
        callback=args.callback,
        callback_key=env.get(ENV_CALLBACK_KEY) or api_key,
        worker_id=args.worker_id or f"worker-{uuid.uuid4().hex[:8]}",
        model_ref=args.model_ref or args.model,
        slots=slots,
        max_model_len=args.max_model_len,
        dtype=normalize_dtype(args.dtype),
        engine_check_interval_s=args.engine_check_interval,
        admin_key=env.get(ENV_ADMIN_KEY, ""),
        tls_cert=args.tls_cert or "",
        tls_key=args.tls_key or "",
        tls_ca=args.tls_ca or "",
        insecure=args.insecure,
    )


def worker_tls(s: Settings) -> "TlsIdentity | None":
    """The worker's TLS identity from its flags, or None (plain)."""
    from rbee.tls import TlsIdentity

    if not (s.tls_cert or s.tls_key or s.tls_ca):
        return None
    if not s.tls_ca:
        raise RbeeError("TLS_FILE_INVALID", "--tls-ca is needed with --tls-cert: clients are checked against it",
                        {"flag": "--tls-ca"}, ["Pass --tls-ca FILE (the cluster CA certificate)"])  # fmt: skip
    return TlsIdentity.load(Path(s.tls_cert) if s.tls_cert else None, Path(s.tls_key) if s.tls_key else None, Path(s.tls_ca))
