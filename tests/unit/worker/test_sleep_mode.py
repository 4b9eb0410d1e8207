"""Sleep mode (rbee_worker/sleep.py): the real servicer and gRPC server on a
fake engine. vLLM has sleep mode on CUDA only and this suite runs on CPU, so
the CUDA side is a fake engine that records sleep and wake-up; the CPU side is
the refusal a real CPU worker gives, before any engine is touched."""

from __future__ import annotations

import grpc
import pytest

from rbee.errors import from_rpc_error
from rbee.v1 import inference_pb2
from rbee_worker.vllm_engine import VllmEngine
from tests.unit.worker.fakes import FakeEngine
from tests.unit.worker.harness import MD, worker_harness


class SleepyEngine(FakeEngine):
    """A FakeEngine that can sleep, as vLLM's on CUDA with sleep mode on."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.calls: list[str] = []
        self.asleep = False

    def sleep_unsupported(self) -> str:
        return ""

    async def sleep(self, level: int) -> None:
        self.calls.append(f"sleep {level}")
        self.asleep = True

    async def wake_up(self) -> None:
        self.calls.append("wake_up")
        self.asleep = False

    async def generate(self, request_id, prompt_token_ids, options):
        assert not self.asleep, "a request reached a sleeping engine"
        async for delta in super().generate(request_id, prompt_token_ids, options):
            yield delta


async def _fails(call, code: str, status: grpc.StatusCode) -> str:
    with pytest.raises(grpc.RpcError) as info:
        await call
    assert info.value.code() == status
    err = from_rpc_error(info.value)
    assert err.code == code, err
    return err.message


async def test_a_cpu_worker_refuses_sleep_at_once_with_its_code() -> None:
    engine = SleepyEngine()
    async with worker_harness(engine) as h:
        message = await _fails(h.stub.Sleep(inference_pb2.SleepRequest(level=1), metadata=MD),
                               "SLEEP_MODE_UNSUPPORTED", grpc.StatusCode.FAILED_PRECONDITION)  # fmt: skip
        assert "CUDA only" in message and "cpu" in message
        await _fails(h.stub.WakeUp(inference_pb2.WakeUpRequest(), metadata=MD), "SLEEP_MODE_UNSUPPORTED",
                     grpc.StatusCode.FAILED_PRECONDITION)  # fmt: skip
        assert engine.calls == []
        _, [final] = await h.collect(max_tokens=3)
        assert final.tokens_generated == 3


async def test_a_cuda_worker_sleeps_and_the_next_request_wakes_it() -> None:
    engine = SleepyEngine()
    async with worker_harness(engine) as h:
        h.servicer.sleep.backend = "cuda"
        reply = await h.stub.Sleep(inference_pb2.SleepRequest(), metadata=MD)
        assert (reply.sleeping, reply.level) == (True, 1)
        assert engine.calls == ["sleep 1"]
        # Asleep already: nothing more reaches the engine.
        await h.stub.Sleep(inference_pb2.SleepRequest(level=1), metadata=MD)
        assert engine.calls == ["sleep 1"]

        deltas, [final] = await h.collect(max_tokens=3)
        assert final.tokens_generated == 3 and deltas
        assert engine.calls == ["sleep 1", "wake_up"]
        assert "Asleep (level 1)" in h.log.getvalue() and "Awake again (a request came)" in h.log.getvalue()

        woke = await h.stub.WakeUp(inference_pb2.WakeUpRequest(), metadata=MD)
        assert not woke.was_sleeping
        await h.stub.Sleep(inference_pb2.SleepRequest(), metadata=MD)
        woke = await h.stub.WakeUp(inference_pb2.WakeUpRequest(), metadata=MD)
        assert woke.was_sleeping and engine.calls[-1] == "wake_up" and not engine.asleep


async def test_a_busy_worker_does_not_sleep_and_other_levels_are_refused() -> None:
    engine = SleepyEngine(mode="gated")
    async with worker_harness(engine) as h:
        h.servicer.sleep.backend = "cuda"
        await _fails(h.stub.Sleep(inference_pb2.SleepRequest(level=2), metadata=MD), "INVALID_ARGUMENT",
                     grpc.StatusCode.INVALID_ARGUMENT)  # fmt: skip
        call = h.generate(request_id="busy", max_tokens=2)
        engine.release(1)
        first = await call.read()
        assert first.delta.index == 0
        message = await _fails(h.stub.Sleep(inference_pb2.SleepRequest(), metadata=MD), "WORKER_BUSY",
                               grpc.StatusCode.FAILED_PRECONDITION)  # fmt: skip
        assert "1 request(s)" in message
        engine.release(5)
        while (await call.read()) is not grpc.aio.EOF:
            pass
        assert engine.calls == []
        await h.stub.Sleep(inference_pb2.SleepRequest(), metadata=MD)
        assert engine.calls == ["sleep 1"]


async def test_a_cuda_engine_without_sleep_mode_says_how_to_turn_it_on() -> None:
    async with worker_harness(FakeEngine()) as h:
        h.servicer.sleep.backend = "cuda"
        message = await _fails(h.stub.Sleep(inference_pb2.SleepRequest(), metadata=MD), "SLEEP_MODE_UNSUPPORTED",
                               grpc.StatusCode.FAILED_PRECONDITION)  # fmt: skip
        assert "no sleep mode" in message


def test_the_vllm_engine_asks_for_sleep_mode_on_cuda_only(tmp_path) -> None:
    cpu = VllmEngine(str(tmp_path), backend="cpu", sleep_mode=True)
    assert not cpu.sleep_mode and "CUDA only" in cpu.sleep_unsupported()
    assert "enable_sleep_mode" not in vars(cpu._engine_args()) or not cpu._engine_args().enable_sleep_mode
    plain = VllmEngine(str(tmp_path), backend="cuda")
    assert "RBEE_WORKER_SLEEP_MODE=1" in plain.sleep_unsupported()
    cuda = VllmEngine(str(tmp_path), backend="cuda", sleep_mode=True)
    assert cuda.sleep_unsupported() == "" and cuda._engine_args().enable_sleep_mode
