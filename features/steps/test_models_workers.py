"""Steps for models_workers.feature (S5.3): worker environments provisioned
for real from this checkout through a real hive."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest
from pytest_bdd import given, parsers, scenarios, then, when

from features.steps.models_support import SyncHive
from rbee.v1 import common_pb2, provisioning_pb2
from rbee_hive.catalog.workers import WorkerCatalog
from rbee_hive.provisioner.engines import hive_site_packages
from rbee_hive.provisioner.resolver import ProvisioningResolver
from rbee_hive.provisioner.environments import ENGINE_LINK, WorkerProvisioner
from tests.fixtures.common import REPO
from tests.fixtures.hive import fake_worker_project

scenarios("models_workers.feature")

ENV_ID = "llm-worker-rbee-cpu"


class S53:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.hive: SyncHive | None = None
        self.lines: list[str] = []
        self.env = None
        self.first = None
        self.error = None
        self.binary: Path | None = None

    @property
    def home(self) -> Path:
        return self.tmp / "hive-home"


@pytest.fixture
def s53(tmp_path):
    state = S53(tmp_path)
    yield state
    if state.hive is not None:
        state.hive.stop()


@given("a hive on this node")
def _hive(s53):
    # No hub is needed for worker environments. Its operator allows the two
    # folders the failure scenarios build from (S13: only configured sources).
    sources = f"{s53.tmp / 'not-a-project'}:{s53.tmp / 'fake'}"
    s53.hive = SyncHive(s53.home, "http://127.0.0.1:9", {"RBEE_HIVE_WORKER_SOURCES": sources})


@given("a hive on this node without an NVIDIA driver")
def _hive_no_cuda(s53):
    from rbee_hive.nvml import Nvml

    if Nvml().probe().available:
        pytest.skip("this node has a working NVIDIA driver")
    _hive(s53)


@given("no worker environment is recorded on this node")
def _none(s53):
    assert not (s53.home / "workers.db").exists()


def _provision(s53, backend="cpu", source="", force=False):
    s53.lines, s53.env, s53.error = s53.hive.provision(backend, source, force)


@when("the hive provisions the cpu worker environment")
def _provision_cpu(s53):
    _provision(s53)
    assert s53.error is None, "\n".join(s53.lines)
    s53.first = s53.env


@when("the hive provisions the cpu worker environment again")
def _again(s53):
    _provision(s53)


@when("the hive provisions the cpu worker environment with force")
def _force(s53):
    (Path(s53.first.path) / "lib" / "python3.11" / "site-packages" / "rbee" / "stale-marker").write_text("old")
    _provision(s53, force=True)


@when("the hive provisions the cpu worker environment from a folder that is not a project")
def _not_project(s53):
    folder = s53.tmp / "not-a-project"
    folder.mkdir()
    (folder / "notes.txt").write_text("no pyproject here")
    _provision(s53, source=str(folder))


@when("the hive provisions the cpu worker environment from a project whose llm-worker-rbee exits with an error")
def _bad_entry(s53):
    src = fake_worker_project(s53.tmp / "fake", "import sys\n\ndef main():\n    sys.exit(2)\n")
    _provision(s53, source=str(src))


@when("the hive provisions the cuda worker environment")
def _cuda(s53):
    _provision(s53, backend="cuda")


@when("the hive looks up the worker program for cpu")
def _resolve(s53):
    provisioner = WorkerProvisioner(WorkerCatalog(s53.home / "workers.db"), s53.home, source=REPO)
    resolver = ProvisioningResolver(provisioner)
    s53.binary = asyncio.run(resolver.resolve("cpu", lambda emoji, message, level="info": s53.lines.append(message)))


@then(parsers.parse('the environment "{env_id}" is recorded with its path, version and install time'))
def _recorded(s53, env_id):
    env = s53.env
    env_dir = s53.home / "workers" / env_id
    assert (env.id, env.backend, env.worker_type, env.path) == (env_id, common_pb2.BACKEND_CPU, "llm-worker-rbee", str(env_dir))
    assert env.binary_path == str(env_dir / "bin" / "llm-worker-rbee") and env.source.startswith(str(REPO))
    assert env.version == "0.1.0" and env.installed_at_unix_ms > 0
    row = WorkerCatalog(s53.home / "workers.db").get(env_id)
    assert row is not None and row.path == env.path and row.backend == "cpu"
    assert row.installed_at_unix * 1000 == env.installed_at_unix_ms
    # ListWorkerEnvironments shows it for its backend only.
    listed = s53.hive.stub.ListWorkerEnvironments(
        provisioning_pb2.ListWorkerEnvironmentsRequest(backend=common_pb2.BACKEND_CPU), metadata=s53.hive.md, timeout=60
    )
    assert [e.id for e in listed.environments] == [env_id]
    cuda = s53.hive.stub.ListWorkerEnvironments(
        provisioning_pb2.ListWorkerEnvironmentsRequest(backend=common_pb2.BACKEND_CUDA), metadata=s53.hive.md, timeout=60
    )
    assert list(cuda.environments) == []


@then(parsers.parse('it shares the installed engine "{engine}"'))
def _shares(s53, engine):
    assert s53.env.engine == f"{engine} (shared)"
    assert any(f"Sharing the installed engine {engine}" in line and "no second install" in line for line in s53.lines)
    # The engine is linked, not copied: the environment itself stays small.
    site = Path(s53.env.path) / "lib" / "python3.11" / "site-packages"
    assert (site / ENGINE_LINK).read_text().strip() == str(hive_site_packages())
    assert not (site / "vllm").exists() and not (site / "torch").exists()
    # rbee is the environment's own copy; the engine comes from the shared folder
    # (run from /tmp, so the checkout in the working directory cannot be imported by accident).
    code = "import rbee, rbee_worker, vllm; print(rbee.__file__); print(vllm.__file__)"
    out = subprocess.run([f"{s53.env.path}/bin/python", "-c", code], capture_output=True, text=True, cwd="/tmp", timeout=120)
    assert out.returncode == 0, out.stderr
    rbee_file, vllm_file = out.stdout.strip().splitlines()
    assert rbee_file.startswith(str(site)) and vllm_file.startswith(str(hive_site_packages()))


@then("its llm-worker-rbee answers --version")
def _version(s53):
    out = subprocess.run([s53.env.binary_path, "--version"], capture_output=True, text=True, timeout=60, cwd="/tmp")
    assert out.returncode == 0 and out.stdout.startswith("llm-worker-rbee 0.1.0")


@then("it says there is nothing to do")
def _nothing(s53):
    assert s53.error is None and any("nothing to do" in line for line in s53.lines)
    assert s53.env.installed_at_unix_ms == s53.first.installed_at_unix_ms
    assert not any("Installing" in line or "Creating" in line for line in s53.lines)


@then("the environment is rebuilt")
def _rebuilt(s53):
    assert s53.error is None
    assert any("Removing the old environment" in line for line in s53.lines)
    assert any("Sharing the installed engine" in line for line in s53.lines)
    assert s53.env.installed_at_unix_ms >= s53.first.installed_at_unix_ms
    assert not (Path(s53.env.path) / "lib" / "python3.11" / "site-packages" / "rbee" / "stale-marker").exists()


@then("it narrates that it provisions the environment before the spawn")
def _narrated(s53):
    assert "provisioning it before the spawn" in s53.lines[0]


@then("it returns the environment's llm-worker-rbee")
def _returned(s53):
    assert s53.binary == s53.home / "workers" / ENV_ID / "bin" / "llm-worker-rbee"
    assert any("ready" in line for line in s53.lines)
    assert WorkerCatalog(s53.home / "workers.db").get(ENV_ID) is not None


@then("it fails with WORKER_BUILD_FAILED naming the worker type and backend")
def _build_failed(s53):
    err = s53.error
    assert err is not None and err.code == "WORKER_BUILD_FAILED"
    assert "llm-worker-rbee for cpu" in err.message
    assert err.details["worker_type"] == "llm-worker-rbee" and err.details["backend"] == "cpu"


@then("the error carries pip's error lines")
def _lines(s53):
    output = s53.error.details["output"]
    assert "ERROR" in output and ("pyproject.toml" in output or "setup.py" in output), output


@then(parsers.parse('it fails with "{text}" naming the program\'s path'))
def _verify_failed(s53, text):
    err = s53.error
    assert err is not None and err.code == "BINARY_VERIFICATION_FAILED"
    assert err.message.startswith(f"{text}: {s53.home / 'workers' / ENV_ID / 'bin' / 'llm-worker-rbee'}")


@then("it fails with CUDA_NOT_AVAILABLE and the CUDA install link")
def _cuda_failed(s53):
    err = s53.error
    assert err is not None and err.code == "CUDA_NOT_AVAILABLE"
    assert any("https://developer.nvidia.com/cuda-downloads" in s for s in err.suggestions)
