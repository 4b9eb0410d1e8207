"""Placement (rbee_queen/placement.py): warm before cold, a burst spread by
the dispatched count, fit per node, ties, pinning."""

from __future__ import annotations

from collections import Counter

import pytest

from rbee.errors import RbeeError
from rbee.fit import GiB
from rbee_queen.placement import NodeView, Placement, WarmView, place

MODEL = "hf:org/model"


def test_a_warm_worker_on_b_wins_over_a_cold_start_on_a() -> None:
    nodes = [NodeView("a", True, 20 * GiB, 2 * GiB, holds_model=True), NodeView("b", True, 3 * GiB, 2 * GiB)]
    warm = [WarmView("b", "w-b", slots_total=8, slots_free=5)]
    chosen = place(MODEL, nodes, warm)
    assert (chosen.node, chosen.worker_id) == ("b", "w-b")
    assert chosen.narration().startswith("Placed on b: warm worker w-b (5/8 slots free)")
    assert "a: fits, 18.0 GiB to spare" in chosen.narration()


def test_a_burst_of_16_splits_evenly_over_two_warm_workers() -> None:
    nodes = [NodeView("a", True, 8 * GiB, GiB), NodeView("b", True, 8 * GiB, GiB)]
    dispatched: Counter[str] = Counter()
    for _ in range(16):
        warm = [WarmView(n, f"w-{n}", 8, 8, dispatched[f"w-{n}"]) for n in ("a", "b")]
        chosen = place(MODEL, nodes, warm)
        dispatched[chosen.worker_id] += 1
    assert dispatched == {"w-a": 8, "w-b": 8}


def test_without_the_dispatched_count_a_burst_lands_on_one_worker() -> None:
    # The counter is what spreads it: with the last load report alone every
    # request sees the same figures and picks the same worker.
    nodes = [NodeView("a", True, 8 * GiB, GiB), NodeView("b", True, 8 * GiB, GiB)]
    picks = {place(MODEL, nodes, [WarmView(n, f"w-{n}", 8, 8) for n in ("a", "b")]).worker_id for _ in range(16)}
    assert len(picks) == 1


def test_full_warm_workers_give_way_to_a_cold_start() -> None:
    nodes = [NodeView("a", True, 8 * GiB, GiB)]
    chosen = place(MODEL, nodes, [WarmView("a", "w", 2, 1, dispatched=1)])
    assert chosen.worker_id == "" and chosen.node == "a"


def test_a_model_too_big_for_a_goes_to_b_and_the_table_names_both() -> None:
    nodes = [NodeView("a", True, 1 * GiB, 3 * GiB, holds_model=True), NodeView("b", True, 6 * GiB + GiB // 10, 3 * GiB),
             NodeView("c", False, problem="hive does not answer")]  # fmt: skip
    chosen = place(MODEL, nodes)
    assert chosen == Placement("b", "", "fits, 3.1 GiB to spare", chosen.table)
    assert chosen.narration() == "Placed on b: fits, 3.1 GiB to spare; a: short by 2.0 GiB; c: unreachable (hive does not answer)"


def test_a_node_holding_the_model_comes_before_a_roomier_one() -> None:
    nodes = [NodeView("big", True, 30 * GiB, GiB), NodeView("holder", True, 4 * GiB, GiB, holds_model=True)]
    chosen = place(MODEL, nodes)
    assert chosen.node == "holder" and chosen.why == "fits, 3.0 GiB to spare, holds the model"


@pytest.mark.parametrize(
    ("nodes", "expected"),
    [
        ([NodeView("a", True, 4 * GiB, GiB), NodeView("b", True, 5 * GiB, GiB)], "b"),  # more free memory
        ([NodeView("a", True, 4 * GiB, GiB, workers=2), NodeView("b", True, 4 * GiB, GiB, workers=1)], "b"),  # fewer workers
        ([NodeView("b", True, 4 * GiB, GiB), NodeView("a", True, 4 * GiB, GiB)], "a"),  # then the name
    ],
)
def test_ties(nodes: list[NodeView], expected: str) -> None:
    assert place(MODEL, nodes).node == expected


def test_warm_ties_go_to_the_less_loaded_worker() -> None:
    nodes = [NodeView("a", True, 4 * GiB, GiB), NodeView("b", True, 4 * GiB, GiB)]
    warm = [WarmView("a", "w-a", 8, 2), WarmView("b", "w-b", 4, 3)]
    assert place(MODEL, nodes, warm).worker_id == "w-b"  # 1/4 busy against 6/8


def test_nothing_fits_is_no_node_fits_with_the_table() -> None:
    nodes = [NodeView("a", True, GiB, 3 * GiB), NodeView("b", False)]
    with pytest.raises(RbeeError) as caught:
        place(MODEL, nodes)
    err = caught.value
    assert err.code == "NO_NODE_FITS"
    assert "a: short by 2.0 GiB; b: unreachable" in err.message
    assert any("rbee-keeper models fit hf:org/model" in s for s in err.suggestions)


def test_a_pinned_node_that_cannot_fit_fails_with_the_table() -> None:
    nodes = [NodeView("a", True, GiB, 3 * GiB), NodeView("b", True, 9 * GiB, 3 * GiB)]
    with pytest.raises(RbeeError) as caught:
        place(MODEL, nodes, pinned="a")
    assert caught.value.code == "NO_NODE_FITS" and caught.value.details["node"] == "a"
    assert "does not fit on node a: a: short by 2.0 GiB" in caught.value.message
    assert place(MODEL, nodes, pinned="b").node == "b"


def test_a_pinned_node_keeps_its_warm_worker_and_ignores_others() -> None:
    nodes = [NodeView("a", True, 9 * GiB, GiB), NodeView("b", True, 9 * GiB, GiB)]
    warm = [WarmView("a", "w-a", 8, 8), WarmView("b", "w-b", 8, 1)]
    assert place(MODEL, nodes, warm, pinned="b").worker_id == "w-b"


def test_an_unknown_pinned_node_is_node_not_found() -> None:
    with pytest.raises(RbeeError) as caught:
        place(MODEL, [NodeView("a", True, GiB, GiB)], pinned="zz")
    assert caught.value.code == "NODE_NOT_FOUND"


def test_unknown_figures_do_not_rule_a_node_out() -> None:
    chosen = place(MODEL, [NodeView("a", True, None, GiB)])
    assert chosen.node == "a" and chosen.why == "fit unknown"


def test_the_dispatched_count_lasts_until_the_workers_next_load_report() -> None:
    from rbee.v1 import common_pb2

    from rbee_queen.survey import Dispatched

    counts = Dispatched()
    worker = common_pb2.WorkerInfo(id="w", slots_total=8, slots_available=8, last_activity_unix_ms=1)
    counts.add(worker)
    counts.add(worker)
    assert counts.pending(worker) == 2
    # The worker reports its load: what was dispatched is in its figures now.
    reported = common_pb2.WorkerInfo(id="w", slots_total=8, slots_available=6, last_activity_unix_ms=2)
    assert counts.pending(reported) == 0
    counts.add(reported)
    assert counts.pending(reported) == 1
    assert counts.pending(common_pb2.WorkerInfo(id="other")) == 0
