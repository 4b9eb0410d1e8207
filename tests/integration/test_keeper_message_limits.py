"""`rbee-keeper infer --worker` against a worker process (the real program,
fake engine) with requests past the worker's limits: what gRPC refuses for
size is MESSAGE_TOO_LARGE naming the limit, said once (never retried as
ALL_SLOTS_BUSY, never advice on --slots); what the bounds table refuses is
INVALID_ARGUMENT naming the field and the bound."""

from __future__ import annotations

import json

import pytest

from rbee.bounds import worker_receive_limit
from tests.unit.worker.test_program import KEY, fake_worker

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_a_request_past_the_workers_receive_limit_is_message_too_large(tmp_path, keeper):
    limit = worker_receive_limit(2048)
    chat = tmp_path / "chat.json"
    chat.write_text(json.dumps([{"role": "user", "content": "x" * (limit + 1000)}]))
    async with fake_worker(tmp_path) as worker:
        await worker.wait_loaded()
        run = keeper("infer", "--worker", worker.address, "--chat", str(chat), "--max-tokens", "4",
                     env={"RBEE_API_KEY": KEY})  # fmt: skip
        assert run.finish() == 1, run.describe()
    assert "❌ MESSAGE_TOO_LARGE" in run.stderr and f"at most {limit} bytes" in run.stderr, run.describe()
    assert "ALL_SLOTS_BUSY" not in run.stderr and "retry" not in run.stderr.lower() and "--slots" not in run.stderr


async def test_a_prompt_past_what_the_context_holds_names_the_bound(tmp_path, keeper):
    async with fake_worker(tmp_path) as worker:
        await worker.wait_loaded()
        chat = tmp_path / "chat.json"
        chat.write_text(json.dumps([{"role": "user", "content": "y" * 100_000}]))
        run = keeper("infer", "--worker", worker.address, "--chat", str(chat), "--max-tokens", "4",
                     env={"RBEE_API_KEY": KEY})  # fmt: skip
        assert run.finish() == 1, run.describe()
    assert "❌ INVALID_ARGUMENT: Invalid chat: 100000 bytes; at most 65536" in run.stderr, run.describe()
