"""The hive's servicers in an in-process server (port 0) with a fake resource
source; everything else is the real thing."""

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rbee.auth import auth_metadata
from rbee.channel import open_channel
from rbee.errors import RbeeError, from_rpc_error
from rbee.narration import Narrator
from rbee.v1 import common_pb2, preflight_pb2, preflight_pb2_grpc, registry_pb2, registry_pb2_grpc
from rbee_hive.context import build_context
from rbee_hive.nvml import CudaProbe, GpuInfo
from rbee_hive.resources import Resources
from rbee_hive.server import HiveServer
from rbee_hive.settings import HiveSettings

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
    assert (health.status, health.version, health.api_version) == ("ok", "0.1.0", "v1")


async def test_backends_resources_and_checks(hive):
    _, channel = hive
    stub = preflight_pb2_grpc.PreflightServiceStub(channel)
    backends = {b.name: b for b in (await call(stub.GetBackends, preflight_pb2.GetBackendsRequest())).backends}
    assert backends["cuda"].available and backends["cuda"].device_count == 1
    res = await call(stub.GetResources, preflight_pb2.GetResourcesRequest())
    assert res.ram_available_bytes == 4000 * MB and res.gpus[0].vram_available_bytes == 1000 * MB
    ok = await call(stub.CheckWorkerResources, preflight_pb2.CheckWorkerResourcesRequest(model_size_bytes=800 * MB, backend="cuda"))
    assert [(c.name, c.required_mb, c.available_mb) for c in ok.checks][-1] == ("vram", 960, 1000)
    with pytest.raises(RbeeError) as exc:
        await call(stub.CheckWorkerResources, preflight_pb2.CheckWorkerResourcesRequest(model_size_bytes=900 * MB, backend="cuda"))
    assert exc.value.code == "VRAM_EXHAUSTED" and exc.value.details["required_mb"] == "1080"
    with pytest.raises(RbeeError) as exc:
        await call(stub.CheckWorkerResources, preflight_pb2.CheckWorkerResourcesRequest(backend="cpu"))
    assert exc.value.code == "INVALID_ARGUMENT"


async def test_spawn_without_worker_program_names_the_expected_path(hive, tmp_path):
    _, channel = hive
    model = tmp_path / "model"
    model.mkdir()
    (model / "w").write_bytes(b"x" * 100)
    stub = registry_pb2_grpc.HiveWorkerServiceStub(channel)
    with pytest.raises(RbeeError) as exc:
        await call(stub.SpawnWorker, registry_pb2.SpawnWorkerRequest(model_path=str(model), backend="cpu"))
    assert exc.value.code == "WORKER_BINARY_NOT_FOUND"
    assert exc.value.message == f"Worker binary not found: {tmp_path / 'bin' / 'llm-worker-rbee'}"
    assert any("setup install" in s for s in exc.value.suggestions)
    assert (await call(stub.ListWorkers, registry_pb2.ListWorkersRequest())).workers == []


async def test_callbacks_from_unknown_workers_are_refused(hive):
    _, channel = hive
    stub = registry_pb2_grpc.WorkerCallbackServiceStub(channel)
    with pytest.raises(RbeeError) as exc:
        await call(stub.ReportWorker, registry_pb2.ReportWorkerRequest(worker=common_pb2.WorkerInfo(id="worker-nope")), key=None)
    assert exc.value.code == "WORKER_NOT_FOUND"


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
