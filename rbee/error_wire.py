"""How an rbee error travels: a ``google.rpc.Status`` with the standard details.

    Status.code     the gRPC status code of the error's code (rbee/errors.py, CODES)
    Status.message  the human message
    ErrorInfo       reason = the stable code, domain = "rbee", metadata = the details
    Help            one Link per suggestion: description = the suggestion's text; url =
                    the first http(s) URL in it, else the first docs/NAME.md path (relative
                    to the rbee repository), else empty
    BadRequest      only for codes of INVALID_ARGUMENT whose details name what was wrong
                    (details "field", "parameter", "option", "setting" or, for a config
                    file, "key"): one FieldViolation, field = that name, description = the message

A client in any language reads these with the standard google.rpc types; nothing of
rbee.v1 is needed to read an error (docs/architecture.md, "Errors"). Decoding reads
ErrorInfo (domain "rbee"), the message and Help back; BadRequest repeats the details.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import NamedTuple

from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2

DOMAIN = "rbee"

# Detail keys that name the offending input, in order of preference.
FIELD_KEYS = ("field", "parameter", "option", "setting", "key")

# What a status may take in trailers (bytes; see bound()). Peers cap a header list at
# 8 KiB (grpc's default), and grpc's own headers share it.
TRAILER_BUDGET = 6000

_URL = re.compile(r"https?://[^\s'\"<>)]+")
_DOCS = re.compile(r"(?<![\w/])docs/[\w./-]+\.md(?:#[\w-]+)?")


class Parts(NamedTuple):
    """An error as its four parts (what RbeeError holds)."""

    code: str
    message: str
    details: dict[str, str]
    suggestions: list[str]


def link_url(suggestion: str) -> str:
    """The URL a suggestion's Help link carries: a web address in it, else a docs path, else ''."""
    if found := _URL.search(suggestion):
        return found.group(0).rstrip(".,;:")
    if found := _DOCS.search(suggestion):
        return found.group(0).rstrip(".")
    return ""


def violated_field(details: Mapping[str, str]) -> str | None:
    return next((details[k] for k in FIELD_KEYS if details.get(k)), None)


def _pack(message: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def encode(parts: Parts, grpc_code: int, invalid_argument: bool) -> status_pb2.Status:
    """The google.rpc.Status of an error (``invalid_argument``: its code maps to INVALID_ARGUMENT)."""
    details = [_pack(error_details_pb2.ErrorInfo(reason=parts.code, domain=DOMAIN, metadata=parts.details))]
    if parts.suggestions:
        links = [error_details_pb2.Help.Link(description=s, url=link_url(s)) for s in parts.suggestions]
        details.append(_pack(error_details_pb2.Help(links=links)))
    if invalid_argument and (field := violated_field(parts.details)) is not None:
        violation = error_details_pb2.BadRequest.FieldViolation(field=field, description=parts.message)
        details.append(_pack(error_details_pb2.BadRequest(field_violations=[violation])))
    return status_pb2.Status(code=grpc_code, message=parts.message, details=details)


def decode(status: status_pb2.Status) -> Parts | None:
    """The error an rbee status carries; None when it holds no ErrorInfo of domain "rbee"."""
    info: error_details_pb2.ErrorInfo | None = None
    suggestions: list[str] = []
    for packed in status.details:
        if info is None and packed.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            candidate = error_details_pb2.ErrorInfo()
            packed.Unpack(candidate)
            if candidate.domain == DOMAIN and candidate.reason:
                info = candidate
        elif packed.Is(error_details_pb2.Help.DESCRIPTOR):
            help_ = error_details_pb2.Help()
            packed.Unpack(help_)
            suggestions.extend(link.description for link in help_.links)
    if info is None:
        return None
    return Parts(info.reason, status.message, dict(info.metadata), suggestions)


def _escaped_size(text: str) -> int:
    # grpc-message is percent-encoded: a byte outside printable ASCII (and '%') takes three.
    return sum(1 if 0x20 <= b < 0x7F and b != 0x25 else 3 for b in text.encode())


def trailer_size(status: status_pb2.Status) -> int:
    """Bytes the status takes in trailers: grpc-message, and grpc-status-details-bin (base64)."""
    return _escaped_size(status.message) + 4 * -(-status.ByteSize() // 3)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


# Ever tighter cuts (characters of each text, details kept, suggestions kept) until it fits.
_CUTS = ((2048, 16, 8), (512, 16, 8), (128, 16, 8), (64, 8, 4), (32, 4, 2))


def bound(parts: Parts, grpc_code: int, invalid_argument: bool) -> tuple[Parts, status_pb2.Status]:
    """The error cut to what fits in a status, and that status. A status travels in HTTP/2
    trailers, which peers cap at a few KB: an error that echoes a 10 MB request field
    would reach the client as a bare RESOURCE_EXHAUSTED instead of itself. Ordinary
    errors (log lines included) are returned as they are (the same object)."""
    # Text longer than the budget cannot fit (every character takes a byte at least).
    chars = len(parts.message) + sum(len(k) + len(v) for k, v in parts.details.items()) + sum(map(len, parts.suggestions))
    if chars <= TRAILER_BUDGET:
        status = encode(parts, grpc_code, invalid_argument)
        if trailer_size(status) <= TRAILER_BUDGET:
            return parts, status
    for limit, n_details, n_suggestions in _CUTS:
        cut = Parts(
            parts.code,
            _clip(parts.message, limit),
            {_clip(k, 64): _clip(v, limit) for k, v in list(parts.details.items())[:n_details]},
            [_clip(s, limit) for s in parts.suggestions[:n_suggestions]],
        )
        status = encode(cut, grpc_code, invalid_argument)
        if trailer_size(status) <= TRAILER_BUDGET:
            break
    return cut, status
