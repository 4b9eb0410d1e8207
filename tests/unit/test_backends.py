"""Backends at the contract (rbee/backends.py): names inside, the rbee.v1.Backend
enum on the wire. The keeper refuses an unknown --backend before it sends
anything; a daemon answers an enum number it does not know (a newer client's)
with INVALID_BACKEND, never a traceback."""

from __future__ import annotations

import asyncio

import pytest

from rbee.backends import BACKENDS, backend_enum, backend_name
from rbee.errors import RbeeError
from rbee.v1 import common_pb2, preflight_pb2, preflight_pb2_grpc, provisioning_pb2, provisioning_pb2_grpc
from rbee.v1 import registry_pb2, registry_pb2_grpc, replicas_pb2
from tests.fixtures.common import VENV_BIN, proc_env
from tests.unit.hive.test_servicers import call, hive  # noqa: F401 (the hive fixture)
from tests.unit.queen.test_reconcile import FakeCluster, cluster  # noqa: F401 (the cluster fixture)

session = pytest.mark.asyncio(loop_scope="session")

# A number no backend has (what a newer client could send).
UNKNOWN = 99


def test_each_name_has_its_enum_value_and_back():
    expected = {"cpu": common_pb2.BACKEND_CPU, "cuda": common_pb2.BACKEND_CUDA, "metal": common_pb2.BACKEND_METAL}
    assert {name: backend_enum(name) for name in BACKENDS} == expected
    assert {backend_name(value): value for value in expected.values()} == expected
    # The enum has no value without a name here, nor a name without a value.
    assert set(common_pb2.Backend.values()) == {common_pb2.BACKEND_UNSPECIFIED, *expected.values()}


def test_not_given_is_unspecified_both_ways():
    assert backend_enum("") == backend_enum(None) == backend_enum("  ") == common_pb2.BACKEND_UNSPECIFIED
    assert backend_name(common_pb2.BACKEND_UNSPECIFIED) == ""


def test_case_and_spaces_are_forgiven():
    assert backend_enum(" CUDA ") == common_pb2.BACKEND_CUDA


@pytest.mark.parametrize("name", ["tpu", "cpu0", "BACKEND_CPU", "1"])
def test_an_unknown_name_is_invalid_backend_with_the_accepted_names(name):
    with pytest.raises(RbeeError) as caught:
        backend_enum(name)
    err = caught.value
    assert err.code == "INVALID_BACKEND" and repr(name) in err.message
    assert err.details == {"backend": name, "accepted": "cpu, cuda, metal"}
    assert err.suggestions == ["Pass --backend cpu, --backend cuda or --backend metal"]


@pytest.mark.parametrize("value", [UNKNOWN, -1, 2**31 - 1])
def test_an_unknown_number_is_invalid_backend(value):
    with pytest.raises(RbeeError) as caught:
        backend_name(value)
    assert caught.value.code == "INVALID_BACKEND"
    assert str(value) in caught.value.message and caught.value.details["accepted"] == "cpu, cuda, metal"


# -- the keeper: checked before anything is sent ----------------------------------------

# Port 1 on loopback has nothing listening: only the keeper's own check can answer.
NOWHERE = "127.0.0.1:1"


@pytest.mark.parametrize(
    "command",
    [
        ["models", "deploy", "hf:org/model", "--queen", NOWHERE],
        ["models", "fit", "hf:org/model", "--queen", NOWHERE],
        ["models", "download", "hf:org/model", "--hive", NOWHERE],
        ["workers", "spawn", "--model", "hf:org/model", "--hive", NOWHERE],
        ["workers", "provision", "--hive", NOWHERE],
        ["workers", "envs", "--hive", NOWHERE],
    ],
    ids=lambda c: " ".join(c[:2]),
)
@session
async def test_the_keeper_refuses_an_unknown_backend_before_sending(tmp_path, command):
    env = proc_env(HOME=str(tmp_path), RBEE_HOME=str(tmp_path / "rbee"), RBEE_API_KEY="k")
    env.pop("RBEE_CONFIG", None)
    proc = await asyncio.create_subprocess_exec(
        str(VENV_BIN / "rbee-keeper"), *command, "--backend", "tpu",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    out, err = (b.decode() for b in await proc.communicate())
    assert proc.returncode == 1 and out == "", (out, err)
    assert "❌ INVALID_BACKEND: Unknown backend 'tpu': choose one of cpu, cuda, metal" in err, err
    assert "Cannot reach" not in err and "Traceback" not in err


# -- the daemons: a number they do not know is bad input --------------------------------


@session
async def test_the_hive_answers_an_unknown_backend_number_with_invalid_backend(hive):  # noqa: F811
    _, channel = hive
    preflight = preflight_pb2_grpc.PreflightServiceStub(channel)
    workers = registry_pb2_grpc.HiveWorkerServiceStub(channel)
    provisioning = provisioning_pb2_grpc.ProvisioningServiceStub(channel)
    calls = [
        (preflight.CheckWorkerResources, preflight_pb2.CheckWorkerResourcesRequest(model_size_bytes=1, backend=UNKNOWN)),
        (workers.SpawnWorker, registry_pb2.SpawnWorkerRequest(model_ref="hf:acme/tiny", backend=UNKNOWN)),
        (provisioning.ListWorkerEnvironments, provisioning_pb2.ListWorkerEnvironmentsRequest(backend=UNKNOWN)),
    ]
    for method, request in calls:
        with pytest.raises(RbeeError) as caught:
            await call(method, request)
        assert caught.value.code == "INVALID_BACKEND", (method, caught.value)
        assert caught.value.details["accepted"] == "cpu, cuda, metal"
    # The streaming calls answer the same way.
    for method, request in (
        (provisioning.ProvisionWorker, provisioning_pb2.ProvisionWorkerRequest(backend=UNKNOWN)),
        (provisioning.DownloadModel, provisioning_pb2.DownloadModelRequest(model_ref="hf:acme/tiny", backend=UNKNOWN)),
        (workers.StartWorker, registry_pb2.StartWorkerRequest(model_ref="hf:acme/tiny", backend=UNKNOWN)),
    ):
        with pytest.raises(RbeeError) as caught:
            await call(lambda r, **kw: _drain(method(r, **kw)), request)
        assert caught.value.code == "INVALID_BACKEND", (method, caught.value)


async def _drain(stream) -> list:
    return [item async for item in stream]


@session
async def test_the_queen_answers_an_unknown_backend_number_with_invalid_backend(cluster: FakeCluster):  # noqa: F811
    with pytest.raises(RbeeError) as caught:
        await cluster.deploy(replicas_pb2.DeployModelRequest(model_ref="hf:org/model", replicas=1, backend=UNKNOWN))
    assert caught.value.code == "INVALID_BACKEND"
    assert cluster.deployments.list() == []
    # Not given is the queen's cpu.
    reply = await cluster.deploy(replicas_pb2.DeployModelRequest(model_ref="hf:org/model", replicas=1))
    assert reply.deployment.backend == common_pb2.BACKEND_CPU and cluster.deployments.list()[0].backend == "cpu"


def test_the_queen_skips_a_newer_hives_worker_on_a_backend_it_does_not_know():
    from rbee_queen.deployments import Deployment
    from rbee_queen.eviction import Evictor
    from rbee_queen.replicas import replicas_of
    from rbee_queen.survey import NodeFigures, same_model
    from rbee_queen.workers import ClusterWorkers

    ref = "hf:org/model"
    known = common_pb2.WorkerInfo(id="w-cpu", model_ref=ref, backend=common_pb2.BACKEND_CPU, state=common_pb2.WORKER_STATE_IDLE,
                                  slots_total=1, slots_available=1)  # fmt: skip
    newer = common_pb2.WorkerInfo(id="w-new", model_ref=ref, backend=UNKNOWN, state=common_pb2.WORKER_STATE_IDLE,
                                  slots_total=1, slots_available=1)  # fmt: skip
    # The global registry does not list it.
    registry = ClusterWorkers(120.0)
    registry.apply("a", "127.0.0.1:1", registry_pb2.WatchWorkersResponse(snapshot=True, hive_instance="i", workers=[known, newer]))
    assert [c.worker.id for c in registry.list()] == ["w-cpu"]
    # A placement and a deployment's count pass it by instead of failing.
    figures = NodeFigures(record=None, workers=[known, newer])  # type: ignore[arg-type]
    assert [w.id for w in figures.ready_workers(ref, "cpu", 0)] == ["w-cpu"]
    pairs = [("a", known), ("a", newer)]
    assert [r.worker_id for r in replicas_of(Deployment(ref, 2, ()), ["a"], pairs, same_model)] == ["w-cpu"]
    # An eviction does not count on memory it cannot estimate.
    figures.models.append(provisioning_pb2.ModelEntry(model_ref=ref, size_bytes=1000))
    assert Evictor.__new__(Evictor)._worker_bytes(figures, newer) is None


def test_json_shows_the_backend_name_never_the_number():
    from types import SimpleNamespace

    from rbee.v1 import nodes_pb2
    from rbee_keeper.commands.deploy import deployment_dict
    from rbee_keeper.commands.setup import _node_dict
    from rbee_keeper.commands.workers import _env_dict, _worker_dict
    from rbee_queen.http.cluster_view import workers_view
    from rbee_queen.workers import ClusterWorkers

    cuda = common_pb2.BACKEND_CUDA
    assert _worker_dict(common_pb2.WorkerInfo(id="w", backend=cuda))["backend"] == "cuda"
    assert _env_dict(provisioning_pb2.WorkerEnvironment(id="e", backend=cuda))["backend"] == "cuda"
    assert deployment_dict(replicas_pb2.Deployment(model_ref="hf:org/m", backend=cuda))["backend"] == "cuda"
    node = nodes_pb2.Node(name="n", backends=[nodes_pb2.BackendDevices(name=common_pb2.BACKEND_CPU, device_count=1),
                                              nodes_pb2.BackendDevices(name=cuda, device_count=2)])  # fmt: skip
    assert _node_dict(node)["backends"] == {"cpu": 1, "cuda": 2}
    # The queen's web page.
    registry = ClusterWorkers(120.0)
    worker = common_pb2.WorkerInfo(id="w", model_ref="hf:org/m", backend=cuda, device=1, state=common_pb2.WORKER_STATE_IDLE)
    registry.apply("a", "127.0.0.1:1", registry_pb2.WatchWorkersResponse(snapshot=True, hive_instance="i", workers=[worker]))
    [shown] = workers_view(SimpleNamespace(registry=registry))
    assert (shown["backend"], shown["device"], shown["capability"]) == ("cuda", 1, "cuda:1")
