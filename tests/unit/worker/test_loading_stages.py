"""Loading stages forwarded from vLLM's engine process (log records → datagrams)."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

from rbee_worker.loading_stages import ENV_SOCKET, StageHandler, StageListener, logging_config, stage_of


def test_stage_of_matches_vllm_templates():
    assert stage_of("Starting to load model %s...") == "weights"
    assert stage_of("Loading weights took %.2f seconds") == "weights_loaded"
    assert stage_of("%s KV cache size: %s tokens, Maximum concurrency for %s tokens per request: %.2fx") == "kv_cache"
    assert stage_of("init engine (profile, create kv cache, warmup model) took %.2f s") == "warmup_done"
    assert stage_of("Using max model len %s") is None
    assert stage_of(ValueError("not a template")) is None


async def test_records_travel_to_the_listener_and_files_are_cleaned_up():
    got: list[tuple[str, str]] = []
    arrived = asyncio.Event()

    def on_stage(stage: str, message: str) -> None:
        got.append((stage, message))
        if stage == "weights_loaded":
            arrived.set()

    listener = StageListener(on_stage)
    env = listener.start(asyncio.get_running_loop())
    try:
        assert Path(env["VLLM_LOGGING_CONFIG_PATH"]).is_file()
        config = json.loads(Path(env["VLLM_LOGGING_CONFIG_PATH"]).read_text())
        assert config["handlers"]["stages"]["()"] == "rbee_worker.loading_stages.StageHandler"
        handler = StageHandler(address=env[ENV_SOCKET])
        for msg, args in (
            ("Using max model len %s", (2048,)),  # not a stage: not sent
            ("Starting to load model %s...", ("/models/x",)),
            ("Loading weights took %.2f seconds", (0.21,)),
        ):
            handler.handle(logging.LogRecord("vllm.x", logging.INFO, __file__, 1, msg, args, None))
        await asyncio.wait_for(arrived.wait(), 10)
        handler.close()
    finally:
        listener.close()
    assert got == [("weights", "Starting to load model /models/x..."), ("weights_loaded", "Loading weights took 0.21 seconds")]
    assert not Path(env[ENV_SOCKET]).exists()
    assert not Path(env["VLLM_LOGGING_CONFIG_PATH"]).exists()


def test_handler_without_a_listener_stays_quiet(tmp_path, capsys):
    """No worker listening (gone, or never there): the stage is dropped; the
    engine's logging neither raises nor reports a handler error."""
    errors: list[logging.LogRecord] = []
    handler = StageHandler(address=str(tmp_path / "nobody.sock"))
    handler.handleError = errors.append  # what logging calls when emit raises
    record = logging.LogRecord("vllm.x", logging.INFO, __file__, 1, "Loading weights took %.2f seconds", (1.0,), None)
    handler.handle(record)
    assert handler._sock is not None, "a stage record is sent (and the send fails), not skipped"
    handler.handle(record)  # the same socket, failing again, quietly
    handler.close()
    assert errors == [] and capsys.readouterr().err == ""
    assert not (tmp_path / "nobody.sock").exists()


def test_logging_config_keeps_vllm_console_output():
    config = logging_config()
    assert config["loggers"]["vllm"]["handlers"] == ["console", "stages"]
    assert config["handlers"]["console"]["stream"] == "ext://sys.stdout"


# -- the feature step "I see loading stages in order" ----------------------------


def _msg(state, stage="", done=0, total=6):
    from rbee.narration import progress_event
    from rbee.v1 import inference_pb2

    progress = progress_event(stage, done, total, unit="stages") if stage else None
    return inference_pb2.StreamLoadingProgressResponse(state=state, progress=progress)


def test_the_stages_step_requires_stages_really_in_order():
    """Its old check passed on a single message (a worker already idle), so
    it proved nothing about the order; the stream must show the loading."""
    from features.steps.worker_support import loading_stage_problem
    from rbee.v1 import common_pb2

    loading, idle = common_pb2.WORKER_STATE_LOADING, common_pb2.WORKER_STATE_IDLE
    assert "not while loading" in loading_stage_problem([_msg(idle, "ready", 6)])
    assert "fewer than two" in loading_stage_problem([_msg(loading, "starting"), _msg(idle, "starting")])
    assert "out of order" in loading_stage_problem(
        [_msg(loading, "starting"), _msg(loading, "weights", 3), _msg(loading, "tokenizer", 3), _msg(idle, "ready", 6)]
    )
    assert "backwards" in loading_stage_problem(
        [_msg(loading, "starting", 1), _msg(loading, "starting", 0), _msg(loading, "weights", 3)]
    )
    assert "does not have" in loading_stage_problem([_msg(loading, "starting"), _msg(loading, "download", 2)])
    good = [
        _msg(loading, "starting"), _msg(loading, "tokenizer", 0), _msg(loading, "engine_config", 1),
        _msg(loading, "engine_start", 2), _msg(loading, "weights", 3), _msg(loading, "kv_cache", 4),
        _msg(loading, "ready", 6), _msg(idle, "ready", 6),
    ]  # fmt: skip
    assert loading_stage_problem(good) is None


def test_stages_only_move_forward_a_late_engine_line_is_dropped() -> None:
    """The engine process's stage lines arrive over a socket, possibly after
    the worker reported a later stage: the stream never goes back."""
    from rbee_worker.loading_stages import STAGES, ForwardStages

    seen: list = []
    report = ForwardStages(seen.append)
    for stage in ("tokenizer", "engine_config", "engine_config", "engine_start", "weights", "ready", "kv_cache", "weights"):
        report(stage, f"{stage} line")
    assert [p.stage for p in seen] == ["tokenizer", "engine_config", "engine_config", "engine_start", "weights", "ready"]
    assert seen[-1].done == seen[-1].total == len(STAGES)
    assert [p.done for p in seen] == sorted(p.done for p in seen)
