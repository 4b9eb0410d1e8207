"""Checks on what the user typed, done before anything is sent (S10).

Numbers arrive as text so that a bad value gets the project's error format
and exit code 1 instead of the argument parser's usage error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from rbee.config import DEFAULT_HIVE_PORT, DEFAULT_QUEEN_PORT, DEFAULT_WORKER_PORT_START
from rbee.errors import RbeeError

BACKENDS = ("cpu", "cuda", "metal")
MAX_TEMPERATURE = 2.0
# The wire field is a signed 32-bit integer; the worker checks the model's own limit.
MAX_TOKENS_LIMIT = 2**31 - 1
# The examples in hints, and --hive's default: the daemons on this machine.
LOCAL_WORKER = f"127.0.0.1:{DEFAULT_WORKER_PORT_START}"
LOCAL_HIVE = f"127.0.0.1:{DEFAULT_HIVE_PORT}"
LOCAL_QUEEN = f"127.0.0.1:{DEFAULT_QUEEN_PORT}"


@dataclass(frozen=True)
class SamplingArgs:
    prompt: str
    max_tokens: int
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    raw_prompt: bool = False
    ignore_eos: bool = False


def invalid_argument(option: str, value: object, message: str, hint: str) -> RbeeError:
    return RbeeError(
        "INVALID_ARGUMENT",
        f"{option} {message} (got {value!r})",
        {"option": option, "value": value},
        [hint],
    )


def parse_int(option: str, text: str | int | None, hint: str) -> int | None:
    if text is None or isinstance(text, int):
        return text
    try:
        return int(text.strip())
    except ValueError:
        raise invalid_argument(option, text, "must be a whole number", hint) from None


def parse_float(option: str, text: str | float | None, hint: str) -> float | None:
    if text is None or isinstance(text, float):
        return text
    try:
        value = float(text.strip())
    except ValueError:
        raise invalid_argument(option, text, "must be a number", hint) from None
    if not math.isfinite(value):
        raise invalid_argument(option, text, "must be a finite number", hint)
    return value


def validate_sampling(
    prompt: str | None,
    max_tokens: str | int | None,
    temperature: str | float | None = None,
    top_p: str | float | None = None,
    top_k: str | int | None = None,
    seed: str | int | None = None,
    stop: tuple[str, ...] | list[str] = (),
    raw_prompt: bool = False,
    ignore_eos: bool = False,
) -> SamplingArgs:
    if prompt is None or not prompt.strip():
        raise RbeeError(
            "INVALID_ARGUMENT",
            "--prompt is required and must not be empty",
            {"option": "--prompt"},
            ['Pass the text to complete, e.g. --prompt "write a haiku about bees"'],
        )
    n = parse_int("--max-tokens", max_tokens, "Use --max-tokens N with N ≥ 1, e.g. --max-tokens 64")
    if n is None or n < 1 or n > MAX_TOKENS_LIMIT:
        raise invalid_argument("--max-tokens", max_tokens, "must be at least 1", "Use --max-tokens N with N ≥ 1, e.g. --max-tokens 64")
    temp_hint = f"Use a temperature between 0 (greedy) and {MAX_TEMPERATURE:g}, e.g. --temperature 0.7"
    t = parse_float("--temperature", temperature, temp_hint)
    if t is not None and not 0.0 <= t <= MAX_TEMPERATURE:
        raise invalid_argument("--temperature", temperature, f"must be between 0 and {MAX_TEMPERATURE:g}", temp_hint)
    p_hint = "Use a top-p above 0 and at most 1, e.g. --top-p 0.9"
    p = parse_float("--top-p", top_p, p_hint)
    if p is not None and not 0.0 < p <= 1.0:
        raise invalid_argument("--top-p", top_p, "must be above 0 and at most 1", p_hint)
    k_hint = "Use --top-k K with K ≥ 1, or leave it out to consider every token"
    k = parse_int("--top-k", top_k, k_hint)
    if k is not None and k < 1:
        raise invalid_argument("--top-k", top_k, "must be at least 1", k_hint)
    s_hint = "Use a seed between 0 and 2^63-1"
    s = parse_int("--seed", seed, s_hint)
    if s is not None and not 0 <= s < 2**63:
        raise invalid_argument("--seed", seed, "must be between 0 and 2^63-1", s_hint)
    return SamplingArgs(
        prompt=prompt,
        max_tokens=n,
        temperature=t,
        top_p=p,
        top_k=k,
        seed=s,
        stop=tuple(stop),
        raw_prompt=raw_prompt,
        ignore_eos=ignore_eos,
    )


def validate_address(address: str, option: str = "--worker", example: str = LOCAL_WORKER) -> str:
    """``host:port`` (``[v6]:port`` for IPv6) with a port in 1..65535, for the
    daemon given with ``option``."""
    hint = f"Give the {option.lstrip('-')} as HOST:PORT, e.g. {option} {example}"
    host, sep, port_text = address.strip().rpartition(":")
    if not sep or not host:
        raise invalid_argument(option, address, "must be HOST:PORT", hint)
    if host.startswith("[") != host.endswith("]") or (":" in host and not host.startswith("[")):
        raise invalid_argument(option, address, "must be HOST:PORT (IPv6 hosts in brackets)", hint)
    if any(c.isspace() for c in host):
        raise invalid_argument(option, address, "has a space in the host name", hint)
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise invalid_argument(option, address, "has no valid port (1-65535)", hint)
    return f"{host}:{int(port_text)}"


def validate_hive_address(address: str) -> str:
    return validate_address(address, "--hive", LOCAL_HIVE)


def validate_queen_address(address: str) -> str:
    return validate_address(address, "--queen", LOCAL_QUEEN)


def validate_backend(backend: str | None) -> str | None:
    if backend is None:
        return None
    name = backend.strip().lower()
    if name not in BACKENDS:
        raise RbeeError(
            "INVALID_BACKEND",
            f"Unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}",
            {"backend": backend, "accepted": ", ".join(BACKENDS)},
            ["Pass --backend cpu, --backend cuda or --backend metal"],
        )
    return name


def validate_device(device: str | int | None) -> int | None:
    hint = "Pass a device index ≥ 0, e.g. --device 0 (see `rbee-hive detect` for what a node has)"
    if device is None:
        return None
    try:
        value = int(device.strip()) if isinstance(device, str) else int(device)
    except ValueError:
        raise RbeeError("INVALID_DEVICE", f"Device must be a whole number (got {device!r})", {"device": device}, [hint]) from None
    if value < 0:
        raise RbeeError("INVALID_DEVICE", f"Device must be 0 or more (got {value})", {"device": value}, [hint])
    return value
