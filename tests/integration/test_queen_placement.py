"""Placement through the real thing (docs/queen.md, "Placement" and "Fit"):
one queen, two local nodes with their own homes, hive ports and catalogs,
their hives started by the queen, workers of the stand-in program (the real
worker program and servicer on a fake engine). Node a's free memory is pinned
too small with the hive's resource override file, given to a's hive only by
a launcher in a's install path."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import openai
import pytest

from tests.fixtures.common import VENV_BIN
from tests.fixtures.hive import free_port_block, write_overrides, write_standin_program
from tests.fixtures.models import hive_env
from tests.fixtures.queen import QueenProc, kill_node_hives
from tests.integration.test_queen_tasks import until

pytestmark = pytest.mark.asyncio(loop_scope="session")

REPO = "rbee-test/placed"
REF = f"hf:{REPO}"
FILES = {"config.json": b'{"model_type": "llama"}', "model.safetensors": b"\0" * 3_000_000, "tokenizer.json": b"{}"}
GiB = 1024**3
ANSWER = "t1 t2 t3 "


def small_install(folder: Path, overrides: Path) -> Path:
    """An install path whose rbee-hive is this checkout's, with the override file set."""
    program = folder / ".venv" / "bin" / "rbee-hive"
    program.parent.mkdir(parents=True)
    program.write_text(f"#!/bin/sh\nexport RBEE_HIVE_RESOURCE_OVERRIDES={overrides}\nexec {VENV_BIN / 'rbee-hive'} \"$@\"\n")
    program.chmod(0o755)
    return folder


async def add_local(queen: QueenProc, name: str, home: Path, *extra: str) -> None:
    port = free_port_block(1)
    code, _, err = await queen.keeper("setup", "add-node", "--name", name, "--local", "--rbee-home", str(home), "--hive-port", str(port), *extra)
    assert code == 0, err


async def workers(queen: QueenProc) -> list[dict]:
    code, out, err = await queen.keeper("workers", "list", "--json")
    assert code == 0, err
    return [json.loads(line) for line in out.splitlines()]


async def infer(queen: QueenProc, *extra: str) -> tuple[int, str, str]:
    return await queen.keeper("infer", "--model", REF, "--prompt", "hi", "--max-tokens", "3", *extra)


async def two_nodes(queen_factory, hub, tmp_path: Path, **env: str) -> tuple[QueenProc, dict[str, Path]]:
    """A queen with nodes a (1 GiB free, holding the model) and b (this machine's memory)."""
    hub.add_repo(REPO, FILES)
    program = write_standin_program(tmp_path / "standin")
    # Node a's 1 GiB is below the hive preflight's CPU floor (3 GiB free): lowered here, so that
    # a passes check-node and the placement is what refuses it (tests/integration/test_hive_minimums.py).
    queen = await queen_factory(**hive_env(hub, RBEE_HIVE_WORKER_BINARY=str(program), RBEE_HIVE_WATCH_HEARTBEAT="0.3s",
                                           STANDIN_LOAD_S="0.3", RBEE_QUEEN_HIVE_MIN_RAM_CPU="512MiB", **env))  # fmt: skip
    overrides = write_overrides(tmp_path / "a-resources.json", ram_total_bytes=2 * GiB, ram_available_bytes=GiB)
    homes = {"a": tmp_path / "home-a", "b": tmp_path / "home-b"}
    await add_local(queen, "a", homes["a"], "--install-path", str(small_install(tmp_path / "install-a", overrides)))
    await add_local(queen, "b", homes["b"])
    # a holds the model: the placement prefers a holder, but only where it fits.
    code, _, err = await queen.keeper("setup", "check-node", "--name", "a")
    assert code == 0, err
    code, _, err = await queen.keeper("models", "download", REF, "--node", "a")
    assert code == 0, err
    return queen, homes


async def test_a_model_too_big_for_a_runs_on_b_and_the_narration_names_both(queen_factory, hub, tmp_path: Path) -> None:
    homes = {"a": tmp_path / "home-a", "b": tmp_path / "home-b"}
    try:
        queen, homes = await two_nodes(queen_factory, hub, tmp_path)

        code, out, err = await infer(queen)
        assert code == 0, err
        assert out == ANSWER + "\n"
        [placed] = [line for line in err.splitlines() if "Placed on" in line]
        assert "Placed on b: fits, " in placed and "GiB to spare; a: short by 2.0 GiB" in placed, placed
        [worker] = await until(lambda: workers(queen))
        assert worker["node"] == "b"

        # Next time the warm worker on b is the placement.
        code, out, err = await infer(queen)
        assert code == 0 and out == ANSWER + "\n", err
        assert f"Placed on b: warm worker {worker['id']}" in err, err

        # Pinned on a: refused with the same table, before any start.
        code, out, err = await infer(queen, "--node", "a")
        assert code == 1 and out == ""
        assert "NO_NODE_FITS" in err and "does not fit on node a: a: short by 2.0 GiB" in err, err
        assert "rbee-keeper models fit" in err

        # The table alone: per node the estimate, free memory, fits / short by.
        code, out, err = await queen.keeper("models", "fit", REF)
        assert code == 0, err
        header, *lines = out.splitlines()
        assert header.split() == ["NODE", "NEED", "FREE", "FIT"]
        row_a = next(line for line in lines if line.startswith("a "))
        row_b = next(line for line in lines if line.startswith("b "))
        # 3 MB of weights, the worker's KV cache fallback (config.json gives no figures), the engine.
        # (the dtype is this machine's: bfloat16 where the CPU has it natively)
        assert re.search(r"3\.0 GiB = weights 0\.0 GiB \((float32|bfloat16)\) \+ KV 1\.0 GiB \(8×2048\) \+ engine 2\.0 GiB", row_a), row_a
        assert "1.0 GiB" in row_a and row_a.endswith("short by 2.0 GiB") and "to spare" in row_b
        assert f"Placed on b: warm worker {worker['id']}" in err

        code, out, err = await queen.keeper("models", "fit", REF, "--json", "--slots", "2")
        assert code == 0, err
        fit = json.loads(out)
        assert fit["placed_node"] == "b" and fit["model"] == REF
        nodes = {n["node"]: n for n in fit["nodes"]}
        a = nodes["a"]
        assert a["reachable"] and a["holds_model"] and not a["fits"] and a["free_bytes"] == GiB
        assert a["estimate"]["slots"] == 2 and a["estimate"]["weights_bytes"] == 3_000_000
        assert a["estimate"]["bytes"] == 3_000_000 + GiB + 2 * GiB and a["spare_bytes"] == -(2 * GiB + 3_000_000)
        assert nodes["b"]["fits"] and nodes["b"]["spare_bytes"] > 0

        code, _, err = await queen.keeper("models", "fit", "not a ref")
        assert code == 1 and "INVALID_MODEL_REF" in err
    finally:
        for home in homes.values():
            kill_node_hives(home)


async def test_the_front_door_places_a_cold_start_and_refuses_a_pinned_node_that_cannot_fit(queen_factory, hub, tmp_path: Path) -> None:
    port = free_port_block(1)
    homes = {"a": tmp_path / "home-a", "b": tmp_path / "home-b"}
    try:
        queen, homes = await two_nodes(queen_factory, hub, tmp_path, RBEE_QUEEN_HTTP_PORT=str(port))
        key = (queen.home / "queen.key").read_text().strip()
        body = {"model": REF, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True}
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=120,
                                     headers={"Authorization": f"Bearer {key}"}) as http:  # fmt: skip
            async with http.stream("POST", "/v1/chat/completions", json=body) as resp:
                assert resp.status_code == 200, await resp.aread()
                text = "".join([chunk async for chunk in resp.aiter_text()])
            comments = [e for e in text.split("\n\n") if e.startswith(": ")]
            assert any("Placed on b: fits, " in c and "a: short by 2.0 GiB" in c for c in comments), text
            assert f"loading {REF} on b" in text and text.rstrip().endswith("data: [DONE]")
            [worker] = await until(lambda: workers(queen))
            assert worker["node"] == "b"

        # Pinned with X-Rbee-Node on a: the official client's 503 with the table.
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0)
        with pytest.raises(openai.InternalServerError) as refused:
            await client.chat.completions.create(model=REF, messages=body["messages"], max_tokens=3,
                                                 extra_headers={"X-Rbee-Node": "a"})  # fmt: skip
        assert refused.value.status_code == 503 and refused.value.code == "no_node_fits"
        assert "does not fit on node a: a: short by 2.0 GiB" in refused.value.message
        await client.close()
    finally:
        for home in homes.values():
            kill_node_hives(home)
