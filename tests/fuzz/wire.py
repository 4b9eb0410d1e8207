"""Hostile requests for any rbee RPC, built from the generated descriptors:
messages with boundary and malformed values (a 10 MB string, NUL, path-like
and reference-like text, negative and huge numbers, 2^32-1 device numbers,
unknown enum values, NaN), and raw bytes no client would send (invalid UTF-8
in a string field, wrong wire types, truncations, absurd lengths, nesting past
the parser's limit). Calls go through a generic channel with identity
serializers, so the bytes arrive as built; every answer is then checked to be
either a success or a typed rbee error (a google.rpc.ErrorInfo of domain
"rbee" in the status)."""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import descriptor as d
from google.protobuf import message_factory
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from hypothesis import strategies as st

import rbee.v1
from rbee.auth import auth_metadata
from rbee.errors import from_rpc_error

BIG = "x" * (10 * 1024 * 1024)
# What rbee's own clients allow (rbee/channel.py), and a 10 MB request out.
CLIENT_OPTIONS = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
SPECIAL_TEXT = [
    "", " ", "\x00", "a\x00b", "\x00" * 64, "..", "../../../../../../etc/passwd", "/", "/proc/self/environ",
    "/dev/zero", "~", "~root/.ssh/id_rsa", "C:\\Windows", "file:///", "file:///etc", "file://../../x",
    "file:///proc/1/cwd", "hf:", "hf:../../x", "hf:ORG/REPO", "hf:a/b/../../c", "hf:a/b@..", "hf:a/b/%2e%2e",
    "cpu", "CPU ", "cuda", "metal", "tpu", "worker-00000000", "rbee-hive", "*", "%s%n%x", "{0}", "$(id)",
    "`id`", "; rm -rf /", "\u202eevil", "\ud7ff", "\uffff", "💥" * 200, "A" * 5000, "\n" * 1000, "-1", "1e309",
]
INT_EDGES = {
    d.FieldDescriptor.TYPE_INT32: [-(2**31), -1, 0, 1, 2**31 - 1],
    d.FieldDescriptor.TYPE_SINT32: [-(2**31), -1, 0, 2**31 - 1],
    d.FieldDescriptor.TYPE_SFIXED32: [-(2**31), -1, 0, 2**31 - 1],
    d.FieldDescriptor.TYPE_UINT32: [0, 1, 256, 257, 65535, 65536, 2**31 - 1, 2**31, 2**32 - 1],
    d.FieldDescriptor.TYPE_FIXED32: [0, 2**32 - 1],
    d.FieldDescriptor.TYPE_INT64: [-(2**63), -1, 0, 2**53 + 1, 2**63 - 1],
    d.FieldDescriptor.TYPE_SINT64: [-(2**63), -1, 0, 2**63 - 1],
    d.FieldDescriptor.TYPE_SFIXED64: [-(2**63), 0, 2**63 - 1],
    d.FieldDescriptor.TYPE_UINT64: [0, 2**32, 2**63, 2**64 - 1],
    d.FieldDescriptor.TYPE_FIXED64: [0, 2**64 - 1],
}
INT_RANGES = {
    d.FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    d.FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    d.FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    d.FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    d.FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    d.FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    d.FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    d.FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    d.FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    d.FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}


def all_methods() -> dict[str, d.MethodDescriptor]:
    found = {}
    for info in pkgutil.iter_modules(rbee.v1.__path__):
        if info.name.endswith("_pb2"):
            module = importlib.import_module(f"rbee.v1.{info.name}")
            for service in module.DESCRIPTOR.services_by_name.values():
                for method in service.methods:
                    found[f"/{service.full_name}/{method.name}"] = method
    return found


def text(big: bool = True) -> st.SearchStrategy[str]:
    choices = [st.text(max_size=40), st.sampled_from(SPECIAL_TEXT)]
    if big:
        # Rare: 10 MB per example is what a hostile client sends, not the common case.
        choices.append(st.just(BIG).filter(lambda _s: True))
    return st.one_of(*choices)


def scalar(field: d.FieldDescriptor, big: bool) -> st.SearchStrategy[Any]:
    t = field.type
    if t == d.FieldDescriptor.TYPE_STRING:
        return text(big)
    if t == d.FieldDescriptor.TYPE_BYTES:
        return st.one_of(st.binary(max_size=64), st.just(b"\x00" * 1024))
    if t == d.FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t == d.FieldDescriptor.TYPE_FLOAT:
        return st.one_of(st.floats(width=32), st.sampled_from([0.0, -0.0, -1.0, 1e-45, 3.4e38]))
    if t == d.FieldDescriptor.TYPE_DOUBLE:
        return st.one_of(st.floats(), st.sampled_from([0.0, -1.0, 1e308, float("nan"), float("inf")]))
    if t == d.FieldDescriptor.TYPE_ENUM:
        known = [v.number for v in field.enum_type.values]
        return st.one_of(st.sampled_from(known), st.sampled_from([-1, 99, 2**31 - 1, -(2**31)]))
    lo, hi = INT_RANGES[t]
    return st.one_of(st.integers(lo, hi), st.sampled_from(INT_EDGES[t]), st.integers(-3, 300).filter(lambda v: lo <= v <= hi))


@st.composite
def message(draw: st.DrawFn, desc: d.Descriptor, depth: int = 0, big: bool = True) -> Any:
    cls = message_factory.GetMessageClass(desc)
    msg = cls()
    for field in desc.fields:
        if not draw(st.booleans()):
            continue  # unset: the default, or absent for presence fields
        repeated = field.is_repeated
        if field.type == d.FieldDescriptor.TYPE_MESSAGE:
            if field.message_type.GetOptions().map_entry:
                key_f, value_f = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
                if value_f.type == d.FieldDescriptor.TYPE_MESSAGE:
                    continue
                entries = draw(st.dictionaries(scalar(key_f, False), scalar(value_f, False), max_size=3))
                getattr(msg, field.name).update(entries)
                continue
            if depth >= 2:
                continue
            if repeated:
                for item in draw(st.lists(message(field.message_type, depth + 1, False), max_size=3)):
                    getattr(msg, field.name).add().CopyFrom(item)
            else:
                getattr(msg, field.name).CopyFrom(draw(message(field.message_type, depth + 1, big)))
            continue
        if repeated:
            getattr(msg, field.name).extend(draw(st.lists(scalar(field, False), max_size=4)))
        else:
            setattr(msg, field.name, draw(scalar(field, big and depth == 0)))
    return msg


EDGE_TEXT = [BIG, "\x00", "../../../../../../etc/passwd", "/", "file:///", "hf:../../x", "~root", "💥" * 200]


def edge_messages(desc: d.Descriptor) -> list[Any]:
    """Deterministic extremes for every field of ``desc`` at once: each string
    one of EDGE_TEXT, each number its lowest then its highest value, each enum
    an unknown value; nested messages the same (one level)."""
    cls = message_factory.GetMessageClass(desc)
    out = [cls()]
    for i, text_value in enumerate(EDGE_TEXT):
        if text_value is BIG:
            # One 10 MB field per request, each string field in turn (a request
            # with all of them at once would pass the 64 MB message limit).
            strings = [f.name for f in desc.fields if f.type == d.FieldDescriptor.TYPE_STRING and not f.is_repeated]
            for name in strings or [""]:
                msg = cls()
                _fill_edges(msg, desc, "big", high=False, depth=0)
                if name:
                    setattr(msg, name, BIG)
                out.append(msg)
            continue
        msg = cls()
        _fill_edges(msg, desc, text_value, high=i % 2 == 1, depth=0)
        out.append(msg)
    return out


def _fill_edges(msg: Any, desc: d.Descriptor, text_value: str, high: bool, depth: int) -> None:
    for field in desc.fields:
        t = field.type
        if t == d.FieldDescriptor.TYPE_MESSAGE:
            if field.message_type.GetOptions().map_entry:
                value_f = field.message_type.fields_by_name["value"]
                if value_f.type == d.FieldDescriptor.TYPE_STRING:
                    getattr(msg, field.name)[text_value[:1000]] = text_value
                continue
            if depth == 0:
                child = getattr(msg, field.name).add() if field.is_repeated else getattr(msg, field.name)
                _fill_edges(child, field.message_type, text_value, high, depth + 1)
                if not field.is_repeated:
                    child.SetInParent()
            continue
        if t == d.FieldDescriptor.TYPE_STRING:
            value: Any = text_value
        elif t == d.FieldDescriptor.TYPE_BYTES:
            value = text_value.encode()
        elif t == d.FieldDescriptor.TYPE_BOOL:
            value = high
        elif t in (d.FieldDescriptor.TYPE_FLOAT, d.FieldDescriptor.TYPE_DOUBLE):
            value = float("nan") if high else -1.0
        elif t == d.FieldDescriptor.TYPE_ENUM:
            value = 99 if high else -1
        else:
            lo, hi = INT_RANGES[t]
            value = hi if high else lo
        if field.is_repeated:
            getattr(msg, field.name).extend([value] * (3 if t != d.FieldDescriptor.TYPE_STRING else 1))
        else:
            setattr(msg, field.name, value)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


@st.composite
def raw_payload(draw: st.DrawFn, desc: d.Descriptor) -> bytes:
    """Bytes no generated client sends, aimed at ``desc``'s fields."""
    numbers = [f.number for f in desc.fields] or [1]
    strings = [f.number for f in desc.fields if f.type == d.FieldDescriptor.TYPE_STRING]
    number = draw(st.sampled_from(numbers))
    kind = draw(st.sampled_from(["random", "wrong_type", "bad_utf8", "truncated", "huge_length", "nested", "unknown_field"]))
    if kind == "random":
        return draw(st.binary(max_size=128))
    if kind == "wrong_type":
        wire = draw(st.sampled_from([0, 1, 2, 5, 3, 4, 6, 7]))
        body = {0: _varint(2**64 - 1), 1: b"\xff" * 8, 2: _varint(3) + b"abc", 5: b"\xff" * 4}.get(wire, b"")
        return _varint(number << 3 | wire) + body
    if kind == "bad_utf8":
        value = draw(st.sampled_from([b"\xff\xfe", b"\xc0\x80", b"\xed\xa0\x80", b"abc\x80", b"\xf4\x90\x80\x80"]))
        target = draw(st.sampled_from(strings)) if strings else number
        return _varint(target << 3 | 2) + _varint(len(value)) + value
    if kind == "truncated":
        return _varint(number << 3 | 2) + _varint(100) + b"short"
    if kind == "huge_length":
        return _varint(number << 3 | 2) + _varint(2**31 - 1)
    if kind == "nested":
        depth = draw(st.integers(50, 300))
        inner = b""
        for _ in range(depth):
            inner = _varint(number << 3 | 2) + _varint(len(inner)) + inner
        return inner
    return _varint(draw(st.integers(1000, 2**29 - 1)) << 3 | 0) + _varint(1)


class Request(tuple):
    """(method, payload) with a short repr: a failing example names the method,
    the size and the start of the bytes instead of printing 10 MB."""

    def __new__(cls, method: str, payload: bytes) -> "Request":
        return super().__new__(cls, (method, payload))

    def __repr__(self) -> str:
        method, payload = self
        return f"Request({method!r}, {len(payload)} bytes: {payload[:120]!r}{'…' if len(payload) > 120 else ''})"


@dataclass
class Outcome:
    method: str
    code: grpc.StatusCode
    rbee_code: str = ""
    message: str = ""


def call(channel: grpc.Channel, method: str, desc: d.MethodDescriptor, payload: bytes, key: str,
         timeout: float, stream_timeout: float = 1.0, max_messages: int = 20) -> Outcome:  # fmt: skip
    """Send ``payload`` as the request of ``method``; how it was answered.
    Streams are read for at most ``max_messages`` messages or ``stream_timeout``."""
    md = auth_metadata(key)
    try:
        if desc.server_streaming:
            responses = channel.unary_stream(method)(payload, metadata=md, timeout=stream_timeout)
            for n, _ in enumerate(responses):
                if n + 1 >= max_messages:
                    responses.cancel()
                    break
        else:
            channel.unary_unary(method)(payload, metadata=md, timeout=timeout)
        return Outcome(method, grpc.StatusCode.OK)
    except grpc.RpcError as err:
        return typed(method, desc, err)


def typed(method: str, desc: d.MethodDescriptor, err: grpc.RpcError) -> Outcome:
    code = err.code()
    if code == grpc.StatusCode.CANCELLED or (code == grpc.StatusCode.DEADLINE_EXCEEDED and desc.server_streaming):
        return Outcome(method, code)  # our own cancel, or our deadline on a stream that goes on
    status = rpc_status.from_call(err)
    if status is None and code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        # grpc's own receive limit refused the message before reading it
        # (rbee/bounds.py); clients name it MESSAGE_TOO_LARGE with the limit.
        named = from_rpc_error(err)
        assert named.code == "MESSAGE_TOO_LARGE", f"{method}: bare RESOURCE_EXHAUSTED: {err.details()!r:.300}"
        return Outcome(method, code, named.code, named.message)
    assert status is not None, f"{method}: {code.name} without rbee details: {err.details()!r:.300}"
    infos = [any_ for any_ in status.details if any_.Is(error_details_pb2.ErrorInfo.DESCRIPTOR)]
    assert infos, f"{method}: {code.name} without an ErrorInfo: {err.details()!r:.300}"
    info = error_details_pb2.ErrorInfo()
    infos[0].Unpack(info)
    assert info.reason, f"{method}: ErrorInfo without a reason (the error's code)"
    assert info.domain == "rbee", f"{method}: ErrorInfo of domain {info.domain!r} ({info.reason})"
    message = err.details() or ""
    assert "Traceback" not in message, f"{method}: a traceback in the reply"
    # An error says what was wrong, it does not echo a 10 MB field back.
    assert len(message) < 64 * 1024, f"{method}: {len(message)}-character error message ({info.reason})"
    assert sum(len(v) for v in info.metadata.values()) < 64 * 1024, f"{method}: huge error details ({info.reason})"
    return Outcome(method, code, info.reason, message)
