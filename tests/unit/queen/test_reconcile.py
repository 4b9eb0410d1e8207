"""The reconcile loop's steps (rbee_queen/reconcile.py) with the hives faked:
real deployments and node tables (SQLite files), a real worker registry fed
as the hives' change streams feed it, and a Reconciler whose survey, start
and stop of workers are replaced by a fake cluster."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path
from types import SimpleNamespace

import pytest

from rbee.errors import RbeeError
from rbee.v1 import common_pb2, registry_pb2, replicas_pb2

from rbee_queen.deployments import DeploymentStore
from rbee_queen.nodes.store import NodeRecord, NodeStore
from rbee_queen.reconcile import Reconciler, ReplicaPolicy
from rbee_queen.survey import Dispatched, NodeFigures
from rbee_queen.workers import ClusterWorkers

S = common_pb2.WorkerState
REF = "hf:org/model"
COMPLETE, RESTARTING = replicas_pb2.Deployment.STATE_COMPLETE, replicas_pb2.Deployment.STATE_RESTARTING
GiB = 1024**3


class FakeCluster(Reconciler):
    """What the hives would answer: per node its workers, or an error; starts and stops recorded."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.hive_workers: dict[str, list[common_pb2.WorkerInfo]] = {}
        self.unreachable: set[str] = set()
        self.started: list[str] = []
        self.stopped: list[str] = []
        self.fail_start: RbeeError | None = None
        self._ids = itertools.count(1)

    async def survey(self, record, ref, relay) -> NodeFigures:
        if record.name in self.unreachable:
            return NodeFigures(record, error="HIVE_UNREACHABLE")
        free = {"a": 10 * GiB, "b": 8 * GiB}.get(record.name, GiB)
        return NodeFigures(record, free_bytes=free, workers=list(self.hive_workers.get(record.name, [])))

    async def start_worker(self, record, d, relay) -> registry_pb2.WorkerAccess:
        if self.fail_start is not None:
            raise self.fail_start
        w = common_pb2.WorkerInfo(id=f"w{next(self._ids)}", model_ref=d.model_ref, backend=common_pb2.BACKEND_CPU, state=S.WORKER_STATE_LOADING)
        self.hive_workers.setdefault(record.name, []).append(w)
        self.started.append(f"{record.name}/{w.id}")
        return registry_pb2.WorkerAccess(worker=w)

    async def stop_worker(self, record, worker_id) -> None:
        self.stopped.append(f"{record.name}/{worker_id}")

    def report(self, node: str, state: int = S.WORKER_STATE_IDLE) -> None:
        """The node's hive streams its workers (a snapshot) to the registry."""
        workers = [common_pb2.WorkerInfo(id=w.id, model_ref=w.model_ref, backend=common_pb2.BACKEND_CPU, state=state) for w in self.hive_workers.get(node, [])]
        self.registry.apply(node, f"127.0.0.1:{node}", registry_pb2.WatchWorkersResponse(snapshot=True, hive_instance=node, seq=1, workers=workers))


class Lines(list):
    def __call__(self, emoji: str, message: str, level: str = "info") -> None:
        self.append(f"{emoji} {message}")

    def having(self, text: str) -> list[str]:
        return [line for line in self if text in line]


@pytest.fixture
def cluster(tmp_path: Path):
    db = tmp_path / "beehives.db"
    nodes = NodeStore(db)
    for name in ("a", "b"):
        nodes.add(NodeRecord(name=name, transport="local", install_path="/opt/rbee", hive_key="k" * 32))
    deployments = DeploymentStore(db)
    lines = Lines()
    runner = SimpleNamespace(dispatched=Dispatched(), nodes=None)
    watchers = SimpleNamespace(ensure=lambda name: None)
    fake = FakeCluster(deployments, nodes, runner, ClusterWorkers(120.0), watchers, lines,
                       ReplicaPolicy(interval_s=0.05, backoff_base_s=0.05, backoff_max_s=0.2))  # fmt: skip
    fake.lines = lines
    yield fake
    deployments.close()
    nodes.close()


async def deploy(c: FakeCluster, replicas: int, *nodes: str) -> None:
    await c.deploy(replicas_pb2.DeployModelRequest(model_ref=REF, replicas=replicas, nodes=list(nodes)))


async def test_a_deploy_starts_the_replicas_spread_over_the_nodes(cluster: FakeCluster) -> None:
    await deploy(cluster, 3)
    [d] = cluster.deployments.list()
    await cluster.reconcile(d)
    assert cluster.started == ["a/w1", "b/w2", "a/w3"]
    assert cluster.lines.having("🧭 Replica 1/3 of hf:org/model: Placed on a: fit unknown, none of its replicas there yet; b: fit unknown")
    assert cluster.lines.having("🚀 Replica 3/3 of hf:org/model: worker w3 started on a")


async def test_a_registry_that_lags_the_hives_starts_nothing(cluster: FakeCluster) -> None:
    """A queen that has just started: its registry is empty, the hives run the replicas."""
    await deploy(cluster, 2)
    cluster.hive_workers = {"a": [common_pb2.WorkerInfo(id="old1", model_ref=REF, backend=common_pb2.BACKEND_CPU, state=S.WORKER_STATE_IDLE)],
                            "b": [common_pb2.WorkerInfo(id="old2", model_ref=REF, backend=common_pb2.BACKEND_CPU, state=S.WORKER_STATE_BUSY)]}  # fmt: skip
    [d] = cluster.deployments.list()
    await cluster.reconcile(d)
    assert cluster.started == []


async def test_a_lost_replica_is_restarted_after_the_backoff_and_the_wait_doubles(cluster: FakeCluster) -> None:
    await deploy(cluster, 2)
    [d] = cluster.deployments.list()
    await cluster.reconcile(d)
    cluster.report("a"), cluster.report("b")
    await cluster.reconcile(d)
    assert cluster.describe(d).current_state == COMPLETE
    for attempt in (1, 2):
        cluster.hive_workers["a"] = []  # a's replica crashed; its hive says so
        cluster.report("a")
        await cluster.reconcile(d)
        assert cluster.lines.having(f"replicas running; starting another in ") and cluster.lines[-1].endswith(f"(attempt {attempt})")
        assert cluster.lines.having("💀 Replica w1 of hf:org/model on a is gone")
        started = len(cluster.started)
        await cluster.reconcile(d)  # before the wait is over: nothing
        assert len(cluster.started) == started and cluster.describe(d).current_state == RESTARTING
        assert cluster.describe(d).state_detail.startswith("in ")
        await asyncio.sleep(cluster.policy.backoff_base_s * 2**attempt)
        await cluster.reconcile(d)
        assert len(cluster.started) == started + 1 and cluster.started[-1].startswith("a/")
        cluster.report("a")
        await cluster.reconcile(d)
        assert cluster.describe(d).current_state == COMPLETE
    assert cluster._tracks[REF].backoff.streak == 2


async def test_an_unreachable_node_keeps_its_replica_until_the_registry_drops_it(cluster: FakeCluster) -> None:
    await deploy(cluster, 2)
    [d] = cluster.deployments.list()
    await cluster.reconcile(d)
    cluster.report("a"), cluster.report("b")
    cluster.unreachable.add("b")
    await cluster.reconcile(d)
    assert cluster.started == ["a/w1", "b/w2"]
    cluster.registry.sweep(now=10**9)  # b not heard from beyond the stale window
    await asyncio.sleep(cluster.policy.backoff_base_s * 2)
    await cluster.reconcile(d)  # the loss, then the wait
    await asyncio.sleep(cluster.policy.backoff_base_s * 2)
    await cluster.reconcile(d)
    assert cluster.started == ["a/w1", "b/w2", "a/w3"]
    assert cluster.lines.having("Placed on a: fit unknown, 1 replica of it there already; b: unreachable (HIVE_UNREACHABLE)")


async def test_a_failed_start_is_narrated_kept_for_the_list_and_tried_again_later(cluster: FakeCluster) -> None:
    await deploy(cluster, 1, "b")
    cluster.fail_start = RbeeError("INSUFFICIENT_RAM", "Not enough RAM on b")
    [d] = cluster.deployments.list()
    await cluster.reconcile(d)
    assert cluster.lines.having("⚠️ hf:org/model: replica 1/1 did not start on b: INSUFFICIENT_RAM: Not enough RAM on b; trying again in")
    shown = cluster.describe(d)
    assert shown.last_error == "INSUFFICIENT_RAM: Not enough RAM on b" and shown.nodes == ["b"]
    await cluster.reconcile(d)  # within the backoff: no second attempt
    assert len(cluster.lines.having("did not start")) == 1
    cluster.fail_start = None
    await asyncio.sleep(cluster.policy.backoff_base_s * 2)
    await cluster.reconcile(d)
    assert cluster.started == ["b/w1"]


async def test_extras_stop_and_their_going_is_no_loss(cluster: FakeCluster) -> None:
    await deploy(cluster, 3)
    [d] = cluster.deployments.list()
    await cluster.reconcile(d)
    cluster.report("a"), cluster.report("b")
    await cluster.reconcile(d)
    await deploy(cluster, 1)  # fewer now
    [d] = cluster.deployments.list()
    await cluster.reconcile(d)
    assert sorted(cluster.stopped) == ["a/w1", "a/w3"]  # off a, which had two
    assert len(cluster.lines.having("📉 hf:org/model: 3 replicas run, 1 wanted: stopping")) == 2
    for node in ("a", "b"):
        cluster.hive_workers[node] = [w for w in cluster.hive_workers[node] if f"{node}/{w.id}" not in cluster.stopped]
        cluster.report(node)
    await cluster.reconcile(d)
    assert not cluster.lines.having("is gone") and cluster.describe(d).current_state == COMPLETE


async def test_undeploy_forgets_the_wish_and_stops_the_workers(cluster: FakeCluster) -> None:
    await deploy(cluster, 2)
    [d] = cluster.deployments.list()
    await cluster.reconcile(d)
    cluster.report("a"), cluster.report("b")
    reply = await cluster.undeploy(replicas_pb2.UndeployModelRequest(model_ref=REF))
    assert sorted(reply.stopped) == ["a/w1", "b/w2"] and cluster.deployments.list() == []
    with pytest.raises(RbeeError) as caught:
        await cluster.undeploy(replicas_pb2.UndeployModelRequest(model_ref=REF))
    assert caught.value.code == "DEPLOYMENT_NOT_FOUND"


async def test_deploy_on_an_unknown_node_is_refused(cluster: FakeCluster) -> None:
    with pytest.raises(RbeeError) as caught:
        await deploy(cluster, 1, "nowhere")
    assert caught.value.code == "NODE_NOT_FOUND" and cluster.deployments.list() == []


async def test_an_unexpected_failure_is_kept_for_the_list_and_backs_off(cluster: FakeCluster) -> None:
    calls = []

    async def broken(record, ref, relay):
        calls.append(record.name)
        raise RuntimeError("hive answered nonsense")

    cluster.survey = broken
    await deploy(cluster, 1, "a")
    [d] = cluster.deployments.list()
    await cluster._guarded(d)
    assert calls == ["a"] and cluster.describe(d).last_error == "RuntimeError: hive answered nonsense"
    await cluster._guarded(d)  # within the backoff: not tried again
    assert calls == ["a"]
