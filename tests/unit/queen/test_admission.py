"""The admission queue (rbee_queen/admission.py) on its own: first come first
served, the length and wait bounds, a cancelled waiter leaving the line,
and slots freed by a registry change or by wake()."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

import pytest

from rbee.errors import RbeeError
from rbee_queen.admission import AdmissionQueue, Queued

MODEL = "hf:org/model"


class Slots:
    """A worker's free slots as the queue's take() sees them."""

    def __init__(self, free: int = 0) -> None:
        self.free = free
        self.looks = 0

    async def take(self) -> str | None:
        self.looks += 1
        if self.free > 0:
            self.free -= 1
            return "slot"
        return None


def refuse(why: str, waited: float) -> RbeeError:
    return RbeeError("ALL_SLOTS_BUSY", f"busy ({why})", {"why": why, "waited_s": waited})


class Changes:
    """A stand-in for the registry's listen(): one event per listener."""

    def __init__(self) -> None:
        self.listeners: set[asyncio.Event] = set()

    @contextlib.contextmanager
    def listen(self) -> Iterator[asyncio.Event]:
        ev = asyncio.Event()
        self.listeners.add(ev)
        try:
            yield ev
        finally:
            self.listeners.discard(ev)

    def changed(self) -> None:
        for ev in self.listeners:
            ev.set()


async def until_waiting(q: AdmissionQueue, key: str, n: int) -> None:
    async def settled() -> None:
        while q.waiting(key) != n:
            await asyncio.sleep(0)

    await asyncio.wait_for(settled(), 10)  # a bound, not a measure: a wrong queue never gets there


async def test_a_free_slot_is_taken_at_once_without_queueing() -> None:
    q = AdmissionQueue(4, 60)
    slots = Slots(1)
    got = await q.admit(MODEL, MODEL, slots.take, refuse)
    assert got.slot == "slot" and not got.queued and q.depths() == {}


async def test_waiters_get_freed_slots_first_come_first_served() -> None:
    changes = Changes()
    q = AdmissionQueue(8, 60, changes.listen)
    slots = Slots(0)
    order: list[int] = []
    told: list[Queued] = []

    async def one(i: int) -> None:
        await q.admit(MODEL, MODEL, slots.take, refuse, told.append)
        order.append(i)

    tasks = []
    for i in range(5):
        tasks.append(asyncio.ensure_future(one(i)))
        await until_waiting(q, MODEL, i + 1)
    assert [t.position for t in told] == [1, 2, 3, 4, 5] and q.depths() == {MODEL: 5}
    for freed in range(5):
        slots.free += 1
        changes.changed()
        while len(order) != freed + 1:
            await asyncio.sleep(0)
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3, 4] and q.depths() == {MODEL: 0}


async def test_only_the_head_looks_for_a_slot() -> None:
    changes = Changes()
    q = AdmissionQueue(8, 60, changes.listen)
    slots = Slots(0)
    tasks = [asyncio.ensure_future(q.admit(MODEL, MODEL, slots.take, refuse)) for _ in range(3)]
    await until_waiting(q, MODEL, 3)
    for _ in range(3):
        await asyncio.sleep(0)
    before = slots.looks
    changes.changed()
    for _ in range(10):
        await asyncio.sleep(0)
    assert slots.looks == before + 1  # one look by the head, none by the two behind it
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_a_newcomer_does_not_overtake_the_line_even_when_a_slot_looks_free() -> None:
    q = AdmissionQueue(8, 60)
    slots = Slots(0)
    first = asyncio.ensure_future(q.admit(MODEL, MODEL, slots.take, refuse))
    await until_waiting(q, MODEL, 1)
    slots.free = 1  # freed, the head not told yet
    second = asyncio.ensure_future(q.admit(MODEL, MODEL, slots.take, refuse))
    await until_waiting(q, MODEL, 2)
    assert not second.done()
    q.wake(MODEL)  # a request the queen routed finished
    assert (await first).queued
    slots.free = 1
    q.wake(MODEL)
    assert (await second).queued


async def test_a_full_line_refuses_at_once() -> None:
    q = AdmissionQueue(2, 60)
    slots = Slots(0)
    tasks = [asyncio.ensure_future(q.admit(MODEL, MODEL, slots.take, refuse)) for _ in range(2)]
    await until_waiting(q, MODEL, 2)
    with pytest.raises(RbeeError) as err:
        await q.admit(MODEL, MODEL, slots.take, refuse)
    assert err.value.code == "ALL_SLOTS_BUSY" and err.value.details["why"] == "full"
    assert q.waiting(MODEL) == 2
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert q.waiting(MODEL) == 0 and q.depths() == {MODEL: 0}


async def test_length_zero_turns_queueing_off() -> None:
    q = AdmissionQueue(0, 60)
    with pytest.raises(RbeeError) as err:
        await q.admit(MODEL, MODEL, Slots(0).take, refuse)
    assert err.value.details["why"] == "full" and q.waiting(MODEL) == 0


async def test_the_wait_is_bounded() -> None:
    q = AdmissionQueue(4, 0.01)
    with pytest.raises(RbeeError) as err:
        await q.admit(MODEL, MODEL, Slots(0).take, refuse)
    assert err.value.details["why"] == "wait" and float(err.value.details["waited_s"]) > 0
    assert q.waiting(MODEL) == 0


async def test_a_cancelled_waiter_leaves_the_line_and_the_next_moves_up() -> None:
    changes = Changes()
    q = AdmissionQueue(8, 60, changes.listen)
    slots = Slots(0)
    tasks = [asyncio.ensure_future(q.admit(MODEL, MODEL, slots.take, refuse)) for _ in range(3)]
    await until_waiting(q, MODEL, 3)
    tasks[1].cancel()  # the middle one's client left
    await until_waiting(q, MODEL, 2)
    tasks[0].cancel()  # then the head's
    await until_waiting(q, MODEL, 1)
    assert q.depths() == {MODEL: 1}
    slots.free = 1
    changes.changed()
    assert (await tasks[2]).queued
    assert q.depths() == {MODEL: 0} and not changes.listeners


async def test_two_free_slots_admit_two_waiters_on_one_change() -> None:
    changes = Changes()
    q = AdmissionQueue(8, 60, changes.listen)
    slots = Slots(0)
    tasks = [asyncio.ensure_future(q.admit(MODEL, MODEL, slots.take, refuse)) for _ in range(3)]
    await until_waiting(q, MODEL, 3)
    slots.free = 2
    changes.changed()
    await asyncio.gather(*tasks[:2])
    assert q.waiting(MODEL) == 1 and not tasks[2].done()
    tasks[2].cancel()
    await asyncio.gather(tasks[2], return_exceptions=True)


async def test_lines_of_different_keys_are_independent() -> None:
    q = AdmissionQueue(1, 60)
    busy = Slots(0)
    other = Slots(1)
    waiting = asyncio.ensure_future(q.admit("a", "a", busy.take, refuse))
    await until_waiting(q, "a", 1)
    assert (await q.admit("b", "b", other.take, refuse)).slot == "slot"
    q.wake("b")  # a slot of another model: the line of "a" does not look
    await asyncio.sleep(0)
    assert busy.looks == 2  # on arrival and once as the head
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)


async def test_a_failing_take_leaves_the_line_and_passes_the_turn() -> None:
    q = AdmissionQueue(4, 60)
    calls = 0

    async def broken() -> str | None:
        nonlocal calls
        calls += 1
        if calls > 2:
            raise RbeeError("HIVE_UNREACHABLE", "gone")
        return None

    slots = Slots(0)
    first = asyncio.ensure_future(q.admit(MODEL, MODEL, broken, refuse))
    await until_waiting(q, MODEL, 1)
    second = asyncio.ensure_future(q.admit(MODEL, MODEL, slots.take, refuse))
    await until_waiting(q, MODEL, 2)
    slots.free = 1  # for the second: the first's look fails before it gets there
    q.wake(MODEL)
    with pytest.raises(RbeeError) as err:
        await first
    assert err.value.code == "HIVE_UNREACHABLE"
    assert (await second).queued  # the first's leaving passed the turn on


async def test_waiters_are_told_when_they_move_up() -> None:
    q = AdmissionQueue(8, 60)
    slots = Slots(0)
    told: dict[int, list[tuple[int, int]]] = {0: [], 1: [], 2: []}
    tasks = []
    for i in range(3):
        tasks.append(asyncio.ensure_future(q.admit(MODEL, MODEL, slots.take, refuse,
                                                   lambda p, i=i: told[i].append((p.position, p.length)))))  # fmt: skip
        await until_waiting(q, MODEL, i + 1)
    tasks[0].cancel()
    await asyncio.gather(tasks[0], return_exceptions=True)
    await until_waiting(q, MODEL, 2)
    for _ in range(10):
        await asyncio.sleep(0)
    assert told == {0: [(1, 1)], 1: [(2, 2), (1, 2)], 2: [(3, 3), (2, 2)]}
    for t in tasks[1:]:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
