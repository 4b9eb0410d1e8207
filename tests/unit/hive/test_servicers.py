"""The hive's servicers in an in-process server (port 0) with a fake resource
source; everything else is the real thing."""

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rbee.auth import auth_metadata
from rbee.backends import backend_enum, backend_name
from rbee.enum_words import HIVE_STATUSES, RESOURCES
from rbee.channel import open_channel
from rbee.errors import RbeeError, from_rpc_error
from rbee.narration import Narrator
from rbee.v1 import common_pb2, preflight_pb2, preflight_pb2_grpc, registry_pb2, registry_pb2_grpc
from rbee_hive.catalog.models import ModelRecord
from rbee_hive.context import build_context
from rbee_hive.nvml import CudaProbe, GpuInfo
from rbee_hive.resources import Resources
from rbee_hive.server import HiveServer
from rbee_hive.settings import HiveSettings
from rbee_hive.workers.events import EventLog
from rbee_hive.workers.registry import WorkerRecord

pytestmark = pytest.mark.asyncio(loop_scope="session")

MB = 1024 * 1024
KEY = "unit-key"


class PinnedResources:
    def cuda(self):
        return CudaProbe(True, (GpuInfo(0, "Fake GPU", 8000 * MB, 1000 * MB),), "fake driver")

    def snapshot(self, disk_path):
        return Resources(16000 * MB, 4000 * MB, str(disk_path), 100000 * MB, 50000 * MB, self.cuda().gpus)


@pytest.fixture
async def hive(tmp_path):
    settings = HiveSettings(port=0, api_key=KEY, home=tmp_path, worker_binary=tmp_path / "bin" / "llm-worker-rbee")
    ctx = build_context(settings, resources=PinnedResources(), narrator=Narrator("rbee-hive", stream=open("/dev/null", "w")))
    server = HiveServer(ctx)
    port = await server.start()
    channel = open_channel(f"127.0.0.1:{port}")
    yield ctx, channel
    await channel.close()
    await server.stop()


async def call(method, request, key=KEY):
    try:
        return await method(request, metadata=auth_metadata(key), timeout=10)
    except grpc.RpcError as err:
        raise from_rpc_error(err) from None


async def test_health_is_open_and_everything_else_needs_the_key(hive):
    _, channel = hive
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    stub = preflight_pb2_grpc.PreflightServiceStub(channel)
    for key, code in ((None, "MISSING_API_KEY"), ("wrong", "INVALID_API_KEY")):
        with pytest.raises(RbeeError) as exc:
            await call(stub.GetHiveHealth, preflight_pb2.GetHiveHealthRequest(), key)
        assert exc.value.code == code
    health = await call(stub.GetHiveHealth, preflight_pb2.GetHiveHealthRequest())
    assert (HIVE_STATUSES.word(health.hive_status), health.version, health.api_version) == ("healthy", "0.1.0", "v1")
    assert health.idle_timeout_ms == int(hive[0].settings.idle_timeout.total_seconds() * 1000)


async def test_backends_resources_and_checks(hive):
    _, channel = hive
    stub = preflight_pb2_grpc.PreflightServiceStub(channel)
    backends = {backend_name(b.name): b for b in (await call(stub.GetBackends, preflight_pb2.GetBackendsRequest())).backends}
    assert backends["cuda"].available and backends["cuda"].device_count == 1
    res = await call(stub.GetResources, preflight_pb2.GetResourcesRequest())
    assert res.ram_available_bytes == 4000 * MB and res.gpus[0].vram_available_bytes == 1000 * MB
    ok = await call(stub.CheckWorkerResources, preflight_pb2.CheckWorkerResourcesRequest(model_size_bytes=800 * MB, backend=common_pb2.BACKEND_CUDA))
    assert [(RESOURCES.word(c.resource), c.required_bytes, c.available_bytes) for c in ok.checks][-1] == ("vram", 960 * MB, 1000 * MB)
    with pytest.raises(RbeeError) as exc:
        await call(stub.CheckWorkerResources, preflight_pb2.CheckWorkerResourcesRequest(model_size_bytes=900 * MB, backend=common_pb2.BACKEND_CUDA))
    assert exc.value.code == "VRAM_EXHAUSTED" and exc.value.details["required_mb"] == "1080"
    with pytest.raises(RbeeError) as exc:
        await call(stub.CheckWorkerResources, preflight_pb2.CheckWorkerResourcesRequest(backend=common_pb2.BACKEND_CPU))
    assert exc.value.code == "INVALID_ARGUMENT"


async def test_spawn_without_worker_program_names_the_expected_path(hive, tmp_path):
    _, channel = hive
    model = tmp_path / "models" / "model"
    model.mkdir(parents=True)
    (model / "w").write_bytes(b"x" * 100)
    stub = registry_pb2_grpc.HiveWorkerServiceStub(channel)
    with pytest.raises(RbeeError) as exc:
        await call(stub.SpawnWorker, registry_pb2.SpawnWorkerRequest(model_path=str(model), backend=common_pb2.BACKEND_CPU))
    assert exc.value.code == "WORKER_BINARY_NOT_FOUND"
    assert exc.value.message == f"Worker binary not found: {tmp_path / 'bin' / 'llm-worker-rbee'}"
    assert any("setup install" in s for s in exc.value.suggestions)
    assert (await call(stub.ListWorkers, registry_pb2.ListWorkersRequest())).workers == []


async def test_the_callback_key_is_checked_before_anything_is_said_about_the_worker(hive, tmp_path):
    """A wrong callback key for a known worker and any key for an unknown one
    get the same UNAUTHENTICATED answer: no 'unknown worker' to probe ids with."""
    ctx, channel = hive
    known = WorkerRecord(
        id="worker-known", host="127.0.0.1", port=1, model_ref="file:///m", model_path="/m", backend="cpu", device=0,
        api_key="worker-key", callback_key="the-callback-key", log_path=tmp_path / "w.log", events=EventLog(),
    )
    ctx.manager._pending[known.id] = known
    stub = registry_pb2_grpc.WorkerCallbackServiceStub(channel)

    async def answer(worker_id, key):
        request = registry_pb2.ReportWorkerRequest(worker=common_pb2.WorkerInfo(id=worker_id, state=common_pb2.WORKER_STATE_IDLE))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ReportWorker(request, metadata=auth_metadata(key), timeout=10)
        err = from_rpc_error(info.value)
        return info.value.code(), err.code, err.message, err.details, err.suggestions

    for key, code in ((None, "MISSING_API_KEY"), ("wrong-key", "INVALID_API_KEY")):
        for_known = await answer("worker-known", key)
        for_unknown = await answer("worker-nope", key)
        assert for_known == for_unknown, key
        assert for_known[:2] == (grpc.StatusCode.UNAUTHENTICATED, code)
        assert "worker" not in for_known[2].lower()
    # The hive's admin key and a worker's inference key are of other scopes
    # (S13): refused as such, the same for every worker id.
    for key in (KEY, "worker-key"):
        for_known, for_unknown = await answer("worker-known", key), await answer("worker-nope", key)
        assert for_known == for_unknown
        assert for_known[:2] == (grpc.StatusCode.PERMISSION_DENIED, "WRONG_KEY_SCOPE")
    # The wrong keys changed nothing; the right one registers the worker.
    assert known.state == common_pb2.WORKER_STATE_LOADING and ctx.registry.get(known.id) is None
    await call(stub.ReportWorker, registry_pb2.ReportWorkerRequest(
        worker=common_pb2.WorkerInfo(id="worker-known", state=common_pb2.WORKER_STATE_LOADING)), key="the-callback-key")
    assert ctx.registry.get(known.id) is known


async def spawn_refusal(channel, **fields) -> RbeeError:
    stub = registry_pb2_grpc.HiveWorkerServiceStub(channel)
    with pytest.raises(RbeeError) as exc:
        await call(stub.SpawnWorker, registry_pb2.SpawnWorkerRequest(**{**fields, "backend": backend_enum(fields.get("backend"))}))
    return exc.value


async def test_spawn_loads_only_catalog_models_or_paths_under_the_model_folders(hive, tmp_path):
    ctx, channel = hive
    outside = tmp_path / "elsewhere" / "model"
    outside.mkdir(parents=True)
    (outside / "w").write_bytes(b"x" * 100)
    (tmp_path / "models").mkdir(exist_ok=True)
    (tmp_path / "models" / "linked").symlink_to(outside)
    # The filesystem root (found in review: the preflight walked it and answered INTERNAL
    # with a PermissionError on /proc), a folder outside, a link leading out.
    for path in ("/", "/proc", str(outside), str(tmp_path / "models" / "linked"), f"{tmp_path}/models/../elsewhere/model"):
        err = await spawn_refusal(channel, model_path=path, backend="cpu")
        assert err.code == "PATH_NOT_ALLOWED", (path, err)
        assert err.details["field"] == "model_path" and err.details["allowed"] == str(tmp_path / "models")
    preflight = preflight_pb2_grpc.PreflightServiceStub(channel)
    with pytest.raises(RbeeError) as exc:
        await call(preflight.CheckWorkerResources, preflight_pb2.CheckWorkerResourcesRequest(model_path="/", backend=common_pb2.BACKEND_CPU))
    assert exc.value.code == "PATH_NOT_ALLOWED"
    # A catalog entry by reference is loaded from where the catalog has it.
    folder = tmp_path / "models" / "hf" / "acme--tiny"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"x" * 100)
    ctx.provisioning.models.catalog.add(
        ModelRecord(provider="hf", reference="acme/tiny", local_path=str(folder), size_bytes=100, format="safetensors")
    )
    err = await spawn_refusal(channel, model_ref="hf:acme/tiny", backend="cpu")
    assert err.code == "WORKER_BINARY_NOT_FOUND", "located, preflight passed, only the program is missing"
    err = await spawn_refusal(channel, model_ref="hf:acme/other", backend="cpu")
    assert err.code == "MODEL_NOT_FOUND" and "rbee-keeper models download hf:acme/other" in err.suggestions[0]
    assert (await spawn_refusal(channel, model_ref="ollama:x", backend="cpu")).code == "INVALID_MODEL_REF"
    assert (await spawn_refusal(channel, backend="cpu")).details["field"] == "model_ref"
    # A catalog entry whose files were replaced by a link out is refused too.
    (tmp_path / "models" / "hf" / "acme--linked").symlink_to(outside)
    ctx.provisioning.models.catalog.add(ModelRecord(
        provider="hf", reference="acme/linked", local_path=str(tmp_path / "models" / "hf" / "acme--linked"), size_bytes=100,
        format="safetensors"))
    assert (await spawn_refusal(channel, model_ref="hf:acme/linked", backend="cpu")).code == "PATH_NOT_ALLOWED"


@pytest.mark.parametrize("slots", [257, 70000, 2**32 - 1])
async def test_spawn_slots_are_bounded(hive, tmp_path, slots):
    _, channel = hive
    model = tmp_path / "models" / "model"
    model.mkdir(parents=True)
    err = await spawn_refusal(channel, model_path=str(model), backend="cpu", slots=slots)
    assert err.code == "INVALID_ARGUMENT" and err.details["field"] == "slots"
    assert "between 1 and 256" in err.message


async def test_unknown_worker_ids_are_not_found(hive):
    _, channel = hive
    stub = registry_pb2_grpc.HiveWorkerServiceStub(channel)
    for method, request in (
        (stub.ShutdownWorker, registry_pb2.ShutdownWorkerRequest(worker_id="worker-x")),
        (stub.CheckWorkersHealth, registry_pb2.CheckWorkersHealthRequest(worker_id="worker-x")),
    ):
        with pytest.raises(RbeeError) as exc:
            await call(method, request)
        assert exc.value.code == "WORKER_NOT_FOUND"
