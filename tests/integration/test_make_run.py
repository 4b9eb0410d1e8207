"""`make run` (scripts/run.sh) end to end on the stand-in worker: a log made
with `scripts/run.sh > run.log 2>&1` holds the whole run from its first line;
answers go to stdout, narration and timings to stderr as narration lines."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest

from tests.fixtures.common import REPO, proc_env
from tests.fixtures.hive import write_standin_program

pytestmark = pytest.mark.asyncio(loop_scope="session")

SCRIPT = REPO / "scripts" / "run.sh"
# The stand-in worker's answer to every prompt of 8 tokens (its fake engine's
# token k is "t{k} ", tests/unit/worker/fakes.py).
ANSWER = "t1 t2 t3 t4 t5 t6 t7 t8 "


def run_env(tmp_path: Path) -> dict[str, str]:
    # The local node's hive keeps its state in $HOME/.rbee: a private HOME.
    home = tmp_path / "user" / ".rbee"
    model = home / "models" / "tiny"
    model.mkdir(parents=True)
    (model / "config.json").write_text('{"model_type": "llama"}')
    (model / "model.safetensors").write_bytes(b"\0" * 4096)
    worker = write_standin_program(tmp_path / "bin")
    return proc_env(HOME=str(home.parent), RBEE_HOME=str(home), RBEE_RUN_MODEL=str(model), RBEE_HIVE_WORKER_BINARY=str(worker),
                    RBEE_RUN_MAX_TOKENS="8")  # fmt: skip


async def run_script(env: dict[str, str], stdout, stderr) -> int:
    proc = await asyncio.create_subprocess_exec("bash", str(SCRIPT), stdout=stdout, stderr=stderr,
                                                stdin=asyncio.subprocess.DEVNULL, env=env, cwd=REPO)  # fmt: skip
    return await asyncio.wait_for(proc.wait(), 300)


async def test_a_redirected_log_holds_the_whole_run(tmp_path: Path) -> None:
    env = run_env(tmp_path)
    log = tmp_path / "run.log"
    with log.open("w") as out:
        code = await run_script(env, out, asyncio.subprocess.STDOUT)
    text = log.read_text()
    assert code == 0, text
    assert text.startswith("[make-run] 👑 starting a persistent queen"), text[:400]
    assert "[make-run] ✅ done" in text.splitlines()[-1], text[-400:]
    # Both answers, each after the narration line that announces it.
    answer = next(line for line in text.splitlines() if line.strip() and not line.startswith("["))
    assert text.count(answer + "\n") >= 2, text


async def test_answers_on_stdout_timings_on_stderr_as_narration(tmp_path: Path) -> None:
    env = run_env(tmp_path)
    out_file, err_file = tmp_path / "out.txt", tmp_path / "err.txt"
    with out_file.open("w") as out, err_file.open("w") as err:
        code = await run_script(env, out, err)
    stdout, stderr = out_file.read_text(), err_file.read_text()
    assert code == 0, stderr
    # The cold and the warm answer first (the stand-in answers a prompt the same way each time).
    answers = [line for line in stdout.splitlines() if line.strip()][:2]
    assert len(answers) == 2 and answers[0] == answers[1] and not answers[0].startswith("["), stdout
    assert answers[0] not in stderr.splitlines()
    # No bare number lines anywhere; each timing is a narration line.
    assert not [line for line in (stdout + stderr).splitlines() if re.fullmatch(r"\s*[\d.]+\s*", line)]
    assert re.search(r"^\[make-run\] ⏱️ +cold start: [\d.]+s end to end · warm start: [\d.]+s end to end$", stderr, re.M), stderr
