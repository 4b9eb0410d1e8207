"""The worker fixture fails fast, with the worker's log, when the worker cannot load."""

from __future__ import annotations

import pytest

from tests.fixtures.worker import WorkerFailed, launch_worker


def test_launch_fails_fast_with_the_log_when_loading_fails(tmp_path):
    model = tmp_path / "broken-model"
    model.mkdir()
    (model / "config.json").write_text("{not json")
    # A load timeout longer than the test's own: only failing fast can pass.
    with pytest.raises(WorkerFailed) as info:
        launch_worker(model, tmp_path / "logs", load_timeout_s=3600)
    message = str(info.value)
    assert "MODEL_LOAD_FAILED" in message
    assert "[model-loader] 📦 Loading model" in message  # the log tail


def test_launch_reports_a_process_that_exits_before_serving(tmp_path, default_model):
    import socket

    from tests.fixtures.worker import WorkerExited

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(WorkerExited) as info:
            launch_worker(default_model, tmp_path / "logs", port=port, load_timeout_s=3600)
    assert "exited with code 3" in str(info.value)
    assert "PORT_IN_USE" in str(info.value)
