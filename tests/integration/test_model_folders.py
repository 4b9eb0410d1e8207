"""One model reference, one folder: references the old folder names merged
(`hf:o/r/x/y.F` and `hf:o/r/x--y.F`) get folders of their own on a real hive,
and removing one leaves the other's files; a catalog written when two
references did share a folder keeps what the other still uses."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from rbee_hive.catalog.models import ModelCatalog, ModelRecord
from tests.fixtures.hive import HIVE_KEY
from tests.hubserver import make_blob

pytestmark = pytest.mark.asyncio(loop_scope="session")

NESTED, FLAT = make_blob(4096, seed=1), make_blob(4096, seed=2)


def keeper_models(keeper, hive, *args):
    return keeper("models", *args, "--hive", hive.address, "--api-key", HIVE_KEY)


async def run(proc) -> None:
    assert await asyncio.to_thread(proc.finish) == 0, proc.describe()


async def test_references_that_shared_a_folder_are_kept_apart(hub, hub_hive, keeper) -> None:
    hub.add_repo("acme/m", {"config.json": b"{}", "x/y.safetensors": NESTED, "x--y.safetensors": FLAT})
    hive = await hub_hive()
    nested, flat = "hf:acme/m/x/y.safetensors", "hf:acme/m/x--y.safetensors"
    await run(keeper_models(keeper, hive, "download", nested))
    await run(keeper_models(keeper, hive, "download", flat))
    listed = keeper_models(keeper, hive, "list", "--json")
    await run(listed)
    paths = {m["model_ref"]: Path(m["local_path"]) for m in map(json.loads, listed.stdout.splitlines())}
    assert paths[nested].read_bytes() == NESTED and paths[flat].read_bytes() == FLAT
    assert paths[nested].parent.parent != paths[flat].parent

    await run(keeper_models(keeper, hive, "rm", flat))
    assert paths[nested].read_bytes() == NESTED
    assert not paths[flat].exists()


async def test_a_folder_two_old_rows_share_is_kept_for_the_other(tmp_path: Path) -> None:
    models = tmp_path / "models"
    shared = models / "hf" / "o--r--x--y.gguf"
    (shared / "x").mkdir(parents=True)
    (shared / "x" / "y.gguf").write_bytes(b"nested")
    (shared / "x--y.gguf").write_bytes(b"flat")
    catalog = ModelCatalog(tmp_path / "models.db")
    try:
        for reference, local in (("o/r/x/y.gguf", shared / "x" / "y.gguf"), ("o/r/x--y.gguf", shared / "x--y.gguf")):
            catalog.add(ModelRecord("hf", reference, str(local), 6, "gguf", {"folder": str(shared)}))
        catalog.remove("hf", "o/r/x--y.gguf", owned_root=models)
        assert (shared / "x" / "y.gguf").read_bytes() == b"nested"
        assert [r.reference for r in catalog.list()] == ["o/r/x/y.gguf"]
        catalog.remove("hf", "o/r/x/y.gguf", owned_root=models)
        assert not shared.exists()
    finally:
        catalog.close()
