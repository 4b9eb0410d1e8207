"""Keep-alive bookkeeping (rbee_queen/keepalive.py) and the eviction choice
(rbee_queen/eviction.py), on a fake clock and a fake registry; the real
processes are tests/integration/test_idle_memory.py."""

from __future__ import annotations

import asyncio
import contextlib
import math

import pytest

from rbee.errors import RbeeError
from rbee.v1 import common_pb2, provisioning_pb2, tasks_pb2
from rbee_queen.eviction import Candidate, Evictor, Plan, choose_node, credit, lru_choice
from rbee_queen.keepalive import HANDOFF_GRACE_S, NEVER, KeepAlive, describe, parse_keep_alive
from rbee_queen.nodes.store import NodeRecord
from rbee_queen.placement import NodeView
from rbee_queen.survey import NodeFigures

State = common_pb2.WorkerState
GiB = 1024**3
MODEL = "hf:org/model"


class Clock:
    def __init__(self) -> None:
        self.mono = 1000.0
        self.unix = 1_700_000_000.0

    def advance(self, s: float) -> None:
        self.mono += s
        self.unix += s


class Registry:
    """What KeepAlive reads of the queen's worker registry."""

    def __init__(self) -> None:
        self.workers: dict[str, tuple[str, common_pb2.WorkerInfo]] = {}

    def put(self, node: str, wid: str, clock: Clock, state=State.WORKER_STATE_IDLE, busy: int = 0, model: str = MODEL,
            active_s_ago: float = 0.0) -> common_pb2.WorkerInfo:  # fmt: skip
        w = common_pb2.WorkerInfo(id=wid, model_ref=model, state=state, slots_total=4, slots_available=4 - busy,
                                  last_activity_unix_ms=int((clock.unix - active_s_ago) * 1000))  # fmt: skip
        self.workers[wid] = (node, w)
        return w

    def list(self):
        return [tasks_pb2.ClusterWorker(node=n, worker=w) for n, w in self.workers.values()]

    @contextlib.contextmanager
    def listen(self):
        yield asyncio.Event()


def keeper(default_s: float = 300.0) -> tuple[KeepAlive, Registry, Clock, list[tuple[str, str]]]:
    clock, registry, stopped = Clock(), Registry(), []

    async def stop(node: str, wid: str) -> None:
        stopped.append((node, wid))

    ka = KeepAlive(default_s, registry, stop, lambda *a, **k: None, clock=lambda: clock.mono, wall=lambda: clock.unix)
    return ka, registry, clock, stopped


def due_ids(ka: KeepAlive) -> list[str]:
    return [h.worker_id for h, _ in ka.due()[0]]


@pytest.mark.parametrize("value, seconds", [
    ("5m", 300.0), ("30s", 30.0), ("1h30m", 5400.0), ("300ms", 0.3), ("1.5h", 5400.0), ("0", 0.0), (0, 0.0),
    (90, 90.0), (2.5, 2.5), ("45", 45.0), ("-1", NEVER), (-1, NEVER), ("-5m", NEVER), (None, None), ("", None),
])  # fmt: skip
def test_keep_alive_reads_as_ollama_does(value, seconds) -> None:
    assert parse_keep_alive(value) == seconds


@pytest.mark.parametrize("value", ["soon", "5 minutes", "5mm", "m", True, [1], {"a": 1}, "nan", "1d"])
def test_a_keep_alive_that_is_no_duration_has_its_code(value) -> None:
    with pytest.raises(RbeeError) as info:
        parse_keep_alive(value, "--keep-alive")
    assert info.value.code == "INVALID_KEEP_ALIVE" and info.value.details["field"] == "--keep-alive"
    assert "--keep-alive 5m" in info.value.suggestions[0]


def test_describe() -> None:
    assert [describe(s) for s in (0, 0.25, 30, 240, 3900, NEVER)] == ["0s", "250ms", "30s", "4m", "1h5m", "never"]


def test_the_request_the_model_and_the_cluster_decide_in_that_order() -> None:
    ka, *_ = keeper(default_s=300)
    assert ka.keep_for(MODEL, None) == 300
    ka.set_model_keep_alive(MODEL, 60)
    assert ka.keep_for(MODEL, None) == 60 and ka.keep_for(MODEL, 0) == 0
    ka.set_model_keep_alive(MODEL, None)
    assert ka.keep_for(MODEL, None) == 300


def test_a_front_door_request_with_keep_alive_0_stops_its_worker_once_answered_and_idle() -> None:
    ka, reg, clock, _ = keeper()
    reg.put("a", "w1", clock)
    ka.begin("a", "w1", MODEL, 0.0)
    reg.put("a", "w1", clock, State.WORKER_STATE_BUSY, busy=1)
    assert due_ids(ka) == []  # serving
    reg.put("a", "w1", clock)  # the hive reported it idle before the queen's request ended
    assert due_ids(ka) == []
    ka.end("a", "w1", MODEL, 0.0)
    assert due_ids(ka) == ["w1"]


def test_each_request_extends_the_deadline_and_the_last_one_sets_the_keep_alive() -> None:
    ka, reg, clock, _ = keeper()
    reg.put("a", "w1", clock)
    with ka.request("a", "w1", MODEL, 60.0):
        pass
    clock.advance(50)
    with ka.request("a", "w1", MODEL, 60.0):
        pass
    clock.advance(50)
    stop, next_at = ka.due()
    assert stop == [] and next_at == pytest.approx(clock.mono + 10)
    with ka.request("a", "w1", MODEL, NEVER):
        pass
    clock.advance(10**6)
    assert ka.due() == ([], None)
    with ka.request("a", "w1", MODEL, None):  # no keep-alive: the cluster default again
        pass
    clock.advance(299)
    assert due_ids(ka) == []
    clock.advance(1)
    [(held, idle)] = ka.due()[0]
    assert held.worker_id == "w1" and idle == pytest.approx(300) and held.keep_s == 300


def test_a_worker_handed_out_waits_for_its_client_then_follows_its_keep_alive() -> None:
    ka, reg, clock, _ = keeper()
    reg.put("a", "w1", clock, active_s_ago=1000)
    ka.handed("a", "w1", MODEL, 0.0)
    assert ka.in_use("w1") and due_ids(ka) == []  # its client has not called yet
    clock.advance(2)
    reg.put("a", "w1", clock, State.WORKER_STATE_BUSY, busy=1)
    assert due_ids(ka) == []
    clock.advance(1)
    reg.put("a", "w1", clock)  # busy → idle moved its last activity past the hand-out
    assert due_ids(ka) == ["w1"]


def test_a_cold_start_handed_out_while_loading_waits_for_its_request_not_its_readiness() -> None:
    ka, reg, clock, _ = keeper()
    reg.put("a", "w1", clock, State.WORKER_STATE_LOADING)
    ka.handed("a", "w1", MODEL, 0.0)
    clock.advance(1)
    reg.put("a", "w1", clock)  # ready: its hive moved the last activity, no request yet
    assert due_ids(ka) == []
    # The request came and went between two looks: the registry's observer saw it busy.
    ka.observe("a", reg.put("a", "w1", clock, State.WORKER_STATE_BUSY, busy=1))
    reg.put("a", "w1", clock)
    assert due_ids(ka) == ["w1"]


def test_a_hand_out_whose_client_never_comes_counts_as_idle_after_the_grace() -> None:
    ka, reg, clock, _ = keeper()
    reg.put("a", "w1", clock, active_s_ago=1000)
    ka.handed("a", "w1", MODEL, 0.0)
    stop, next_at = ka.due()
    assert stop == [] and next_at == pytest.approx(clock.mono + HANDOFF_GRACE_S)
    clock.advance(HANDOFF_GRACE_S)
    assert not ka.in_use("w1") and due_ids(ka) == ["w1"]


def test_untracked_workers_follow_the_default_from_their_last_activity_and_needed_ones_stay() -> None:
    ka, reg, clock, _ = keeper(default_s=300)
    reg.put("a", "old", clock, active_s_ago=301)
    reg.put("a", "new", clock, active_s_ago=10)
    reg.put("a", "loading", clock, State.WORKER_STATE_LOADING, active_s_ago=1000)
    reg.put("b", "replica", clock, active_s_ago=1000)
    ka.needed = lambda node, w: w.id == "replica"
    stop, next_at = ka.due()
    assert [h.worker_id for h, _ in stop] == ["old"] and next_at == pytest.approx(clock.mono + 290)


def test_a_worker_that_left_the_registry_is_forgotten() -> None:
    ka, reg, clock, _ = keeper()
    reg.put("a", "w1", clock)
    ka.begin("a", "w1", MODEL, 30.0)
    ka.due()
    del reg.workers["w1"]
    ka.due()
    assert "w1" not in ka.held


async def test_the_stopper_stops_an_expired_worker_through_its_hive_and_says_so() -> None:
    clock, reg, stopped, lines = Clock(), Registry(), [], []

    async def stop(node: str, wid: str) -> None:
        stopped.append((node, wid))
        del reg.workers[wid]

    ka = KeepAlive(300, reg, stop, lambda emoji, text, *a: lines.append(text), clock=lambda: clock.mono, wall=lambda: clock.unix)
    reg.put("a", "w1", clock)
    ka.start()
    try:
        with ka.request("a", "w1", MODEL, 0.0):
            pass
        for _ in range(200):
            if stopped and len(lines) == 2:
                break
            await asyncio.sleep(0.01)
    finally:
        await ka.close()
    assert stopped == [("a", "w1")]
    assert lines[0] == f"Keep-alive of worker w1 ({MODEL}) on a ran out (keep-alive 0s, idle 0s): stopping it"
    assert lines[1].startswith("Worker w1") and "stopped" in lines[1]


# -- eviction ---------------------------------------------------------------------


def test_lru_choice_takes_the_longest_idle_first_until_the_estimates_cover_the_shortfall() -> None:
    cands = [Candidate("recent", "m1", 10, 2 * GiB), Candidate("oldest", "m2", 500, 1 * GiB),
             Candidate("older", "m3", 200, 2 * GiB), Candidate("unknown", "m4", 900, None)]  # fmt: skip
    assert [c.worker_id for c in lru_choice(1 * GiB, cands)] == ["oldest"]
    assert [c.worker_id for c in lru_choice(2 * GiB, cands)] == ["oldest", "older"]
    assert [c.worker_id for c in lru_choice(5 * GiB, cands)] == ["oldest", "older", "recent"]
    assert lru_choice(6 * GiB, cands) is None


def test_the_node_needing_fewest_evictions_then_most_free_is_chosen() -> None:
    one = Candidate("w", "m", 1, GiB)
    plans = [Plan("a", 3 * GiB, 1 * GiB, (one, one)), Plan("b", 3 * GiB, 2 * GiB, (one,)), Plan("c", 3 * GiB, 2.5 * GiB, (one,))]
    assert choose_node(plans).node == "c" and choose_node([]) is None


def _figures(node: str, workers: list[common_pb2.WorkerInfo]) -> NodeFigures:
    record = NodeRecord(name=node, transport="local", install_path="/nowhere", hive_key="k")
    entry = lambda ref: provisioning_pb2.ModelEntry(model_ref=ref, size_bytes=GiB, metadata={})  # noqa: E731
    return NodeFigures(record, free_bytes=GiB, workers=workers, models=[entry("hf:org/idle"), entry("hf:org/busy"),
                                                                         entry("hf:org/older")])  # fmt: skip


def test_eviction_never_picks_a_worker_serving_a_request_nor_a_needed_one() -> None:
    ka, reg, clock, _ = keeper()
    idle = reg.put("a", "idle", clock, model="hf:org/idle", active_s_ago=240)
    older = reg.put("a", "older", clock, model="hf:org/older", active_s_ago=900)
    busy = reg.put("a", "busy", clock, State.WORKER_STATE_BUSY, busy=1, model="hf:org/busy", active_s_ago=3000)
    queen_busy = reg.put("a", "queen-busy", clock, model="hf:org/busy", active_s_ago=3000)  # its hive has not said yet
    ka.begin("a", "queen-busy", "hf:org/busy", None)
    ka.needed = lambda node, w: w.id == "older"
    evictor = Evictor(store=None, keepalive=ka)  # type: ignore[arg-type]
    figures = _figures("a", [idle, older, busy, queen_busy])
    cands = evictor.candidates(figures)
    assert [c.worker_id for c in cands] == ["idle"]
    assert cands[0].idle_s == pytest.approx(240, abs=1) and cands[0].bytes and cands[0].bytes > GiB
    view = NodeView("a", True, free_bytes=GiB, need_bytes=3 * GiB, holds_model=False, workers=4)
    plan = evictor.plan([figures], [view])
    assert plan is not None and plan.node == "a" and [c.worker_id for c in plan.evict] == ["idle"]
    # Not enough to evict: no plan.
    assert evictor.plan([figures], [NodeView("a", True, GiB, 100 * GiB)]) is None


def test_credit_raises_the_node_free_memory_by_what_was_freed() -> None:
    views = [NodeView("a", True, GiB, 3 * GiB, workers=2), NodeView("b", False)]
    a, b = credit(views, "a", 2 * GiB, 1)
    assert a.fits and a.free_bytes == 3 * GiB and a.workers == 1 and b == views[1]
    assert math.isinf(NEVER)
