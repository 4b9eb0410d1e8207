"""An rbee error on the wire: a google.rpc.Status with ErrorInfo, Help and, for a bad
field, BadRequest (rbee/error_wire.py); read back into the same RbeeError, and a
status without rbee's ErrorInfo read as the fallback of its status code."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from rbee.error_wire import link_url
from rbee.errors import RbeeError, from_rpc_error, from_status_bytes, from_status_proto


def unpacked(status: status_pb2.Status, cls):
    found = []
    for packed in status.details:
        if packed.Is(cls.DESCRIPTOR):
            msg = cls()
            packed.Unpack(msg)
            found.append(msg)
    return found


def test_the_status_carries_error_info_and_help():
    err = RbeeError(
        "INSUFFICIENT_RAM",
        "The model needs 8192 MB; 4096 MB are free",
        {"required_mb": 8192, "available_mb": 4096},
        ["Stop a worker first: rbee-keeper workers shutdown --hive HOST:PORT ID", "Read docs/queen.md, \"Fit\""],
    )
    status = err.to_status_proto()
    assert status.code == code_pb2.RESOURCE_EXHAUSTED
    assert status.message == err.message
    (info,) = unpacked(status, error_details_pb2.ErrorInfo)
    assert (info.reason, info.domain) == ("INSUFFICIENT_RAM", "rbee")
    assert dict(info.metadata) == {"required_mb": "8192", "available_mb": "4096"}
    (help_,) = unpacked(status, error_details_pb2.Help)
    assert [(link.description, link.url) for link in help_.links] == [
        (err.suggestions[0], ""),
        (err.suggestions[1], "docs/queen.md"),
    ]
    assert unpacked(status, error_details_pb2.BadRequest) == []  # not an INVALID_ARGUMENT
    # The message travels once in the details' bytes (Status.message), no more.
    assert status.SerializeToString().count(err.message.encode()) == 1

    back = from_status_proto(status)
    assert (back.code, back.message, back.details, back.suggestions) == (err.code, err.message, err.details, err.suggestions)


def test_no_suggestions_no_help():
    status = RbeeError("WORKER_NOT_FOUND", "No worker w-1", {"worker_id": "w-1"}).to_status_proto()
    assert unpacked(status, error_details_pb2.Help) == []
    assert from_status_proto(status).suggestions == []


@pytest.mark.parametrize(
    ("code", "details", "field"),
    [
        ("INVALID_ARGUMENT", {"field": "max_tokens", "max": 4096}, "max_tokens"),
        ("INVALID_CONFIG", {"file": "/etc/rbee.toml", "key": "keeper.queen"}, "keeper.queen"),
        ("INVALID_ARGUMENT", {"option": "--chat"}, "--chat"),
        ("INVALID_CONFIG", {"setting": "http_cert"}, "http_cert"),
    ],
)
def test_a_bad_field_adds_a_bad_request(code, details, field):
    err = RbeeError(code, f"{field} is wrong", details, ["Read docs/inference-api.md"])
    status = err.to_status_proto()
    assert status.code == code_pb2.INVALID_ARGUMENT
    (bad,) = unpacked(status, error_details_pb2.BadRequest)
    assert [(v.field, v.description) for v in bad.field_violations] == [(field, err.message)]
    back = from_status_proto(status)
    assert (back.code, back.message, back.details, back.suggestions) == (err.code, err.message, err.details, err.suggestions)


def test_no_bad_request_without_a_named_field_or_outside_invalid_argument():
    plain = RbeeError("INVALID_MODEL_REF", "Not a model reference: 'x'", {"model_ref": "x"}).to_status_proto()
    assert unpacked(plain, error_details_pb2.BadRequest) == []
    # "field" in the details of a code that is not INVALID_ARGUMENT names no bad request.
    denied = RbeeError("PATH_NOT_ALLOWED", "Outside the allowed roots", {"field": "model_path"}).to_status_proto()
    assert denied.code == code_pb2.PERMISSION_DENIED
    assert unpacked(denied, error_details_pb2.BadRequest) == []


def test_help_link_urls():
    assert link_url("Install the toolkit (https://developer.nvidia.com/cuda-downloads).") == "https://developer.nvidia.com/cuda-downloads"
    assert link_url("See docs/security.md.") == "docs/security.md"
    assert link_url("See docs/queen.md#fit for the estimate") == "docs/queen.md#fit"
    assert link_url("Run rbee-keeper setup list-nodes") == ""


def _status(code: int, message: str, *details) -> status_pb2.Status:
    packed = []
    for detail in details:
        any_ = any_pb2.Any()
        any_.Pack(detail)
        packed.append(any_)
    return status_pb2.Status(code=code, message=message, details=packed)


def test_a_status_without_rbee_error_info_falls_back_to_its_status_code():
    bare = from_status_proto(_status(code_pb2.UNAUTHENTICATED, "no"))
    assert (bare.code, bare.message, bare.details) == ("INVALID_API_KEY", "no", {"grpc_status": "UNAUTHENTICATED"})
    # An ErrorInfo of another domain is not an rbee code.
    other = _status(code_pb2.RESOURCE_EXHAUSTED, "quota", error_details_pb2.ErrorInfo(reason="ALL_SLOTS_BUSY", domain="example.com"))
    back = from_status_proto(other)
    assert back.code == "RESOURCE_EXHAUSTED" and back.details["grpc_status"] == "RESOURCE_EXHAUSTED"
    # Help without ErrorInfo: still the fallback.
    help_only = _status(code_pb2.INTERNAL, "boom", error_details_pb2.Help(links=[error_details_pb2.Help.Link(description="retry")]))
    assert from_status_proto(help_only).code == "INTERNAL"


def test_a_worker_report_that_does_not_parse_is_an_internal_error():
    err = from_status_bytes(b"\xff\xff\xff")
    assert err.code == "INTERNAL" and "does not parse" in err.message
    assert from_status_bytes(RbeeError("ENGINE_DIED", "gone").to_status_proto().SerializeToString()).code == "ENGINE_DIED"


async def test_an_error_crosses_a_real_grpc_call_whole():
    err = RbeeError(
        "INVALID_ARGUMENT",
        "max_tokens must be at most 4096 (got 5000) — too many",
        {"field": "max_tokens", "max": 4096},
        ["Lower --max-tokens", "The bounds are in docs/inference-api.md"],
    )

    async def handler(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await context.abort_with_status(err.to_status())

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("test.Err", {"Call": grpc.unary_unary_rpc_method_handler(handler)})]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await channel.unary_unary("/test.Err/Call")(b"")
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        back = from_rpc_error(info.value, target=f"127.0.0.1:{port}")
        assert (back.code, back.message, back.details, back.suggestions) == (err.code, err.message, err.details, err.suggestions)
    finally:
        await server.stop(None)
