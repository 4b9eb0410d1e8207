"""Checks on what the user typed, done before anything is sent (S10).

Numbers arrive as text so that a bad value gets the project's error format
and exit code 1 instead of the argument parser's usage error.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from rbee.backends import BACKENDS
from rbee.bounds import CHAT_MESSAGES, STOP, STOP_BYTES, check_json_schema_text, check_stops
from rbee.config import DEFAULT_HIVE_PORT, DEFAULT_QUEEN_PORT, DEFAULT_WORKER_PORT_START
from rbee.errors import RbeeError

MAX_TEMPERATURE = 2.0
# The wire field is a signed 32-bit integer; the worker checks the model's own limit.
MAX_TOKENS_LIMIT = 2**31 - 1
# The worker's own limits (GetModelInfo.max_logprobs, max_n) are checked there.
MAX_LOGPROBS = 20
MAX_N = 256
CHAT_ROLES = ("system", "user", "assistant", "tool")
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
    # A conversation ((role, content), ...) instead of the prompt (--chat, --system).
    messages: tuple[tuple[str, str], ...] = ()
    json_schema: str | None = None
    logprobs: int | None = None
    n: int | None = None


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
    *,
    system: str | None = None,
    chat: str | None = None,
    json_schema: str | None = None,
    logprobs: str | int | None = None,
    n: str | int | None = None,
) -> SamplingArgs:
    n_option = n  # `n` below is the max-tokens figure
    messages = load_chat(chat) if chat is not None else []
    if raw_prompt and (messages or system is not None):
        raise RbeeError(
            "INVALID_ARGUMENT",
            "--raw-prompt sends text as-is and cannot be combined with --chat or --system",
            {"option": "--raw-prompt"},
            ["Leave out --raw-prompt, or send the text alone with --prompt"],
        )
    if system is not None and not system.strip():
        raise invalid_argument("--system", system, "must not be empty", 'Pass the instructions, e.g. --system "Answer in one sentence."')
    if messages or system is not None:
        # --prompt adds a user turn after the file's; --system goes first.
        turns = [("system", system)] if system is not None else []
        turns += messages
        if prompt is not None and prompt.strip():
            turns.append(("user", prompt))
        if not any(role == "user" for role, _ in turns):
            raise RbeeError(
                "INVALID_ARGUMENT",
                "The conversation (--chat, --system) has no user message",
                {"option": "--chat"},
                ['Add --prompt "your question", or a {"role": "user", ...} message to the --chat file'],
            )
        messages = turns
        prompt = prompt or ""
    elif prompt is None or not prompt.strip():
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
    lp_hint = f"Use --logprobs N with N from 0 to {MAX_LOGPROBS} (alternatives shown per token)"
    lp = parse_int("--logprobs", logprobs, lp_hint)
    if lp is not None and not 0 <= lp <= MAX_LOGPROBS:
        raise invalid_argument("--logprobs", logprobs, f"must be between 0 and {MAX_LOGPROBS}", lp_hint)
    n_hint = "Use --n COUNT with COUNT ≥ 1 (at most the worker's slots), and a temperature above 0"
    count = parse_int("--n", n_option, n_hint)
    if count is not None and not 1 <= count <= MAX_N:
        raise invalid_argument("--n", n_option, f"must be between 1 and {MAX_N}", n_hint)
    if count is not None and count > 1 and t == 0:
        raise invalid_argument("--n", n_option, "needs sampling: greedy decoding (--temperature 0) gives one answer", n_hint)
    # The worker's own bounds (rbee/bounds.py), checked before anything is sent.
    check_stops(tuple(stop), "--stop", f"Give at most {STOP.limit} --stop strings of at most {STOP_BYTES.limit} bytes each")
    return SamplingArgs(
        messages=tuple(messages),
        json_schema=load_json_schema(json_schema) if json_schema is not None else None,
        logprobs=lp,
        n=count,
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


def _read(option: str, source: str) -> str:
    """A file's text, or stdin's for "-"."""
    if source == "-":
        return sys.stdin.read()
    path = Path(source).expanduser()
    try:
        return path.read_text()
    except OSError as exc:
        raise RbeeError(
            "INVALID_ARGUMENT",
            f"{option}: cannot read {source}: {exc.strerror or exc}",
            {"option": option, "path": str(path)},
            [f"Check the path given to {option}" + (" (or pass - to read stdin)" if option == "--chat" else "")],
        ) from None


def load_chat(source: str) -> list[tuple[str, str]]:
    """--chat FILE|-: a JSON list of {"role", "content"} messages (or an
    object with such a "messages" list)."""
    hint = 'The --chat file holds JSON like [{"role": "user", "content": "Why do bees dance?"}]'
    text = _read("--chat", source)
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise RbeeError("INVALID_ARGUMENT", f"--chat {source} is not JSON: {exc}", {"option": "--chat"}, [hint]) from None
    if isinstance(data, dict):
        data = data.get("messages")
    if not isinstance(data, list) or not data:
        raise RbeeError("INVALID_ARGUMENT", f"--chat {source} holds no list of messages", {"option": "--chat"}, [hint])
    CHAT_MESSAGES.check(len(data), "--chat", f"Keep the conversation in {source} to at most {CHAT_MESSAGES.limit} messages")
    out = []
    for i, m in enumerate(data):
        ok = isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        if not ok or m["role"] not in CHAT_ROLES:
            raise RbeeError(
                "INVALID_ARGUMENT",
                f"--chat {source}: message {i} needs a role ({', '.join(CHAT_ROLES)}) and a text content",
                {"option": "--chat", "index": i},
                [hint],
            )
        out.append((m["role"], m["content"]))
    return out


def load_json_schema(path: str) -> str:
    """--json-schema FILE: the schema's text, checked to be a JSON object."""
    hint = 'The file holds a JSON Schema object, e.g. {"type": "object", "properties": {"name": {"type": "string"}}}'
    text = _read("--json-schema", path)
    # Size and depth first: json.loads recurses into whatever nesting it is given.
    check_json_schema_text(text, "--json-schema", hint)
    try:
        schema = json.loads(text)
    except ValueError as exc:
        raise RbeeError("INVALID_ARGUMENT", f"--json-schema {path} is not JSON: {exc}", {"option": "--json-schema"}, [hint]) from None
    if not isinstance(schema, dict):
        raise RbeeError("INVALID_ARGUMENT", f"--json-schema {path} must hold a JSON object", {"option": "--json-schema"}, [hint])
    return text


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
