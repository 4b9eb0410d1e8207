"""A real hive against the attacks on the hive side in docs/security.md: what a spawn may
load, what a worker inherits, and who may read what the hive writes."""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import pytest

from rbee.errors import RbeeError
from rbee.v1 import common_pb2, provisioning_pb2, provisioning_pb2_grpc
from tests.fixtures.hive import HIVE_KEY

pytestmark = pytest.mark.asyncio(loop_scope="session")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def tiny_model(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.safetensors").write_bytes(b"\0" * 4096)
    return folder


async def test_spawn_of_the_filesystem_root_is_refused_at_once_and_the_hive_stays_healthy(start_hive, standin_program, tmp_path):
    """An attack found in review: SpawnWorker on "/" walked the filesystem to size it and
    answered INTERNAL with a PermissionError on /proc in the reply."""
    hive = await start_hive(worker_binary=standin_program, model_dirs=[])
    for path in ("/", "/proc/self", str(tmp_path)):
        started = time.monotonic()
        with pytest.raises(RbeeError) as exc:
            await hive.spawn(model_path=path, backend="cpu", device=0, timeout=30)
        err = exc.value
        assert err.code == "PATH_NOT_ALLOWED", (path, err)
        assert time.monotonic() - started < 5, "refused before anything looked at the path"
        assert err.details["allowed"] == str(hive.home / "models")
        assert "PermissionError" not in str(err) and "Traceback" not in str(err)
    assert await hive.list() == []
    assert "Preflight" not in hive.text()


async def test_a_worker_gets_what_the_engine_needs_and_none_of_the_hives_secrets(start_hive, standin_program, tmp_path):
    dumps = tmp_path / "env-dumps"
    dumps.mkdir()
    given = {
        "HF_TOKEN": "hf_the_hives_token",
        "HUGGING_FACE_HUB_TOKEN": "hf_old_name",
        "AWS_SECRET_ACCESS_KEY": "aws-secret",
        "GITHUB_TOKEN": "ghp-x",
        "MY_SERVICE_API_KEY": "svc-key",
        "DB_PASSWORD": "pw",
        "UNRELATED_SETTING": "not for workers",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_API_KEY": "a key even under an engine prefix",
        "OMP_NUM_THREADS": "2",
        "OPENBLAS_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_HUB_OFFLINE": "1",
        "TMPDIR": str(tmp_path),
        "STANDIN_ENV_DUMP": str(dumps),
    }
    hive = await start_hive(worker_binary=standin_program, extra_env=given)
    model = tiny_model(tmp_path / "model")
    # With a key of its own: by default a worker serves with the hive's key
    # (scoped keys are a change of their own), which is not what is tested here.
    reply = await hive.spawn(model_path=str(model), backend="cpu", device=0, worker_api_key="the-workers-own-key")
    await hive.follow(reply.worker.id)
    env = json.loads((dumps / f"{reply.worker.id}.env.json").read_text())
    for secret in ("RBEE_HIVE_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "AWS_SECRET_ACCESS_KEY", "GITHUB_TOKEN",
                   "MY_SERVICE_API_KEY", "DB_PASSWORD", "VLLM_API_KEY"):  # fmt: skip
        assert secret not in env, secret
    assert HIVE_KEY not in env.values(), "the hive's key reaches the worker under no name"
    assert "UNRELATED_SETTING" not in env
    assert not [name for name in env if name.startswith("RBEE_HIVE_")], "the hive's own settings stay with the hive"
    for name in ("VLLM_CPU_KVCACHE_SPACE", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "LANG",
                 "LC_ALL", "HF_HOME", "HF_HUB_OFFLINE", "STANDIN_ENV_DUMP"):  # fmt: skip
        assert env[name] == given[name], name
    # The temp folder given, or (sandboxed, when it holds the hive's home) a
    # private folder of the worker's own inside it.
    own = Path(env["TMPDIR"])
    assert env["TMPDIR"] == given["TMPDIR"] or (
        own.parent == tmp_path and own.name.startswith(f"rbee-{reply.worker.id}-")
    ), env["TMPDIR"]
    assert env["PATH"] == os.environ["PATH"] or env["PATH"].endswith(os.environ["PATH"])
    assert env["HOME"] and env["PYTHONUNBUFFERED"] == "1"
    assert env["RBEE_HOME"] == str(hive.home)
    # Its own keys: the one clients use and a callback key of its own.
    assert env["RBEE_WORKER_API_KEY"] == "the-workers-own-key"
    assert env["RBEE_CALLBACK_API_KEY"] not in ("", HIVE_KEY)


async def test_what_the_hive_writes_is_its_users_alone(start_hive, standin_program, tmp_path):
    home = tmp_path / "fresh-home"  # created by the hive itself
    hive = await start_hive(home=home, worker_binary=standin_program)
    model = tiny_model(tmp_path / "model")
    reply = await hive.spawn(model_path=str(model), backend="cpu", device=0)
    await hive.follow(reply.worker.id)
    stub = provisioning_pb2_grpc.ProvisioningServiceStub(hive._channel())
    await hive.call(stub.ListModels, provisioning_pb2.ListModelsRequest())
    await hive.call(stub.ListWorkerEnvironments, provisioning_pb2.ListWorkerEnvironmentsRequest())
    for folder in (home / "logs", home / "models", home / "workers"):
        assert mode(folder) == 0o700, folder
    files = [home / "models.db", home / "workers.db", home / "logs" / "rbee-hive.log", home / "logs" / f"{reply.worker.id}.log"]
    files += [p for db in ("models.db", "workers.db") for p in home.glob(f"{db}-*")]
    for path in files:
        assert mode(path) == 0o600, (path, oct(mode(path)))
    assert (await hive.list())[0].state == common_pb2.WORKER_STATE_IDLE


async def test_an_rbee_home_the_hive_creates_is_0700(start_hive, tmp_path):
    """start_hive makes the home folder itself; a hive pointed at a home that
    does not exist yet creates it owner-only."""
    hive = await start_hive(home=tmp_path / "outer")
    created = tmp_path / "outer" / "nested-home"
    second = await start_hive(home=tmp_path / "second", extra_env={"RBEE_HOME": str(created)})
    assert mode(created) == 0o700 and mode(created / "logs") == 0o700
    assert hive.proc.returncode is None and second.proc.returncode is None
