"""Backends at the contract: the one place their names meet the proto enum.

Inside the programs a backend is its lowercase name ("cpu", "cuda", "metal"):
catalogs, settings, CLI options and narration keep it so. The gRPC contracts
carry the ``rbee.v1.Backend`` enum instead (docs/architecture.md, "Contracts");
every message field that holds a backend is built with :func:`backend_enum`
and read with :func:`backend_name`.
"""

from __future__ import annotations

from rbee.enum_words import EnumWords
from rbee.errors import RbeeError
from rbee.v1 import common_pb2

# The enum's values and their names; unlike the other enums' words, an unknown
# backend is refused both ways (below), never read as a default.
_WORDS = EnumWords(common_pb2.Backend, "BACKEND_", "")
# Every backend rbee knows, in the enum's order.
BACKENDS: tuple[str, ...] = _WORDS.words


def _invalid(shown: str, given: str | int) -> RbeeError:
    accepted = ", ".join(BACKENDS)
    return RbeeError(
        "INVALID_BACKEND",
        f"Unknown backend {shown}: choose one of {accepted}",
        {"backend": given, "accepted": accepted},
        ["Pass --backend cpu, --backend cuda or --backend metal"],
    )


def backend_enum(name: str | None) -> int:
    """``"cpu"`` -> ``BACKEND_CPU``; ``""`` or None -> ``BACKEND_UNSPECIFIED`` (not given).

    Case and surrounding spaces are forgiven; any other name raises
    INVALID_BACKEND with the accepted names.
    """
    text = (name or "").strip().lower()
    if not text:
        return common_pb2.BACKEND_UNSPECIFIED
    try:
        return _WORDS.number(text)
    except ValueError:
        raise _invalid(repr(str(name)[:40]), str(name)[:40]) from None


def backend_name(value: int) -> str:
    """``BACKEND_CPU`` -> ``"cpu"``; ``BACKEND_UNSPECIFIED`` -> ``""`` (not given).

    A number this program does not know (sent by a newer peer) raises
    INVALID_BACKEND, so a daemon answers it as bad input.
    """
    if value == common_pb2.BACKEND_UNSPECIFIED:
        return ""
    name = _WORDS.word(value)
    if not name:  # the default "" stands for a number this build does not know
        raise _invalid(f"number {int(value)} (sent by a newer rbee?)", int(value))
    return name
