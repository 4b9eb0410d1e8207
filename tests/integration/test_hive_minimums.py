"""The hive preflight's floor through the real thing (docs/behaviour.md S4.2,
docs/queen.md "Hive preflight: the smallest node"): a real queen, a local node
whose real hive sees figures pinned by its resource override file (re-read on
every query, so one hive goes below and above the floor), the keeper as a
subprocess."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fixtures.hive import write_overrides, write_standin_program
from tests.fixtures.models import hive_env
from tests.fixtures.queen import kill_node_hives
from tests.integration.test_queen_placement import add_local, small_install

pytestmark = pytest.mark.asyncio(loop_scope="session")

GiB = 1024**3
REPO = "rbee-test/floor"
FILES = {"config.json": b'{"model_type": "llama"}', "model.safetensors": b"\0" * 1_000_000, "tokenizer.json": b"{}"}
GPU = {"name": "Pinned GPU", "vram_total_bytes": 24 * GiB, "vram_available_bytes": 24 * GiB}


async def test_check_node_refuses_a_node_below_the_floor_and_passes_one_at_it(queen_factory, tmp_path: Path) -> None:
    figures = write_overrides(tmp_path / "figures.json", ram_available_bytes=2 * GiB, disk_available_bytes=100 * GiB, gpus=[])
    queen = await queen_factory()
    home = tmp_path / "home-a"
    try:
        await add_local(queen, "a", home, "--install-path", str(small_install(tmp_path / "install-a", figures)))

        # RAM below the CPU floor (3 GiB free by default).
        code, out, err = await queen.keeper("setup", "check-node", "--name", "a")
        assert code == 1 and out == "", err
        assert "INSUFFICIENT_RAM" in err and "(required 3072 MB, available 2048 MB)" in err, err
        assert "rbee-keeper workers shutdown --node a --id WORKER_ID" in err, err
        assert "hive_min_ram_cpu" in err and "RBEE_QUEEN_HIVE_MIN_RAM_CPU" in err, err

        # Disk below the floor (5 GiB free), RAM one byte short is still RAM's refusal first.
        write_overrides(figures, ram_available_bytes=3 * GiB, disk_available_bytes=4 * GiB, gpus=[])
        code, out, err = await queen.keeper("setup", "check-node", "--name", "a")
        assert code == 1, err
        assert "INSUFFICIENT_DISK" in err and "free 1024 MB more" in err, err
        assert "rbee-keeper models rm MODEL --node a" in err and "hive_min_disk_cpu" in err, err
        write_overrides(figures, ram_available_bytes=3 * GiB - 1, disk_available_bytes=5 * GiB, gpus=[])
        code, out, err = await queen.keeper("setup", "check-node", "--name", "a")
        assert code == 1 and "INSUFFICIENT_RAM" in err, err

        # Exactly at the floor: ready.
        write_overrides(figures, ram_available_bytes=3 * GiB, disk_available_bytes=5 * GiB, gpus=[])
        code, out, err = await queen.keeper("setup", "check-node", "--name", "a")
        assert code == 0, err
        assert "Free RAM and disk above the minimum (cpu: 3.0 GiB RAM, 5.0 GiB disk)" in err, err
        assert "Node a is ready" in err

        # A GPU node with enough for CPU workers but not for CUDA ones (8 GiB RAM,
        # 50 GiB disk): ready, with a warning naming what CUDA workers lack.
        write_overrides(figures, ram_available_bytes=4 * GiB, disk_available_bytes=60 * GiB, gpus=[GPU])
        code, out, err = await queen.keeper("setup", "check-node", "--name", "a")
        assert code == 0, err
        assert "Node a is below the minimum for cuda workers (4.0 GiB of RAM free, needs 8.0 GiB)" in err, err
    finally:
        kill_node_hives(home)


async def test_the_floor_is_a_queen_setting(queen_factory, tmp_path: Path) -> None:
    figures = write_overrides(tmp_path / "figures.json", ram_available_bytes=2 * GiB, disk_available_bytes=100 * GiB, gpus=[])
    queen = await queen_factory(RBEE_QUEEN_HIVE_MIN_RAM_CPU="1.5GiB")
    home = tmp_path / "home-a"
    try:
        await add_local(queen, "a", home, "--install-path", str(small_install(tmp_path / "install-a", figures)))
        code, out, err = await queen.keeper("setup", "check-node", "--name", "a")
        assert code == 0, err
        assert "(cpu: 1.5 GiB RAM, 5.0 GiB disk)" in err, err
    finally:
        kill_node_hives(home)


async def test_a_cold_start_checks_its_backends_floor_before_anything_starts(queen_factory, hub, tmp_path: Path) -> None:
    hub.add_repo(REPO, FILES)
    program = write_standin_program(tmp_path / "standin")
    queen = await queen_factory(**hive_env(hub, RBEE_HIVE_WORKER_BINARY=str(program), STANDIN_LOAD_S="0.3"))
    figures = write_overrides(tmp_path / "figures.json", disk_available_bytes=4 * GiB, gpus=[])
    home = tmp_path / "home-a"
    try:
        await add_local(queen, "a", home, "--install-path", str(small_install(tmp_path / "install-a", figures)))
        infer = ("infer", "--node", "a", "--model", f"hf:{REPO}", "--prompt", "hi", "--max-tokens", "3")

        code, out, err = await queen.keeper(*infer)
        assert code == 1 and out == "", err
        assert "INSUFFICIENT_DISK" in err and "cpu workers need at least 5.0 GiB" in err, err
        assert "rbee-keeper models rm MODEL --node a" in err, err
        assert "Downloading" not in err and "Starting llm-worker-rbee" not in err, err

        write_overrides(figures, disk_available_bytes=100 * GiB, gpus=[])
        code, out, err = await queen.keeper(*infer)
        assert code == 0, err
        assert out == "t1 t2 t3 \n" and "Free RAM and disk above the minimum (cpu: 3.0 GiB RAM, 5.0 GiB disk)" in err, err
    finally:
        kill_node_hives(home)
