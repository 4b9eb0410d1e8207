"""keeper's direct-mode flow against a scripted in-process worker."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import pytest

from rbee.errors import RbeeError
from rbee.narration import Narrator
from rbee.v1 import common_pb2

from rbee_keeper.direct import DirectInference, Timeouts
from rbee_keeper.interrupts import EXIT_INTERRUPTED, Interrupts
from rbee_keeper.render import TokenPrinter
from rbee_keeper.validation import validate_sampling
from rbee_keeper.worker_client import WorkerClient

from tests.unit.keeper.fake_worker import API_KEY, Script, start_fake

pytestmark = pytest.mark.asyncio(loop_scope="session")

FAST = Timeouts(connect_s=5, loading_s=10, stall_s=10, cancel_ack_s=2, busy_delays_s=(0.01, 0.02, 0.04))


class Run:
    """One keeper session against a fake worker, with captured output."""

    def __init__(self, script: Script, tmp_path: Path, timeouts: Timeouts = FAST, key: str = API_KEY, **sampling) -> None:
        self.script = script
        self.tmp_path = tmp_path
        self.timeouts = timeouts
        self.key = key
        self.out = io.StringIO()
        self.err = io.StringIO()
        self.narrate = Narrator("rbee-keeper", stream=self.err)
        self.interrupts = Interrupts(self.narrate)
        self.sampling = {"prompt": "hi", "max_tokens": 16, **sampling}

    async def __aenter__(self) -> "Run":
        self.server, self.worker, self.address = await start_fake(self.script)
        self.client = WorkerClient(self.address, self.key, "--api-key")
        self.session = DirectInference(
            self.client,
            validate_sampling(**self.sampling),
            self.narrate,
            TokenPrinter(self.out),
            self.interrupts,
            self.timeouts,
            partial_folder=self.tmp_path / "partial",
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.client.close()
        await self.server.stop(None)

    @property
    def stderr(self) -> str:
        return self.err.getvalue()


async def test_streams_tokens_to_stdout_and_summary_to_stderr(tmp_path):
    async with Run(Script(), tmp_path, temperature="0", seed="7") as run:
        assert await run.session.run() == 0
    assert run.out.getvalue() == "Hello, bees!\n"
    assert "4 tokens in" in run.stderr and "tokens/s" in run.stderr and "finish: stop" in run.stderr
    request = run.worker.requests[0]
    assert request.HasField("temperature") and request.temperature == 0.0
    assert request.seed == 7 and not request.HasField("top_p")
    assert request.request_id == run.session.request_id


async def test_unset_temperature_is_left_to_the_worker(tmp_path):
    async with Run(Script(), tmp_path) as run:
        await run.session.run()
    assert not run.worker.requests[0].HasField("temperature")


async def test_busy_worker_is_retried_with_narration(tmp_path):
    async with Run(Script(busy_times=2), tmp_path) as run:
        assert await run.session.run() == 0
    assert run.out.getvalue() == "Hello, bees!\n"
    retries = [line for line in run.stderr.splitlines() if "is busy" in line]
    assert len(retries) == 2
    assert "1/1 slots busy" in retries[0] and "retry 1 of 3 in 0.01s" in retries[0]
    assert "retry 2 of 3 in 0.02s" in retries[1]
    assert len(run.worker.requests) == 3


async def test_busy_after_all_retries_fails_with_suggestions(tmp_path):
    async with Run(Script(busy_times=99), tmp_path) as run:
        with pytest.raises(RbeeError) as caught:
            await run.session.run()
    err = caught.value
    assert err.code == "ALL_SLOTS_BUSY"
    assert err.details["slots_total"] == "1" and err.details["slots_busy"] == "1"
    assert err.details["retries"] == "3"
    assert any("--slots" in s for s in err.suggestions)
    assert any("another worker" in s for s in err.suggestions)
    assert len(run.worker.requests) == 4
    assert run.out.getvalue() == ""


async def test_default_timeouts_are_the_specified_figures():
    assert Timeouts().busy_delays_s == (1.0, 2.0, 4.0)
    assert Timeouts().stall_s == 60.0 and Timeouts().loading_s == 300.0 and Timeouts().cancel_ack_s == 5.0


async def test_stall_cancels_the_request_and_keeps_the_partial_text(tmp_path):
    timeouts = Timeouts(connect_s=5, stall_s=0.3, cancel_ack_s=2)
    async with Run(Script(stall_after=2), tmp_path, timeouts) as run:
        with pytest.raises(RbeeError) as caught:
            await run.session.run()
    err = caught.value
    assert err.code == "STREAM_STALLED"
    assert run.worker.cancels == [run.session.request_id]
    assert err.details["cancel"] == "confirmed by the worker"
    assert err.details["tokens generated"] == "2 / 16"
    assert Path(err.details["partial result"]).read_text() + "\n" == "Hello,\n" == run.out.getvalue()


async def test_broken_stream_saves_partial_text(tmp_path):
    async with Run(Script(break_after=3), tmp_path, max_tokens=50) as run:
        with pytest.raises(RbeeError) as caught:
            await run.session.run()
    err = caught.value
    assert err.code == "STREAM_BROKEN"
    assert "closed unexpectedly" in err.message
    assert err.details["tokens generated"] == "3 / 50"
    saved = Path(err.details["partial result"])
    assert saved.parent == tmp_path / "partial"
    assert saved.read_text() + "\n" == "Hello, bees\n" == run.out.getvalue()


async def test_broken_stream_before_any_token_saves_nothing(tmp_path):
    async with Run(Script(break_after=0), tmp_path) as run:
        with pytest.raises(RbeeError) as caught:
            await run.session.run()
    assert caught.value.code == "STREAM_BROKEN"
    assert caught.value.details["tokens generated"] == "0 / 16"
    assert not (tmp_path / "partial").exists()


async def test_refusal_before_tokens_is_reported_as_the_worker_said(tmp_path):
    refusal = RbeeError("INVALID_ARGUMENT", "max_tokens 9999 exceeds the model's 2048", {"field": "max_tokens"})
    async with Run(Script(refuse_with=refusal), tmp_path) as run:
        with pytest.raises(RbeeError) as caught:
            await run.session.run()
    assert caught.value.code == "INVALID_ARGUMENT"
    assert caught.value.details == {"field": "max_tokens"}
    assert len(run.worker.requests) == 1


async def test_request_cancelled_elsewhere_is_an_error(tmp_path):
    async with Run(Script(final_reason="abort"), tmp_path) as run:
        with pytest.raises(RbeeError) as caught:
            await run.session.run()
    assert caught.value.code == "CANCELLED"
    assert Path(caught.value.details["partial result"]).read_text() == "Hello, bees!"


async def test_interrupt_sends_cancel_and_waits_for_the_acknowledgement(tmp_path):
    script = Script(tokens=[f"t{i} " for i in range(200)], token_delay_s=0.02)
    async with Run(script, tmp_path, max_tokens=200) as run:
        task = asyncio.create_task(run.session.run())
        await run.worker.first_token_sent.wait()
        run.interrupts.trigger()
        assert await task == EXIT_INTERRUPTED
    assert run.worker.cancels == [run.session.request_id]
    assert "cancelled; the worker confirmed" in run.stderr
    assert run.out.getvalue().startswith("t0 ")
    assert "t199" not in run.out.getvalue()


async def test_interrupt_without_acknowledgement_gives_up_after_the_deadline(tmp_path):
    script = Script(tokens=["a"] * 100, stall_after=1, cancel_hangs=True)
    timeouts = Timeouts(connect_s=5, stall_s=30, cancel_ack_s=0.3)
    async with Run(script, tmp_path, timeouts, max_tokens=100) as run:
        task = asyncio.create_task(run.session.run())
        await run.worker.first_token_sent.wait()
        run.interrupts.trigger()
        assert await task == EXIT_INTERRUPTED
    assert "did not confirm the cancel within 0.3s" in run.stderr


async def test_interrupt_while_waiting_for_a_busy_worker(tmp_path):
    timeouts = Timeouts(connect_s=5, busy_delays_s=(30.0,))
    async with Run(Script(busy_times=5), tmp_path, timeouts) as run:
        task = asyncio.create_task(run.session.run())
        while "is busy" not in run.stderr:
            await asyncio.sleep(0.01)
        run.interrupts.trigger()
        assert await task == EXIT_INTERRUPTED
    assert run.worker.cancels == []


async def test_waits_for_loading_and_shows_each_stage(tmp_path):
    script = Script(
        state=common_pb2.WORKER_STATE_LOADING,
        loading=[("tokenizer", 0, 3), ("weights", 1, 3), ("kv_cache", 2, 3)],
    )
    async with Run(script, tmp_path) as run:
        assert await run.session.run() == 0
    stderr = run.stderr
    assert "is loading file:///models/fake" in stderr
    for stage in ("tokenizer · 0/3 stages", "weights · 1/3 stages", "kv_cache · 2/3 stages"):
        assert stage in stderr
    assert "Model loaded" in stderr
    assert run.out.getvalue() == "Hello, bees!\n"


async def test_loading_timeout_names_where_the_log_is(tmp_path):
    script = Script(state=common_pb2.WORKER_STATE_LOADING, loading=[("weights", 1, 3)], loading_forever=True)
    timeouts = Timeouts(connect_s=5, loading_s=0.3)
    async with Run(script, tmp_path, timeouts) as run:
        with pytest.raises(RbeeError) as caught:
            await run.session.run()
    err = caught.value
    assert err.code == "LOADING_TIMEOUT"
    assert err.details["last_stage"] == "weights"
    assert any("log" in s for s in err.suggestions)
    assert run.worker.requests == []


async def test_failed_worker_is_reported_without_sending(tmp_path):
    async with Run(Script(state=common_pb2.WORKER_STATE_FAILED), tmp_path) as run:
        with pytest.raises(RbeeError) as caught:
            await run.session.run()
    assert caught.value.code == "MODEL_LOAD_FAILED"
    assert run.worker.requests == []


async def test_wrong_key_names_host_and_key_source(tmp_path):
    async with Run(Script(), tmp_path, key="wrong-key") as run:
        with pytest.raises(RbeeError) as caught:
            await run.session.run()
    err = caught.value
    assert err.code == "INVALID_API_KEY"
    assert err.details["host"] == run.address
    assert err.details["key_from"] == "--api-key"
    assert "wrong-key" not in str(err.details) + err.message


async def test_backend_mismatch_with_the_worker_is_refused(tmp_path):
    async with Run(Script(), tmp_path) as run:
        run.session._expect = ("cuda", None)
        with pytest.raises(RbeeError) as caught:
            await run.session.run()
    assert caught.value.code == "INVALID_BACKEND"
    assert run.worker.requests == []


async def test_unreachable_worker(tmp_path):
    client = WorkerClient("127.0.0.1:1", API_KEY, "--api-key")
    try:
        with pytest.raises(RbeeError) as caught:
            await client.readiness(timeout=2)
    finally:
        await client.close()
    assert caught.value.code == "CONNECTION_TIMEOUT"
    assert "127.0.0.1:1" in caught.value.message and "after 3 attempts" in caught.value.message
    assert caught.value.details["attempts"] == "3"
