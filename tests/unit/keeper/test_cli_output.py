"""What `rbee-keeper infer` puts where, as scripts use it (S2, S11): the
answer alone in a file stdout is redirected to, `--json` as one parsable
object, `--quiet` leaving stderr empty on success. The installed program
against a scripted in-process worker."""

from __future__ import annotations

import asyncio
import json
import shlex
from pathlib import Path

import pytest

from tests.fixtures.common import VENV_BIN, proc_env
from tests.unit.keeper.fake_worker import API_KEY, Script, start_fake

pytestmark = pytest.mark.asyncio(loop_scope="session")

KEEPER = str(VENV_BIN / "rbee-keeper")


@pytest.fixture
async def worker():
    server, servicer, address = await start_fake(Script())
    yield address
    await server.stop(None)


def environment(tmp_path: Path) -> dict[str, str]:
    env = proc_env(HOME=str(tmp_path / "home"), RBEE_HOME=str(tmp_path / "rbee"), NO_COLOR="1")
    for name in ("RBEE_CONFIG", "RBEE_API_KEY", "RBEE_NODE", "RBEE_QUEEN"):
        env.pop(name, None)
    return env


async def keeper(tmp_path: Path, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        KEEPER, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=environment(tmp_path)
    )
    out, err = await proc.communicate()
    return proc.returncode, out.decode(), err.decode()


async def test_a_redirected_answer_holds_the_answer_and_nothing_else(tmp_path: Path, worker: str) -> None:
    answer = tmp_path / "answer.txt"
    command = f"{shlex.quote(KEEPER)} infer --worker {worker} --api-key {API_KEY} --prompt hi > {shlex.quote(str(answer))}"
    proc = await asyncio.create_subprocess_shell(command, stderr=asyncio.subprocess.PIPE, env=environment(tmp_path))
    _, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    assert answer.read_text() == "Hello, bees!\n"
    assert "[rbee-keeper]" in err.decode() and "4 tokens in" in err.decode()


async def test_json_is_one_object_with_text_finish_reason_counts_and_timings(tmp_path: Path, worker: str) -> None:
    code, out, err = await keeper(tmp_path, "infer", "--worker", worker, "--api-key", API_KEY, "--prompt", "hi", "--json")
    assert code == 0, err
    assert out.count("\n") == 1
    answer = json.loads(out)
    assert answer["text"] == "Hello, bees!"
    assert answer["finish_reason"] == "stop"
    assert answer["tokens_generated"] == 4 and "prompt_tokens" in answer
    assert answer["keeper_elapsed_ms"] >= 0 and "time_to_first_token_ms" in answer and answer["worker"] == worker
    assert "4 tokens in" in err  # the summary stays on stderr


async def test_quiet_leaves_stderr_empty_on_success(tmp_path: Path, worker: str) -> None:
    code, out, err = await keeper(tmp_path, "--quiet", "infer", "--worker", worker, "--api-key", API_KEY, "--prompt", "hi")
    assert code == 0 and out == "Hello, bees!\n" and err == ""


async def test_errors_still_show_with_quiet(tmp_path: Path) -> None:
    code, out, err = await keeper(tmp_path, "--quiet", "infer", "--worker", "127.0.0.1:1", "--api-key", "k", "--prompt", "hi")
    assert code == 1 and out == ""
    assert err.startswith("[rbee-keeper] ❌ CONNECTION_TIMEOUT") and "did not answer" not in err
