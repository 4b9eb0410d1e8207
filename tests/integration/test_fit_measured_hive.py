"""The measured fit through the real thing (docs/queen.md, "Fit"): a queen, a
local node whose hive runs the stand-in worker (the real worker program and
servicer on a fake engine, a real process tree), the hive's real models.db.
Once the worker has loaded and had its one slot busy, the hive records the
tree's peak memory in its catalog, its model listing carries it, and
`models fit` uses it instead of the estimate, saying so. Before that the
estimate stands."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from tests.fixtures.hive import free_port_block, write_standin_program
from tests.fixtures.models import hive_env
from tests.fixtures.queen import QueenProc, kill_node_hives
from tests.integration.test_queen_tasks import until

pytestmark = pytest.mark.asyncio(loop_scope="session")

REPO = "rbee-test/measured"
REF = f"hf:{REPO}"
FILES = {"config.json": b'{"model_type": "llama", "max_position_embeddings": 1024}', "model.safetensors": b"\0" * 2_000_000,
         "tokenizer.json": b"{}"}  # fmt: skip
MiB = 1024**2


async def fit_json(queen: QueenProc) -> dict:
    code, out, err = await queen.keeper("models", "fit", REF, "--json", "--slots", "1")
    assert code == 0, err
    return {n["node"]: n for n in json.loads(out)["nodes"]}


def catalog_rows(home: Path) -> list[tuple]:
    with sqlite3.connect(home / "models.db") as db:
        return db.execute("SELECT model_ref, backend, dtype, slots, context, peak_bytes, device_peak_bytes, full_load FROM measured_fits").fetchall()


async def test_a_loaded_workers_peak_is_recorded_and_replaces_the_estimate_in_models_fit(queen_factory, hub, tmp_path: Path) -> None:
    hub.add_repo(REPO, FILES)
    program = write_standin_program(tmp_path / "standin")
    # One slot, and a request that holds it for seconds: the hive's samples (every 2 s) see the worker at full load.
    queen = await queen_factory(**hive_env(hub, RBEE_HIVE_WORKER_BINARY=str(program), STANDIN_LOAD_S="0.3", STANDIN_CHILD="1",
                                           RBEE_HIVE_WORKER_ENV="STANDIN_*,FAKE_ENGINE_*", FAKE_ENGINE_MODE="slow",
                                           FAKE_ENGINE_DELAY="1.5"))  # fmt: skip
    home = tmp_path / "home-b"
    try:
        code, _, err = await queen.keeper("setup", "add-node", "--name", "b", "--local", "--rbee-home", str(home),
                                          "--hive-port", str(free_port_block(1)))  # fmt: skip
        assert code == 0, err
        code, _, err = await queen.keeper("setup", "check-node", "--name", "b")  # starts b's hive
        assert code == 0, err
        code, _, err = await queen.keeper("models", "download", REF, "--node", "b")
        assert code == 0, err
        before = (await fit_json(queen))["b"]
        assert before["basis"] == "estimate" and "measured" not in before and before["need_bytes"] == before["estimate"]["bytes"]

        code, out, err = await queen.keeper("infer", "--model", REF, "--node", "b", "--prompt", "hi", "--max-tokens", "3", "--slots", "1")
        assert code == 0, err

        async def measured() -> dict | None:
            row = (await fit_json(queen))["b"]
            return row if row["basis"] == "measured" else None

        row = await until(measured, timeout=60)
        assert row, "the hive never listed a measurement"
        [(ref, backend, dtype, slots, context, peak, device, full_load)] = catalog_rows(home)
        # The worker's own settings: its reported dtype, its one slot, the model's 1024-token context; seen at full load.
        assert (ref, backend, slots, context, device, full_load) == (REF, "cpu", 1, 1024, 0, 1) and dtype == row["estimate"]["dtype"]
        # The stand-in and its engine child: two Python processes, the worker with grpc and the servicer loaded.
        assert 40 * MiB < peak < 2048 * MiB, peak
        # models fit uses the catalog's figure (it may have grown since: the hive keeps the highest)
        assert row["measured"]["bytes"] == row["need_bytes"] and row["need_bytes"] <= peak
        assert row["spare_bytes"] == row["free_bytes"] - row["need_bytes"]
        assert row["estimate"]["bytes"] > row["need_bytes"]  # the estimate counts a real engine's 2 GiB

        code, out, err = await queen.keeper("models", "fit", REF, "--slots", "1")
        assert code == 0, err
        header, *lines = out.splitlines()
        assert header.split() == ["NODE", "NEED", "FREE", "FIT"]
        [line] = [entry for entry in lines if entry.startswith("b ")]
        assert f"measured {row['need_bytes'] / 1024**3:.1f} GiB ({dtype}, 1×1024; estimate " in line and "to spare" in line, line
    finally:
        kill_node_hives(home)
