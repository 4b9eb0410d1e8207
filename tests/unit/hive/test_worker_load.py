"""A worker's reported load reaches the hive's listing (WorkerInfo.load)."""

from __future__ import annotations

import pytest

from rbee.errors import RbeeError
from rbee.narration import event
from rbee.v1 import common_pb2, registry_pb2, registry_pb2_grpc
from rbee_hive.workers.events import EventLog
from rbee_hive.workers.registry import WorkerRecord
from tests.unit.hive.test_servicers import call, hive  # noqa: F401 - the fixture

BUSY = common_pb2.WORKER_STATE_BUSY


@pytest.mark.asyncio(loop_scope="session")
async def test_reported_load_shows_in_list_workers(hive, tmp_path):  # noqa: F811
    ctx, channel = hive
    record = WorkerRecord(
        id="worker-load", host="127.0.0.1", port=1, model_ref="file:///m", model_path="/m", backend="cpu", device=0,
        api_key="worker-key", callback_key="cb-key", log_path=tmp_path / "w.log", events=EventLog(),
    )
    ctx.manager._pending[record.id] = record
    callback = registry_pb2_grpc.WorkerCallbackServiceStub(channel)
    listing = registry_pb2_grpc.HiveWorkerServiceStub(channel)

    await call(callback.ReportWorker, registry_pb2.ReportWorkerRequest(
        worker=common_pb2.WorkerInfo(id=record.id, state=common_pb2.WORKER_STATE_IDLE, slots_total=4, slots_available=4)
    ), key="cb-key")
    before = (await call(listing.ListWorkers, registry_pb2.ListWorkersRequest())).workers[0]
    assert not before.HasField("load")  # nothing reported yet

    load = common_pb2.WorkerLoad(running_requests=2, waiting_requests=1, slots_total=4, slots_busy=3,
                                 kv_cache_usage=0.5, generation_tokens_per_s=41.5, window_ms=10_000, unix_ms=1)
    await call(callback.ReportWorker, registry_pb2.ReportWorkerRequest(
        worker=common_pb2.WorkerInfo(id=record.id, state=BUSY, slots_total=4, slots_available=1, load=load)
    ), key="cb-key")
    listed = (await call(listing.ListWorkers, registry_pb2.ListWorkersRequest())).workers[0]
    assert listed.state == BUSY and listed.load == load


@pytest.mark.asyncio(loop_scope="session")
async def test_a_loaded_worker_reporting_its_engine_oom_killed_is_narrated_as_such(hive, tmp_path, monkeypatch):  # noqa: F811
    ctx, channel = hive
    said: list[str] = []

    def narrate(emoji: str, message: str, level: str = "info"):
        said.append(message)
        return event("rbee-hive", emoji, message, level)

    monkeypatch.setattr(ctx.manager, "_narrate", narrate)
    record = WorkerRecord(
        id="worker-oom", host="127.0.0.1", port=2, model_ref="file:///m", model_path="/m", backend="cpu", device=0,
        api_key="worker-key-2", callback_key="cb-key-2", log_path=tmp_path / "w.log", events=EventLog(),
    )
    ctx.manager._pending[record.id] = record
    callback = registry_pb2_grpc.WorkerCallbackServiceStub(channel)
    await call(callback.ReportWorker, registry_pb2.ReportWorkerRequest(
        worker=common_pb2.WorkerInfo(id=record.id, state=common_pb2.WORKER_STATE_IDLE, slots_total=4, slots_available=4)
    ), key="cb-key-2")
    error = RbeeError("ENGINE_OOM_KILLED", "The kernel's OOM killer killed vLLM's engine process", {"pid": 7}, ["Lower --slots"])
    await call(callback.ReportWorker, registry_pb2.ReportWorkerRequest(
        worker=common_pb2.WorkerInfo(id=record.id, state=common_pb2.WORKER_STATE_FAILED),
        error_status=error.to_status_proto().SerializeToString(),
    ), key="cb-key-2")
    assert record.failure is not None and record.failure.code == "ENGINE_OOM_KILLED"
    assert record.failure.details == {"pid": "7"} and record.failure.suggestions == ["Lower --slots"]
    out = "\n".join(said)
    assert "worker-oom reports that its engine failed: ENGINE_OOM_KILLED: The kernel's OOM killer" in out
    assert "loading failed" not in out
    ctx.manager.registry.remove(record.id)


def test_keeper_listing_json_carries_the_load():
    from rbee_keeper.commands.workers import _worker_dict

    info = common_pb2.WorkerInfo(id="w", load=common_pb2.WorkerLoad(running_requests=2, waiting_requests=1,
                                                                    kv_cache_usage=0.25, generation_tokens_per_s=12.34))
    assert _worker_dict(info)["load"] == {"running": 2, "waiting": 1, "kv_cache_usage": 0.25, "tokens_per_s": 12.3, "unix_ms": 0}
    assert _worker_dict(common_pb2.WorkerInfo(id="w"))["load"] is None
