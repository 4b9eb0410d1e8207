"""Loading stages forwarded from vLLM's engine process (log records → datagrams)."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

from rbee_worker.load_stages import ENV_SOCKET, StageHandler, StageListener, logging_config, stage_of


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
        assert config["handlers"]["stages"]["()"] == "rbee_worker.load_stages.StageHandler"
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


def test_handler_without_a_listener_stays_quiet(tmp_path):
    handler = StageHandler(address=str(tmp_path / "nobody.sock"))
    handler.handle(logging.LogRecord("vllm.x", logging.INFO, __file__, 1, "Loading weights took %.2f seconds", (1.0,), None))
    handler.close()


def test_logging_config_keeps_vllm_console_output():
    config = logging_config()
    assert config["loggers"]["vllm"]["handlers"] == ["console", "stages"]
    assert config["handlers"]["console"]["stream"] == "ext://sys.stdout"
