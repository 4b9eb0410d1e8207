"""An error that echoes a huge request field still reaches the client as
itself: the status is cut to what HTTP/2 trailers carry (S10)."""

from rbee.errors import RbeeError


def test_a_huge_error_is_cut_to_fit_a_status():
    huge = "x" * 10_000_000
    err = RbeeError("WORKER_NOT_FOUND", f"No worker {huge!r}", {"worker_id": huge, "k" * 500: "v"}, [huge] * 20)
    status = err.to_status()
    assert sum(len(v) for _, v in status.trailing_metadata) < 16_000
    assert status.details.startswith("No worker 'xxx") and "characters)" in status.details


def test_an_ordinary_error_is_untouched():
    lines = "\n".join(f"log line {i} " + "y" * 150 for i in range(15))
    err = RbeeError("WORKER_STARTUP_FAILED", "Worker startup failed", {"last_log_lines": lines}, ["Read the log"])
    assert err._bounded() is err
