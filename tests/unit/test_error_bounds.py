"""An error that echoes a huge request field still reaches the client as
itself: the status is cut to what HTTP/2 trailers carry (S10)."""

from rbee.error_wire import TRAILER_BUDGET, trailer_size
from rbee.errors import RbeeError


def test_a_huge_error_is_cut_to_fit_a_status():
    huge = "x" * 10_000_000
    err = RbeeError("WORKER_NOT_FOUND", f"No worker {huge!r}", {"worker_id": huge, "k" * 500: "v"}, [huge] * 20)
    status = err.to_status()
    assert sum(len(v) for _, v in status.trailing_metadata) < 16_000
    assert status.details.startswith("No worker 'xxx") and "characters)" in status.details
    assert trailer_size(err.to_status_proto()) <= TRAILER_BUDGET


def test_a_huge_bad_field_with_many_details_and_non_ascii_text_still_fits():
    # The message travels in grpc-message (percent-encoded) and twice in the
    # details (Status.message, the BadRequest's description).
    huge = "é" * 1_000_000
    details = {f"k{i}": huge for i in range(40)} | {"field": huge}
    err = RbeeError("INVALID_ARGUMENT", huge, details, [f"docs/x.md {huge}"] * 30)
    proto = err.to_status_proto()
    assert trailer_size(proto) <= TRAILER_BUDGET
    back = err._bounded()
    assert back.code == "INVALID_ARGUMENT" and back.message.endswith("(1000000 characters)")


def test_an_ordinary_error_is_untouched():
    lines = "\n".join(f"log line {i} " + "y" * 150 for i in range(15))
    err = RbeeError("WORKER_STARTUP_FAILED", "Worker startup failed", {"last_log_lines": lines}, ["Read the log"])
    assert err._bounded() is err
