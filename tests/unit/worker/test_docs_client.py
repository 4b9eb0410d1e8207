"""The Python client in docs/inference-api.md, as written there: stubs
generated from protos/ alone, run against the worker program (fake engine)."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import sys

from tests.fixtures.common import REPO
from tests.unit.worker.test_program import KEY, fake_worker

DOC = REPO / "docs" / "inference-api.md"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", DOC.read_text(), re.S)


async def test_the_documented_python_client_runs(tmp_path):
    client_dir = tmp_path / "client-app"
    client_dir.mkdir()
    shutil.copytree(REPO / "protos", client_dir / "protos")
    # The documented setup: generate the stubs, make rbee/ and rbee/v1 packages.
    setup = next(b for b in _blocks("sh") if "grpc_tools.protoc" in b)
    for line in setup.splitlines():
        if line.startswith(("mkdir", "touch")):
            line = line.replace("python -m", f"{sys.executable} -m")
            proc = await asyncio.create_subprocess_shell(line, cwd=client_dir)
            assert await proc.wait() == 0, line
    (script,) = _blocks("python")
    (client_dir / "client.py").write_text(script)

    async with fake_worker(tmp_path, FAKE_ENGINE_MODE="slow", FAKE_ENGINE_DELAY="0.005") as worker:
        await worker.wait_loaded()
        # Nothing of this checkout on the path: only what the client generated.
        env = {"PATH": os.environ["PATH"], "RBEE_WORKER": worker.address, "RBEE_API_KEY": KEY, "PYTHONNOUSERSITE": "1"}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "client.py", cwd=client_dir, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 120)
    out, err = out.decode(), err.decode()
    assert proc.returncode == 0, err
    assert "t1 t2" in out and "--- completion 1 ---" in out
    assert "FINISH_REASON_LENGTH" in err and "top: 't1' -0.10" in err
    assert "cancelled [" in err and "FINISH_REASON_ABORT (enough)" in err
