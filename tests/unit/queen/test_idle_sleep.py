"""Idle sleep (rbee_queen/keepalive.py, docs/queen.md "Idle memory"): with
``--idle-sleep`` an expired idle CUDA worker is put to sleep through its hive
rather than stopped, left alone while it sleeps, and stopped where it cannot
sleep. On a fake clock, registry, stopper and sleeper; the hive's SleepWorker
through a real hive is tests/integration/test_hive_sleep_worker.py. No GPU
here: a worker that really sleeps was never run on this machine."""

from __future__ import annotations

import asyncio

from rbee.backends import backend_enum
from rbee.errors import RbeeError
from rbee.v1 import common_pb2
from rbee_queen.keepalive import KeepAlive
from tests.unit.queen.test_idle_memory import MODEL, Clock, Registry

State = common_pb2.WorkerState


class Hives:
    """The stopper and sleeper the queen is given: what each was asked, and
    the sleeper's refusal when one is set."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.stopped: list[str] = []
        self.slept: list[str] = []
        self.refusal: RbeeError | None = None

    async def stop(self, node: str, wid: str) -> None:
        self.stopped.append(wid)
        del self.registry.workers[wid]

    async def sleep(self, node: str, wid: str) -> None:
        self.slept.append(wid)
        if self.refusal is not None:
            raise self.refusal


def setup(idle_sleep: bool = True, backend: str = "cuda"):
    clock, reg, lines = Clock(), Registry(), []
    hives = Hives(reg)
    ka = KeepAlive(60, reg, hives.stop, lambda emoji, text, *a: lines.append(f"{emoji} {text}"),
                   clock=lambda: clock.mono, wall=lambda: clock.unix,
                   sleep=hives.sleep if idle_sleep else None)  # fmt: skip
    put(reg, clock, "w1", backend, active_s_ago=61)
    return ka, reg, clock, hives, lines


def put(reg: Registry, clock: Clock, wid: str, backend: str, state=State.WORKER_STATE_IDLE, busy: int = 0,
        active_s_ago: float = 0.0) -> common_pb2.WorkerInfo:  # fmt: skip
    w = reg.put("gpu-node", wid, clock, state, busy=busy, active_s_ago=active_s_ago)
    w.backend = backend_enum(backend)
    return w


async def one_round(ka: KeepAlive) -> list[str]:
    """What the keep-alive loop does in one round: act on every expired worker."""
    due, _ = ka.due()
    for held, idle_s in due:
        held.stopping = True
        await ka._expire(held, idle_s)
    return [h.worker_id for h, _ in due]


async def test_an_expired_cuda_worker_is_put_to_sleep_not_stopped_and_left_alone_while_it_sleeps() -> None:
    ka, reg, clock, hives, lines = setup()
    assert await one_round(ka) == ["w1"]
    assert hives.slept == ["w1"] and hives.stopped == []
    assert lines[0] == f"⏲️ Keep-alive of worker w1 ({MODEL}) on gpu-node ran out (keep-alive 1m, idle 1m1s): putting it to sleep"
    assert lines[1] == f"💤 Worker w1 ({MODEL}) on gpu-node put to sleep: its GPU memory is free until the next request"
    # Later rounds, however long it stays idle, leave the sleeping worker be.
    clock.advance(3600)
    assert await one_round(ka) == []
    assert hives.slept == ["w1"] and hives.stopped == [] and len(lines) == 2


async def test_a_sleeping_worker_used_again_sleeps_again_once_idle() -> None:
    ka, reg, clock, hives, _ = setup()
    await one_round(ka)
    # A front-door request wakes it; its keep-alive counts from its end.
    with ka.request("gpu-node", "w1", MODEL):
        assert await one_round(ka) == []
    clock.advance(30)
    assert await one_round(ka) == []
    clock.advance(31)
    assert await one_round(ka) == ["w1"] and hives.slept == ["w1", "w1"]


async def test_a_sleeping_worker_seen_busy_by_its_hive_counts_as_used() -> None:
    ka, reg, clock, hives, _ = setup()
    await one_round(ka)
    # A client the task API handed it to earlier calls it directly: the registry sees it busy.
    ka.observe("gpu-node", put(reg, clock, "w1", "cuda", State.WORKER_STATE_BUSY, busy=1))
    put(reg, clock, "w1", "cuda")  # done again; its hive moved its last activity
    assert await one_round(ka) == []
    clock.advance(61)
    assert await one_round(ka) == ["w1"] and hives.slept == ["w1", "w1"] and hives.stopped == []


async def test_a_worker_that_cannot_sleep_is_stopped_and_the_narration_says_why() -> None:
    ka, reg, clock, hives, lines = setup()
    hives.refusal = RbeeError("SLEEP_MODE_UNSUPPORTED", "This worker cannot sleep: this engine has no sleep mode")
    await one_round(ka)
    assert hives.slept == ["w1"] and hives.stopped == ["w1"]
    assert lines[1] == ("⚠️ Worker w1 on gpu-node cannot sleep (SLEEP_MODE_UNSUPPORTED: This worker cannot sleep: "
                        "this engine has no sleep mode): stopping it instead")  # fmt: skip
    assert lines[2].startswith("💤 Worker w1") and "stopped" in lines[2]


async def test_any_other_failure_to_sleep_stops_it_too_but_a_request_that_came_first_does_not() -> None:
    ka, reg, clock, hives, _ = setup()
    hives.refusal = RbeeError("HIVE_UNREACHABLE", "no answer")
    await one_round(ka)
    assert hives.stopped == ["w1"]

    ka, reg, clock, hives, lines = setup()
    hives.refusal = RbeeError("WORKER_BUSY", "1 request(s) run on this worker: it sleeps only when idle")
    await one_round(ka)
    assert hives.slept == ["w1"] and hives.stopped == [] and not ka.held["w1"].asleep
    assert not any("stopping it instead" in line for line in lines)
    # Its keep-alive starts over from then.
    assert await one_round(ka) == []
    clock.advance(60)
    assert await one_round(ka) == ["w1"]


async def test_a_cpu_worker_is_stopped_even_with_idle_sleep_on() -> None:
    ka, reg, clock, hives, lines = setup(backend="cpu")
    await one_round(ka)
    assert hives.slept == [] and hives.stopped == ["w1"]
    assert lines[0].endswith("stopping it")


async def test_without_idle_sleep_a_cuda_worker_is_stopped() -> None:
    ka, reg, clock, hives, lines = setup(idle_sleep=False)
    await one_round(ka)
    assert hives.slept == [] and hives.stopped == ["w1"]
    assert lines[0].endswith("stopping it")


async def test_the_keep_alive_loop_puts_it_to_sleep_once() -> None:
    ka, reg, clock, hives, lines = setup()
    ka.start()
    try:
        for _ in range(300):
            if len(lines) == 2:
                break
            await asyncio.sleep(0.01)
        ka._wake.set()  # another round
        for _ in range(5):
            await asyncio.sleep(0.01)
    finally:
        await ka.close()
    assert hives.slept == ["w1"] and hives.stopped == []


def test_idle_sleep_is_off_unless_set(monkeypatch, tmp_path) -> None:
    from rbee_queen.settings import load_settings

    (tmp_path / "empty.toml").write_text("")
    monkeypatch.setenv("RBEE_CONFIG", str(tmp_path / "empty.toml"))
    monkeypatch.delenv("RBEE_QUEEN_IDLE_SLEEP", raising=False)
    assert load_settings(home=tmp_path).idle_sleep is False
    assert load_settings(home=tmp_path, idle_sleep=True).idle_sleep is True
    monkeypatch.setenv("RBEE_QUEEN_IDLE_SLEEP", "1")
    assert load_settings(home=tmp_path).idle_sleep is True
