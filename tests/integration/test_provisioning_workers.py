"""Worker environments for real, from this checkout: created through the
hive's ProvisioningService, sharing the engine installed on the node (so no
second multi-GB install: the new environment links the .venv's site-packages
through a .pth file and installs rbee itself without dependencies). Created,
reused and rebuilt with force, and provisioned before a spawn:
models_workers.feature; here the repair of a broken environment and the
failure paths."""

from __future__ import annotations

from pathlib import Path

import grpc
import psutil
import pytest

from rbee.backends import backend_enum
from rbee.errors import RbeeError, from_rpc_error
from rbee.narration import format_line
from rbee.v1 import common_pb2, provisioning_pb2, provisioning_pb2_grpc
from rbee_hive.catalog.workers import WorkerCatalog
from rbee_hive.provisioner.resolver import ProvisioningResolver
from rbee_hive.provisioner.environments import WorkerProvisioner
from tests.fixtures.common import REPO
from tests.fixtures.hive import HiveProc, fake_worker_project

pytestmark = pytest.mark.asyncio(loop_scope="session")

ENV_ID = "llm-worker-rbee-cpu"


class Provisioned:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.env: provisioning_pb2.WorkerEnvironment | None = None
        self.error: RbeeError | None = None

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


async def provision(hive: HiveProc, backend: str | int = "cpu", source: str = "", force: bool = False) -> Provisioned:
    # A name, or an enum number as a client sends it (one this hive may not know).
    stub = provisioning_pb2_grpc.ProvisioningServiceStub(hive._channel())
    out = Provisioned()
    call = stub.ProvisionWorker(
        provisioning_pb2.ProvisionWorkerRequest(
            backend=backend_enum(backend) if isinstance(backend, str) else backend, source=source, force=force),
        metadata=hive.md, timeout=900
    )
    try:
        async for msg in call:
            if msg.HasField("environment"):
                out.env = msg.environment
            elif msg.event.HasField("narration"):
                out.lines.append(format_line(msg.event.narration))
    except grpc.RpcError as err:
        out.error = from_rpc_error(err, hive.address)
    return out


# Created from the checkout sharing the engine (linked, imports from the right
# places), listed, reused, forced; and a missing environment provisioned
# before a spawn: models_workers.feature.


async def test_a_broken_environment_fails_verification_then_provisioning_repairs_it(tmp_path):
    provisioner = WorkerProvisioner(WorkerCatalog(tmp_path / "workers.db"), tmp_path, source=REPO)
    lines: list[str] = []

    def narrate(emoji, message, level="info"):
        lines.append(f"{emoji} {message}")

    record = await provisioner.provision("cpu", narrate)
    record.binary.chmod(0o644)
    resolver = ProvisioningResolver(provisioner)
    with pytest.raises(RbeeError) as exc:
        await resolver.resolve("cpu", narrate)
    err = exc.value
    assert err.code == "BINARY_VERIFICATION_FAILED"
    assert err.message == f"Binary verification failed: {record.binary} (not executable)"
    assert any("force" in s for s in err.suggestions)
    repaired = await provisioner.provision("cpu", narrate)
    assert "recorded but broken" in "\n".join(lines) and "repairing" in "\n".join(lines)
    assert await resolver.resolve("cpu", narrate) == repaired.binary


async def test_a_source_that_is_not_a_project_is_a_build_failure_with_its_lines(start_hive, tmp_path):
    empty = tmp_path / "not-a-project"
    hive = await start_hive(home=tmp_path / "home", worker_sources=[empty])
    empty.mkdir()
    (empty / "README").write_text("nothing to install here")
    result = await provision(hive, source=str(empty))
    err = result.error
    assert err.code == "WORKER_BUILD_FAILED", result.text
    assert err.message.startswith("Worker build failed: llm-worker-rbee for cpu")
    assert err.details["worker_type"] == "llm-worker-rbee" and err.details["backend"] == "cpu"
    assert "pyproject.toml" in err.details["output"] and "ERROR" in err.details["output"]
    stub = provisioning_pb2_grpc.ProvisioningServiceStub(hive._channel())
    listed = await hive.call(stub.ListWorkerEnvironments, provisioning_pb2.ListWorkerEnvironmentsRequest())
    assert list(listed.environments) == [], "a failed build is not recorded"


async def test_a_broken_pyproject_is_a_build_failure(tmp_path):
    source = fake_worker_project(tmp_path / "src", "def main():\n    pass\n", pyproject="[project\nname = 'x'\n")
    provisioner = WorkerProvisioner(WorkerCatalog(tmp_path / "workers.db"), tmp_path, source=source)
    with pytest.raises(RbeeError) as exc:
        await provisioner.provision("cpu", lambda *a, **k: None)
    assert exc.value.code == "WORKER_BUILD_FAILED"
    assert exc.value.details["output"].strip(), "pip's own explanation is shown"


async def test_an_entry_point_that_fails_is_a_verification_failure_naming_the_path(tmp_path):
    source = fake_worker_project(tmp_path / "src", "import sys\n\ndef main():\n    print('cannot start', file=sys.stderr)\n    sys.exit(3)\n")
    provisioner = WorkerProvisioner(WorkerCatalog(tmp_path / "workers.db"), tmp_path, source=source)
    with pytest.raises(RbeeError) as exc:
        await provisioner.provision("cpu", lambda *a, **k: None)
    err = exc.value
    binary = tmp_path / "workers" / ENV_ID / "bin" / "llm-worker-rbee"
    assert err.code == "BINARY_VERIFICATION_FAILED"
    assert err.message == f"Binary verification failed: {binary} (exit code 3)"
    assert "cannot start" in err.details["output"]
    assert provisioner.list() == []


async def test_cuda_without_a_driver_says_so_with_the_install_link(start_hive, tmp_path):
    from rbee_hive.nvml import Nvml

    if Nvml().probe().available:
        pytest.skip("this node has a working NVIDIA driver")
    hive = await start_hive(home=tmp_path / "home")
    result = await provision(hive, backend="cuda")
    err = result.error
    assert err.code == "CUDA_NOT_AVAILABLE"
    assert "CUDA backend requested" in err.message
    assert any("https://developer.nvidia.com/cuda-downloads" in s for s in err.suggestions)
    assert list((tmp_path / "home" / "workers").glob("*")) == [], "nothing was installed"


@pytest.mark.parametrize(
    ("backend", "source", "code"),
    # 99: a backend number this hive does not know (a newer client's); "": none given.
    [(99, "", "INVALID_BACKEND"), ("", "", "INVALID_BACKEND"), ("cpu", "/no/such/source", "PATH_NOT_ALLOWED"),
     ("cpu", "{allowed}", "NOT_FOUND")],
)
async def test_bad_requests(start_hive, tmp_path, backend, source, code):
    # A configured source that is not there (yet) is NOT_FOUND; any other is not allowed.
    allowed = tmp_path / "configured-but-missing"
    hive = await start_hive(home=tmp_path / "home", worker_sources=[allowed])
    result = await provision(hive, backend=backend, source=source.format(allowed=allowed))
    assert result.error.code == code


def in_tree_backend_project(folder: Path, marker: Path) -> Path:
    """A project whose pyproject.toml names its own build backend in the
    folder: building it at all runs the backend's code, which leaves ``marker``."""
    folder.mkdir(parents=True)
    (folder / "pyproject.toml").write_text(
        '[build-system]\nrequires = []\nbuild-backend = "backend"\nbackend-path = ["."]\n'
        '[project]\nname = "planted"\nversion = "0.0.1"\n'
    )
    (folder / "backend.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('the build backend ran')\n"
        "def build_wheel(*args, **kwargs):\n    raise RuntimeError('planted backend')\n"
    )
    return folder


async def test_a_source_the_operator_did_not_configure_is_refused_and_its_build_backend_never_runs(start_hive, tmp_path):
    """An attack found in review: ProvisionWorker naming a folder (e.g. one a model
    download created) whose pyproject declares an in-tree build backend. pip
    would import that backend, i.e. run the client's code on the node."""
    marker = tmp_path / "planted-backend-ran"
    planted = in_tree_backend_project(tmp_path / "planted", marker)
    hive = await start_hive(home=tmp_path / "home")
    result = await provision(hive, source=str(planted))
    err = result.error
    assert err is not None and err.code == "PATH_NOT_ALLOWED", result.text
    assert err.details["field"] == "source" and err.details["path"] == str(planted)
    assert str(REPO) in err.details["allowed"], "the hive's own installation is the one source allowed"
    assert any("RBEE_HIVE_WORKER_SOURCES" in s for s in err.suggestions)
    assert not marker.exists(), "the planted build backend ran"
    assert list((tmp_path / "home" / "workers").glob("*")) == [], "nothing was installed"
    assert result.lines == [], "refused before any step was narrated"
    # A link to it, or a path spelled differently, is the same folder: refused too.
    (tmp_path / "link").symlink_to(planted)
    for spelled in (str(tmp_path / "link"), f"{planted}/../planted", f"{planted}/"):
        again = await provision(hive, source=spelled)
        assert again.error is not None and again.error.code == "PATH_NOT_ALLOWED", spelled
    assert not marker.exists()


@pytest.mark.engine
async def test_spawning_without_an_environment_provisions_it_then_spawns(start_hive, tmp_path, default_model):
    """One real engine start: the hive has no worker environment; the spawn
    provisions it (narrated) and the worker runs from it."""
    from rbee.v1 import registry_pb2

    hive = await start_hive(home=tmp_path / "home")
    reply = await hive.spawn(model_path=str(default_model), model_ref="hf:HuggingFaceTB/SmolLM2-135M-Instruct", backend="cpu", device=0)
    items = await hive.follow(reply.worker.id)
    messages = [i.narration.message for i in items if i.HasField("narration")]
    story = "\n".join(messages)
    assert "provisioning it before the spawn" in story
    assert "Sharing the installed engine" in story
    assert story.index("provisioning it before the spawn") < story.index("Starting llm-worker-rbee")
    assert items[-1].worker.state == common_pb2.WORKER_STATE_IDLE
    binary = str(tmp_path / "home" / "workers" / ENV_ID / "bin" / "llm-worker-rbee")
    cmdline = psutil.Process(items[-1].worker.pid).cmdline()
    assert binary in cmdline or any(binary == part for part in cmdline), cmdline
    assert isinstance(reply, registry_pb2.SpawnWorkerResponse)
    await hive.terminate()
