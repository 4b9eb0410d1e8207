"""The reconcile loop's decisions (rbee_queen/replicas.py) and the deployments
table (rbee_queen/deployments.py, a real SQLite file)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from rbee.backends import backend_enum
from rbee.errors import RbeeError
from rbee.v1 import common_pb2

from rbee_queen.deployments import MAX_REPLICAS, Deployment, DeploymentStore, validate
from rbee_queen.nodes.store import NodeStore
from rbee_queen.placement import NodeView
from rbee_queen.replicas import Backoff, Replica, allowed_nodes, extras, place_replica, replicas_of
from rbee_queen.survey import same_model

S = common_pb2.WorkerState
GiB = 1024**3
REF = "hf:org/model"


def worker(wid: str, state: int = S.WORKER_STATE_IDLE, ref: str = REF, backend: str = "cpu") -> common_pb2.WorkerInfo:
    return common_pb2.WorkerInfo(id=wid, model_ref=ref, state=state, backend=backend_enum(backend))


def test_replicas_are_live_workers_of_the_model_and_backend_on_allowed_nodes() -> None:
    d = Deployment(REF, 2, ("a", "b"))
    pairs = [("a", worker("w1")), ("b", worker("w2", S.WORKER_STATE_LOADING)), ("b", worker("w3", S.WORKER_STATE_BUSY)),
             ("a", worker("w4", S.WORKER_STATE_DRAINING)), ("a", worker("w5", S.WORKER_STATE_FAILED)),
             ("c", worker("w6")), ("a", worker("w7", ref="hf:org/other")), ("a", worker("w8", backend="cuda")),
             ("a", worker("w9", ref="hf:org/model@main"))]  # fmt: skip
    found = replicas_of(d, ["a", "b"], pairs, same_model)
    assert [r.worker_id for r in found] == ["w1", "w2", "w3"]


def test_allowed_nodes_are_the_named_ones_still_registered_else_all() -> None:
    assert allowed_nodes(Deployment(REF, 1), ["a", "b"]) == ["a", "b"]
    assert allowed_nodes(Deployment(REF, 1, ("b", "gone")), ["a", "b"]) == ["b"]
    assert allowed_nodes(Deployment(REF, 1, ("gone",)), ["a", "b"]) == []


def nodes() -> list[NodeView]:
    return [NodeView("a", True, 10 * GiB, 3 * GiB), NodeView("b", True, 8 * GiB, 3 * GiB),
            NodeView("small", True, 2 * GiB, 3 * GiB), NodeView("down", False, problem="HIVE_UNREACHABLE")]  # fmt: skip


def test_a_replica_goes_where_fewest_replicas_run_then_most_free_memory() -> None:
    first = place_replica(REF, nodes(), Counter())
    assert first.node == "a"
    assert first.narration().startswith("Placed on a: fits, 7.0 GiB to spare, none of its replicas there yet; b: fits")
    assert "small: short by 1.0 GiB" in first.narration() and "down: unreachable (HIVE_UNREACHABLE)" in first.narration()
    # a has one: the next spreads to b though a has more free memory.
    second = place_replica(REF, nodes(), Counter({"a": 1}))
    assert second.node == "b"
    third = place_replica(REF, nodes(), Counter({"a": 1, "b": 1}))
    assert third.node == "a" and "1 replica of it there already" in third.why


def test_a_node_that_holds_the_model_wins_a_tie_in_replicas() -> None:
    views = [NodeView("a", True, 10 * GiB, 3 * GiB), NodeView("b", True, 8 * GiB, 3 * GiB, holds_model=True)]
    assert place_replica(REF, views, Counter()).node == "b"


def test_no_node_fits_names_every_node() -> None:
    with pytest.raises(RbeeError) as caught:
        place_replica(REF, [NodeView("small", True, 2 * GiB, 3 * GiB), NodeView("down", False)], Counter())
    assert caught.value.code == "NO_NODE_FITS"
    assert "small: short by 1.0 GiB" in caught.value.message and "down: unreachable" in caught.value.message


def test_extras_are_never_busy_and_come_off_the_most_loaded_node_first() -> None:
    running = [Replica("a", "w1", S.WORKER_STATE_IDLE), Replica("a", "w2", S.WORKER_STATE_BUSY),
               Replica("a", "w3", S.WORKER_STATE_LOADING), Replica("b", "w4", S.WORKER_STATE_IDLE)]  # fmt: skip
    assert extras(running, 4) == []
    assert [r.worker_id for r in extras(running, 3)] == ["w3"]
    # Two to go: a loses one (then a and b are even), the next comes off either, never w2.
    two = extras(running, 2)
    assert len(two) == 2 and "w2" not in {r.worker_id for r in two} and two[0].worker_id == "w3"
    # Everything busy: nothing is stopped.
    assert extras([Replica("a", "w", S.WORKER_STATE_BUSY)] * 3, 1) == []


def test_backoff_first_fill_at_once_then_doubling_to_the_cap_and_reset_when_stable() -> None:
    b = Backoff(base_s=1, cap_s=8, reset_after_s=30)
    assert b.due(0)
    b.started(0)  # the first fill
    assert b.streak == 0 and not b.due(0.5) and b.due(1)
    b.complete(2)
    waits = []
    now = 10.0
    for _ in range(6):  # crash, restart, crash again before it was stable for 30 s ...
        waits.append(b.lost(now))
        now = b.not_before
        assert b.due(now)
        b.started(now)
        b.complete(now + 1)
        now += 2
    assert waits == [1, 2, 4, 8, 8, 8]
    # Complete for reset_after: the next loss waits the base again.
    b.complete(now + 100)
    assert b.lost(now + 101) == 1


def test_backoff_a_worker_that_dies_while_loading_is_not_restarted_at_once() -> None:
    b = Backoff(base_s=1, cap_s=60, reset_after_s=60)
    b.started(0)
    b.started(1)  # it died while loading: no complete in between
    assert b.streak == 1 and not b.due(2.9) and b.due(3)


def test_validate_bounds_every_field() -> None:
    d = validate(REF, 2, [" a", "b", "a"], "")
    assert d == Deployment(REF, 2, ("a", "b"), "cpu")
    for args, field in [((REF, 0, [], "cpu"), "replicas"), ((REF, MAX_REPLICAS + 1, [], "cpu"), "replicas"),
                        ((REF, 1, ["x"] * 65, "cpu"), "nodes"), ((REF, 1, ["../etc"], "cpu"), "nodes")]:  # fmt: skip
        with pytest.raises(RbeeError) as caught:
            validate(*args)
        assert caught.value.code == "INVALID_ARGUMENT" and caught.value.details["field"] == field
    with pytest.raises(RbeeError) as caught:
        validate("hf:" + "a" * 2000 + "/b", 1, [], "cpu")
    assert caught.value.code == "INVALID_MODEL_REF"
    with pytest.raises(RbeeError) as caught:
        validate(REF, 1, [], "tpu")
    assert caught.value.code == "INVALID_BACKEND"


def test_the_wish_outlives_the_store_and_a_redeploy_keeps_its_creation_time(tmp_path: Path) -> None:
    db = tmp_path / "beehives.db"
    NodeStore(db).close()  # the node registry's file, as the queen has it
    store = DeploymentStore(db)
    stored, replaced = store.put(Deployment(REF, 2, ("a", "b")))
    assert not replaced and stored.created_at_unix > 0
    store.close()
    again = DeploymentStore(db)
    assert again.list() == [stored]
    changed, replaced = again.put(Deployment(REF, 3))
    assert replaced and changed.created_at_unix == stored.created_at_unix and changed.replicas == 3 and changed.nodes == ()
    assert again.remove(REF) == changed and again.list() == []
    with pytest.raises(RbeeError) as caught:
        again.remove(REF)
    assert caught.value.code == "DEPLOYMENT_NOT_FOUND" and "rbee-keeper models list --deployed" in caught.value.suggestions[0]
    again.close()


def test_a_registry_of_the_previous_schema_gains_the_deployments_table_and_keeps_the_rest(tmp_path: Path) -> None:
    import sqlite3

    from rbee_queen.nodes.store import MIGRATIONS, NodeRecord

    db = tmp_path / "beehives.db"
    with sqlite3.connect(db) as conn:
        for step in MIGRATIONS[:3]:
            for statement in step:
                conn.execute(statement)
        conn.execute("INSERT INTO nodes (name, transport, install_path, hive_key, created_at_unix) VALUES ('old', 'ssh', '/opt/rbee', 'k', 1)")
        conn.execute("PRAGMA user_version=3")
    store = DeploymentStore(db)
    nodes = NodeStore(db)
    try:
        store.put(Deployment(REF, 1, ("old",)))
        assert nodes.get("old").install_path == "/opt/rbee" and [d.nodes for d in store.list()] == [("old",)]
        nodes.add(NodeRecord(name="new", transport="local", install_path="/opt/rbee", hive_key="k2"))
    finally:
        store.close()
        nodes.close()
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS) == 4
