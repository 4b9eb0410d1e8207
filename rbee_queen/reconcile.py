"""The queen's reconcile loop for deployments (docs/queen.md, "Replicas"):
it keeps each deployment's N workers running, with the decisions of
rbee_queen/replicas.py.

It looks at every deployment when the worker registry changes, when a
deployment is made or removed, and every ``interval`` otherwise. A
deployment that looks complete in the registry costs nothing more. One that
looks short is checked against the hives themselves (the survey of a
placement, rbee_queen/survey.py: each allowed node's hive made ready and
asked for its workers and memory), so a queen that has just started and
whose registry is still filling does not start workers that already run. A
node that cannot be surveyed keeps the replicas the registry still shows for
it: they count until the registry drops them (its stale window, the queen's
``worker_stale_after``), and only then are they placed again elsewhere.

Each deployment is worked on by one task at a time, so a slow start (a
download) of one model holds up no other. Every action is one narration line
in the queen's log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from dataclasses import dataclass, field

from rbee.backends import backend_enum, backend_name
from rbee.enum_words import DEPLOYMENT_STATES
from rbee.errors import RbeeError
from rbee.narration import Narrator
from rbee.v1 import registry_pb2, replicas_pb2, tasks_pb2

from rbee_queen.deployments import Deployment, DeploymentStore, canonical_ref, validate
from rbee_queen.hives import HiveLink
from rbee_queen.nodes.store import NodeRecord, NodeStore, node_not_found
from rbee_queen.replicas import READY, Backoff, Replica, allowed_nodes, extras, place_replica, replicas_of
from rbee_queen.survey import LogRelay, NodeFigures, same_model, survey_node, views
from rbee_queen.tasks import TaskRunner
from rbee_queen.workers import ClusterWorkers, HiveWatchers

log = logging.getLogger(__name__)
STOP_TIMEOUT_S = 60.0


def seconds(value: float) -> str:
    return f"{value:.1f}s" if value < 10 else f"{value:.0f}s"


@dataclass(frozen=True)
class ReplicaPolicy:
    interval_s: float = 2.0
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0


@dataclass
class Track:
    """What the loop remembers of one deployment (memory only: a restarted queen starts afresh)."""

    backoff: Backoff
    seen: dict[str, Replica] = field(default_factory=dict)
    # A word of Deployment.State ("starting", "complete", "restarting",
    # "waiting") and its detail for people.
    state: str = "starting"
    detail: str = ""
    last_error: str = ""
    # Workers this queen asked to stop (scale-down): their going is no loss.
    stopping: set[str] = field(default_factory=set)


class Reconciler:
    def __init__(self, deployments: DeploymentStore, store: NodeStore, runner: TaskRunner, registry: ClusterWorkers,
                 watchers: HiveWatchers, narrate: Narrator, policy: ReplicaPolicy | None = None) -> None:  # fmt: skip
        self.deployments = deployments
        self.store = store
        self.runner = runner
        self.registry = registry
        self.watchers = watchers
        self.narrate = narrate
        self.policy = policy or ReplicaPolicy()
        self._tracks: dict[str, Track] = {}
        self._work: dict[str, asyncio.Task] = {}
        self._wake = asyncio.Event()
        self._loop: asyncio.Task | None = None

    # -- what it does to the hives (seams a unit test replaces) ---------------

    async def survey(self, record: NodeRecord, ref: str, relay: LogRelay) -> NodeFigures:
        return await survey_node(self.runner.nodes, record, ref, relay)

    async def start_worker(self, record: NodeRecord, d: Deployment, relay: LogRelay) -> registry_pb2.WorkerAccess:
        request = tasks_pb2.SubmitInferenceRequest(model_ref=d.model_ref, backend=backend_enum(d.backend))
        async with HiveLink(record) as link:
            return await self.runner._start(link, record, d.model_ref, d.backend, request, relay)

    async def stop_worker(self, record: NodeRecord, worker_id: str) -> None:
        async with HiveLink(record) as link:
            await link.call(link.workers.ShutdownWorker, registry_pb2.ShutdownWorkerRequest(worker_id=worker_id),
                            timeout=STOP_TIMEOUT_S)  # fmt: skip

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        wished = self.deployments.list()
        if wished:
            self.narrate("📌", f"Keeping {len(wished)} deployment(s): " + ", ".join(f"{d.model_ref} ×{d.replicas}" for d in wished))
        self._loop = asyncio.ensure_future(self._run())

    async def close(self) -> None:
        tasks = [t for t in (self._loop, *self._work.values()) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task

    def wake(self) -> None:
        self._wake.set()

    async def _run(self) -> None:
        with self.registry.listen() as changed:
            while True:
                try:
                    self._round()
                except RbeeError as err:
                    log.warning("reconcile: deployments not read: %s", err)
                waits = [asyncio.ensure_future(e.wait()) for e in (changed, self._wake)]
                try:
                    await asyncio.wait(waits, timeout=self._next_look(), return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for w in waits:
                        w.cancel()
                changed.clear()
                self._wake.clear()

    def _next_look(self) -> float:
        """Seconds to the next look: the interval, or sooner when a backoff ends."""
        now = time.monotonic()
        due = [t.backoff.not_before - now for t in self._tracks.values() if t.backoff.not_before > now]
        return max(0.05, min([self.policy.interval_s, *due]))

    def _round(self) -> None:
        wished = {d.model_ref: d for d in self.deployments.list()}
        for ref in set(self._tracks) - set(wished):
            self._tracks.pop(ref, None)
        for ref in [r for r, t in self._work.items() if r not in wished and t.done()]:
            del self._work[ref]
        for ref, d in wished.items():
            task = self._work.get(ref)
            if task is None or task.done():
                self._work[ref] = asyncio.ensure_future(self._guarded(d))

    async def _guarded(self, d: Deployment) -> None:
        try:
            await self.reconcile(d)
        except asyncio.CancelledError:
            raise
        except Exception as err:  # noqa: BLE001 - one deployment's trouble never stops the loop
            log.exception("reconcile of %s failed", d.model_ref)
            track = self._track(d)
            track.last_error = f"{type(err).__name__}: {err}"
            track.backoff.started(time.monotonic())  # not again at the next look

    # -- one deployment --------------------------------------------------------

    def _track(self, d: Deployment) -> Track:
        if d.model_ref not in self._tracks:
            p = self.policy
            self._tracks[d.model_ref] = Track(Backoff(p.backoff_base_s, p.backoff_max_s, p.backoff_max_s))
        return self._tracks[d.model_ref]

    def _registered(self) -> list[str]:
        return [r.name for r in self.store.list()]

    def running(self, d: Deployment, allowed: list[str]) -> list[Replica]:
        pairs = [(c.node, c.worker) for c in self.registry.list()]
        return replicas_of(d, allowed, pairs, same_model)

    async def reconcile(self, d: Deployment) -> None:
        track = self._track(d)
        now = time.monotonic()
        allowed = allowed_nodes(d, self._registered())
        running = self.running(d, allowed)
        self._note_losses(d, track, running)
        if len(running) >= d.replicas:
            track.backoff.complete(now)
            track.state, track.detail, track.last_error = "complete", "", ""
            if len(running) > d.replicas:
                await self._scale_down(d, track, running)
            return
        if not allowed:
            track.state = "waiting"
            track.detail = (f"none of its nodes ({', '.join(d.nodes)}) is registered" if d.nodes
                            else "no node is registered (`rbee-keeper setup add-node --name NAME --local`)")
            return
        if track.backoff.complete_since is not None:
            wait = track.backoff.lost(now)
            self.narrate("🔁", f"{d.model_ref}: {len(running)}/{d.replicas} replicas running; starting another in "
                         f"{seconds(wait)} (attempt {track.backoff.attempt})", "warn")  # fmt: skip
        if not track.backoff.due(now):
            track.state = "restarting"
            track.detail = f"in {seconds(track.backoff.not_before - now)} (attempt {track.backoff.attempt})"
            return
        track.state, track.detail = "starting", ""
        await self._fill(d, track, allowed)

    def _note_losses(self, d: Deployment, track: Track, running: list[Replica]) -> None:
        now_ids = {r.worker_id for r in running}
        for wid, r in track.seen.items():
            if wid not in now_ids and wid not in track.stopping:
                self.narrate("💀", f"Replica {r.worker_id} of {d.model_ref} on {r.node} is gone", "warn")
        track.stopping &= {r.worker_id for r in track.seen.values()} & now_ids
        track.seen = {r.worker_id: r for r in running}

    async def _fill(self, d: Deployment, track: Track, allowed: list[str]) -> None:
        """Survey the allowed nodes, then start the replicas still missing there."""
        relay = LogRelay(self.narrate)
        records = [self.store.get(name) for name in allowed]
        surveyed = await asyncio.gather(*(self.survey(r, d.model_ref, relay) for r in records))
        registry = self.running(d, allowed)
        per_node: Counter = Counter()
        for f in surveyed:
            if f.error:  # not surveyed: what the registry still holds for it counts until it drops it
                per_node[f.record.name] = sum(1 for r in registry if r.node == f.record.name)
            else:
                self.watchers.ensure(f.record.name)
                pairs = [(f.record.name, w) for w in f.workers]
                per_node[f.record.name] = len(replicas_of(d, allowed, pairs, same_model))
        have = sum(per_node.values())
        if have >= d.replicas:
            return  # the registry lagged the hives
        track.backoff.started(time.monotonic())
        for i in range(have + 1, d.replicas + 1):
            nodes = views(surveyed, d.model_ref, d.backend, 0, 0, self.runner.dispatched)[0]
            try:
                chosen = place_replica(d.model_ref, nodes, per_node)
            except RbeeError as err:
                self._failed(d, track, err, f"replica {i}/{d.replicas} not placed")
                return
            self.narrate("🧭", f"Replica {i}/{d.replicas} of {d.model_ref}: {chosen.narration()}")
            record = next(r for r in records if r.name == chosen.node)
            try:
                access = await self.start_worker(record, d, relay)
            except RbeeError as err:
                self._failed(d, track, err, f"replica {i}/{d.replicas} did not start on {record.name}")
                return
            per_node[record.name] += 1
            self.narrate("🚀", f"Replica {i}/{d.replicas} of {d.model_ref}: worker {access.worker.id} started on {record.name}")
        track.last_error = ""

    def _failed(self, d: Deployment, track: Track, err: RbeeError, what: str) -> None:
        track.last_error = f"{err.code}: {err.message}"
        wait = max(0.0, track.backoff.not_before - time.monotonic())
        self.narrate("⚠️", f"{d.model_ref}: {what}: {err.code}: {err.message}; trying again in {seconds(wait)}", "warn")

    async def _scale_down(self, d: Deployment, track: Track, running: list[Replica]) -> None:
        for r in extras(running, d.replicas):
            if r.worker_id in track.stopping:
                continue
            track.stopping.add(r.worker_id)
            self.narrate("📉", f"{d.model_ref}: {len(running)} replicas run, {d.replicas} wanted: stopping {r.worker_id} on {r.node}")
            await self._stop(r)

    async def _stop(self, r: Replica) -> bool:
        try:
            await self.stop_worker(self.store.get(r.node), r.worker_id)
            return True
        except RbeeError as err:
            self.narrate("⚠️", f"Could not stop {r.worker_id} on {r.node}: {err.code}: {err.message}", "warn")
            return False

    # -- what the RPCs ask -----------------------------------------------------

    async def deploy(self, req: replicas_pb2.DeployModelRequest) -> replicas_pb2.DeployModelResponse:
        wish = validate(req.model_ref, req.replicas, list(req.nodes), backend_name(req.backend))
        registered = self._registered()
        for name in wish.nodes:
            if name not in registered:
                raise node_not_found(name)
        stored, replaced = self.deployments.put(wish)
        where = ", ".join(stored.nodes) if stored.nodes else "any node"
        self.narrate("📌", f"{'Redeployed' if replaced else 'Deployed'} {stored.model_ref}: {stored.replicas} replica(s) "
                     f"on {where} ({stored.backend})")  # fmt: skip
        self._tracks.pop(stored.model_ref, None)  # a new wish starts without backoff
        self.wake()
        return replicas_pb2.DeployModelResponse(deployment=self.describe(stored), replaced=replaced)

    async def undeploy(self, req: replicas_pb2.UndeployModelRequest) -> replicas_pb2.UndeployModelResponse:
        gone = self.deployments.remove(canonical_ref(req.model_ref))
        task = self._work.pop(gone.model_ref, None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        reply = replicas_pb2.UndeployModelResponse(deployment=self.describe(gone))
        self._tracks.pop(gone.model_ref, None)
        running = self.running(gone, allowed_nodes(gone, self._registered()))
        self.narrate("📍", f"Undeployed {gone.model_ref}: stopping its {len(running)} worker(s)")
        results = await asyncio.gather(*(self._stop(r) for r in running))
        reply.stopped.extend(r.label for r, ok in zip(running, results) if ok)
        return reply

    def describe(self, d: Deployment) -> replicas_pb2.Deployment:
        running = self.running(d, allowed_nodes(d, self._registered()))
        track = self._tracks.get(d.model_ref)
        return replicas_pb2.Deployment(
            model_ref=d.model_ref, replicas=d.replicas, nodes=list(d.nodes), backend=backend_enum(d.backend), created_at_unix_ms=d.created_at_unix * 1000,
            running=len(running), ready=sum(1 for r in running if r.state in READY), workers=[r.label for r in running],
            current_state=DEPLOYMENT_STATES.number(track.state if track else "starting"),
            state_detail=track.detail if track else "", last_error=track.last_error if track else "",
        )  # fmt: skip

    def list(self) -> replicas_pb2.ListDeploymentsResponse:
        return replicas_pb2.ListDeploymentsResponse(deployments=[self.describe(d) for d in self.deployments.list()])
