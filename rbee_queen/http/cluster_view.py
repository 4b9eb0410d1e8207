"""The cluster as the web page shows it (docs/web.md): plain dicts built from
what the queen already holds or asks its hives for, with the same calls the
keeper's commands make through the queen (node list and probe, the hive's
resources, model catalog, downloads, worker shutdown, logs).

Nothing here is cached: every answer is read when asked, so the page never
shows something the queen would not.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc

from rbee.backends import BACKENDS, backend_enum, backend_name
from rbee.enum_words import MODEL_FORMATS
from rbee.errors import RbeeError, from_rpc_error
from rbee.modelref import parse_model_ref
from rbee.v1 import common_pb2, nodes_pb2, preflight_pb2, provisioning_pb2, registry_pb2

from rbee_queen.activity import Activity
from rbee_queen.hives import HiveLink
from rbee_queen.nodes.store import NodeRecord

PROBE_TIMEOUT_S = 1.5
SHUTDOWN_TIMEOUT_S = 120.0
DOWNLOAD_TIMEOUT_S = 6 * 3600
LOG_TAIL_LINES = 200
WORKER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")

_NODE_STATUS = {
    nodes_pb2.NODE_STATUS_REACHABLE: "reachable",
    nodes_pb2.NODE_STATUS_UNREACHABLE: "unreachable",
}


def state_name(value: int) -> str:
    return common_pb2.WorkerState.Name(value).removeprefix("WORKER_STATE_").lower()


def check_worker_id(worker_id: str) -> str:
    if not WORKER_ID.match(worker_id or ""):
        raise RbeeError("INVALID_ARGUMENT", f"Not a worker id: {worker_id[:80]!r}", {"field": "worker_id"},
                        ["Pick a worker from the list (`rbee-keeper workers list`)"])  # fmt: skip
    return worker_id


def _where(record: NodeRecord) -> str:
    if record.is_local:
        return "this machine"
    return f"{record.ssh_user}@{record.ssh_host}:{record.ssh_port}"


async def node_view(queen: Any, record: NodeRecord) -> dict:
    """One node: state (up, unreachable, hive stopped), address, TLS, backends,
    memory/disk (VRAM per GPU) as its hive reports them, hive version."""
    view: dict[str, Any] = {
        "name": record.name, "transport": record.transport, "where": _where(record), "hive_address": record.hive_address,
        "tls": record.tls, "hive_version": record.hive_version, "backends": dict(sorted(record.backends.items())),
        "last_error": record.last_error, "hive_started_by_queen": record.name in queen.nodes.started_hives,
        "resources": None,
    }  # fmt: skip
    async with HiveLink(record) as link:
        up = await link.serving(timeout=PROBE_TIMEOUT_S)
        if up:
            try:
                health, res = await asyncio.gather(
                    link.call(link.preflight.GetHiveHealth, preflight_pb2.GetHiveHealthRequest(), PROBE_TIMEOUT_S * 2),
                    link.call(link.preflight.GetResources, preflight_pb2.GetResourcesRequest(), PROBE_TIMEOUT_S * 2),
                )
            except RbeeError as err:
                view["last_error"] = f"{err.code}: {err.message}"
            else:
                view["hive_version"] = health.version or record.hive_version
                view["hive_uptime_ms"] = health.uptime_ms
                view["idle_timeout_ms"] = health.idle_timeout_ms
                view["resources"] = {
                    "ram_total": res.ram_total_bytes, "ram_used": res.ram_total_bytes - res.ram_available_bytes,
                    "disk_total": res.disk_total_bytes, "disk_used": res.disk_total_bytes - res.disk_available_bytes,
                    "disk_path": res.disk_path,
                    "gpus": [{"index": g.index, "name": g.name, "vram_total": g.vram_total_bytes,
                              "vram_used": g.vram_total_bytes - g.vram_available_bytes} for g in res.gpus],
                }  # fmt: skip
    if up:
        view["state"] = "up"
    elif record.status == "unreachable":
        view["state"] = "unreachable"
    else:
        view["state"] = "hive stopped"
    return view


async def nodes_view(queen: Any) -> list[dict]:
    records = await asyncio.to_thread(queen.store.list)
    return list(await asyncio.gather(*(node_view(queen, r) for r in records)))


def workers_view(queen: Any) -> list[dict]:
    """Every worker of the global registry (fed live by the hives)."""
    out = []
    now_ms = int(time.time() * 1000)
    for c in queen.registry.list():
        w = c.worker
        load = w.load if w.HasField("load") else None
        out.append({
            "id": w.id, "node": c.node, "model": w.model_ref, "state": state_name(w.state), "address": w.address,
            "backend": backend_name(w.backend), "device": w.device, "capability": c.capability, "tls": w.tls,
            "slots_total": w.slots_total, "slots_busy": max(0, w.slots_total - w.slots_available),
            "waiting": load.waiting_requests if load else None,
            "running": load.running_requests if load else None,
            "tokens_per_s": round(load.generation_tokens_per_s, 1) if load else None,
            "kv_cache_usage": round(load.kv_cache_usage, 3) if load else None,
            # When its hive spawned it; a hive of an older release does not say: when this queen first heard of it.
            "started_unix_ms": w.started_unix_ms or queen.registry.first_seen.get(w.id, 0),
            "last_activity_unix_ms": w.last_activity_unix_ms,
            "now_unix_ms": now_ms,
        })  # fmt: skip
    return out


def _model(m: provisioning_pb2.ModelEntry) -> dict:
    return {"model": m.model_ref, "size": m.size_bytes, "weights_format": MODEL_FORMATS.word(m.weights_format), "downloaded_at_unix_ms": m.downloaded_at_unix_ms}


async def node_models(queen: Any, record: NodeRecord) -> dict:
    """{"models": [...]} or {"models": [], "unavailable": why} for a node whose hive does not answer."""
    async with HiveLink(record) as link:
        if not await link.serving(timeout=PROBE_TIMEOUT_S):
            return {"models": [], "unavailable": "hive not running"}
        try:
            reply = await link.call(link.provisioning.ListModels, provisioning_pb2.ListModelsRequest())
        except RbeeError as err:
            return {"models": [], "unavailable": f"{err.code}: {err.message}"}
    return {"models": [_model(m) for m in reply.models]}


async def models_view(queen: Any) -> dict[str, dict]:
    records = await asyncio.to_thread(queen.store.list)
    found = await asyncio.gather(*(node_models(queen, r) for r in records))
    return {r.name: m for r, m in zip(records, found)}


async def stop_worker(queen: Any, activity: Activity, node: str, worker_id: str) -> dict:
    """The hive's graceful shutdown of one worker (force-killed after its grace), recorded as activity."""
    record = await asyncio.to_thread(queen.store.get, node)
    check_worker_id(worker_id)
    queen.narrate("🛑", f"Stopping worker {worker_id} on {node} (asked from the web page)")
    entry = activity.begin("stop", f"Stop worker {worker_id} on {node}", node, "")

    async def work() -> registry_pb2.ShutdownWorkerResponse:
        async with HiveLink(record) as link:
            return await link.call(link.workers.ShutdownWorker, registry_pb2.ShutdownWorkerRequest(worker_id=worker_id),
                                   SHUTDOWN_TIMEOUT_S)  # fmt: skip

    reply = await activity.run(entry, work(), lambda r: "force-killed" if r.force_killed else f"exited with code {r.exit_code}")
    return {"worker_id": reply.worker_id, "force_killed": reply.force_killed, "exit_code": reply.exit_code}


async def start_download(queen: Any, activity: Activity, node: str, model_ref: str, backend: str = "") -> dict:
    """Start a model download on a node's hive in the background; its lines and
    progress go to the activity record (the page follows them), the node's
    new model list follows its end."""
    record = await asyncio.to_thread(queen.store.get, node)
    ref = str(parse_model_ref(model_ref))
    backend = backend.strip().lower()
    if backend and backend not in BACKENDS:
        raise RbeeError("INVALID_BACKEND", f"Unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}",
                        {"field": "backend"}, ["Leave the backend empty, or pick cpu, cuda or metal"])  # fmt: skip
    entry = activity.begin("download", f"Download {ref} on {node}", node, ref)

    async def work() -> provisioning_pb2.ModelEntry:
        result = None
        async with HiveLink(record) as link:
            call = link.provisioning.DownloadModel(provisioning_pb2.DownloadModelRequest(model_ref=ref, backend=backend_enum(backend)),
                                                   metadata=link.md, timeout=DOWNLOAD_TIMEOUT_S)  # fmt: skip
            try:
                async for msg in call:
                    if msg.HasField("model"):
                        result = msg.model
                    elif msg.event.HasField("narration"):
                        activity.line(entry, msg.event.narration)
                    elif msg.event.HasField("progress"):
                        activity.progress(entry, msg.event.progress)
            except grpc.RpcError as err:
                raise from_rpc_error(err, link.address) from None
        if result is None:
            raise RbeeError("STREAM_BROKEN", f"The hive on {node} ended the download of {ref} without a result",
                            {"node": node, "model": ref}, ["Start the download again; it resumes where it stopped"])  # fmt: skip
        return result

    async def run() -> None:
        try:
            await activity.run(entry, work(), lambda m: f"{m.size_bytes} bytes, {MODEL_FORMATS.word(m.weights_format)}, {m.loadable_path or m.local_path}")
        except BaseException:  # noqa: BLE001 - recorded in the entry; nobody awaits this task
            pass
        activity.publish("models", {"node": node})

    task = asyncio.ensure_future(run())
    _background.add(task)
    task.add_done_callback(_background.discard)
    queen.narrate("⏬", f"Downloading {ref} on {node} (asked from the web page)")
    return {"id": entry.id, "node": node, "model": ref}


_background: set[asyncio.Task] = set()


async def follow_logs(queen: Any, node: str, worker_id: str = "", tail: int = LOG_TAIL_LINES) -> AsyncIterator[dict]:
    """A node's hive log ("rbee-hive") or one worker's, history then new lines."""
    record = await asyncio.to_thread(queen.store.get, node)
    if worker_id and worker_id != "rbee-hive":
        check_worker_id(worker_id)
    link = HiveLink(record)
    call = link.workers.StreamLogs(registry_pb2.StreamLogsRequest(worker_id=worker_id or "rbee-hive", tail_lines=tail, follow=True),
                                   metadata=link.md)  # fmt: skip
    try:
        async for msg in call:
            yield {"source": msg.source, "line": msg.line.rstrip("\n")}
    except grpc.RpcError as err:
        raise from_rpc_error(err, link.address) from None
    finally:
        call.cancel()
        await link.close()
