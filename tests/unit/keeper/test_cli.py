"""The `rbee-keeper infer` process (real signals, real exit codes) against a
scripted in-process worker."""

from __future__ import annotations


import asyncio
import os
import signal
from pathlib import Path

import pytest

from tests.fixtures.common import VENV_BIN, proc_env
from tests.fixtures.ports import free_port
from tests.unit.keeper.fake_worker import API_KEY, Script, start_fake

pytestmark = pytest.mark.asyncio(loop_scope="session")

KEEPER = str(VENV_BIN / "rbee-keeper")


class Keeper:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.stdout = b""

    async def read_until_output(self) -> None:
        """Until the keeper printed its first token."""
        assert self.proc.stdout is not None
        chunk = await self.proc.stdout.read(1)
        assert chunk, "keeper exited before printing anything"
        self.stdout += chunk

    async def finish(self) -> tuple[int, str, str]:
        out, err = await self.proc.communicate()
        self.stdout += out
        return self.proc.returncode, self.stdout.decode(), err.decode()


async def keeper(tmp_path: Path, *args: str, **env: str) -> Keeper:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    environment = proc_env(HOME=str(home), RBEE_HOME=str(tmp_path / "rbee"), **env)
    environment.pop("RBEE_API_KEY", None)
    environment.pop("RBEE_CONFIG", None)
    environment.update(env)
    proc = await asyncio.create_subprocess_exec(
        KEEPER, "infer", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=environment,
    )
    return Keeper(proc)


async def run_keeper(tmp_path: Path, *args: str, **env: str) -> tuple[int, str, str]:
    return await (await keeper(tmp_path, *args, **env)).finish()


@pytest.fixture
async def fake(request):
    script = getattr(request, "param", None) or Script()
    server, servicer, address = await start_fake(script)
    yield servicer, address
    await server.stop(None)


async def test_tokens_only_on_stdout(tmp_path, fake):
    _, address = fake
    code, out, err = await run_keeper(tmp_path, "--worker", address, "--api-key", API_KEY, "--prompt", "hi")
    assert code == 0, err
    assert out == "Hello, bees!\n"  # the answer, ended with a newline
    assert "[rbee-keeper] 🐝" in err and "4 tokens in" in err and "tokens/s" in err


async def test_key_from_environment_and_its_source_on_failure(tmp_path, fake):
    _, address = fake
    code, _, err = await run_keeper(tmp_path, "--worker", address, "--prompt", "hi", RBEE_API_KEY=API_KEY)
    assert code == 0, err
    code, out, err = await run_keeper(tmp_path, "--worker", address, "--prompt", "hi", RBEE_API_KEY="not-the-key")
    assert code == 1 and out == ""
    assert "INVALID_API_KEY" in err and f"host: {address}" in err and "key_from: RBEE_API_KEY" in err
    assert "not-the-key" not in err and "Traceback" not in err


async def test_missing_key(tmp_path, fake):
    _, address = fake
    code, _, err = await run_keeper(tmp_path, "--worker", address, "--prompt", "hi")
    assert code == 1 and "MISSING_API_KEY" in err and address in err


async def test_queen_mode_starts_an_ephemeral_queen_and_names_an_unknown_node(tmp_path):
    """No queen answers: one is started for the command; the node is unknown
    to it, which the keeper reports with the command that adds one; the
    queen is stopped again."""
    port = free_port()
    code, out, err = await run_keeper(tmp_path, "--node", "workstation", "--model", "hf:org/repo", "--prompt", "hi",
                                      "--queen", f"127.0.0.1:{port}")  # fmt: skip
    assert code == 1 and out == ""
    assert "starting one for this command (ephemeral" in err
    assert "NODE_NOT_FOUND" in err and "rbee-keeper setup add-node --name workstation" in err
    assert "Stopping the queen started for this command" in err


@pytest.mark.parametrize("fake", [Script(tokens=[f"w{i} " for i in range(500)], token_delay_s=0.02)], indirect=True)
async def test_ctrl_c_cancels_on_the_worker_and_exits_130(tmp_path, fake):
    servicer, address = fake
    k = await keeper(tmp_path, "--worker", address, "--api-key", API_KEY, "--prompt", "hi", "--max-tokens", "500")
    await k.read_until_output()
    k.proc.send_signal(signal.SIGINT)
    code, out, err = await k.finish()
    assert code == 130, err
    assert len(servicer.cancels) == 1 and servicer.requests[0].request_id == servicer.cancels[0]
    assert "Ctrl+C: cancelling request" in err and "the worker confirmed" in err
    assert out.startswith("w0 ") and "w499" not in out
    assert "Traceback" not in err


@pytest.mark.parametrize("fake", [Script(tokens=["a"] * 50, stall_after=1, cancel_hangs=True)], indirect=True)
async def test_second_ctrl_c_quits_at_once(tmp_path, fake):
    servicer, address = fake
    k = await keeper(tmp_path, "--worker", address, "--api-key", API_KEY, "--prompt", "hi")
    await k.read_until_output()
    k.proc.send_signal(signal.SIGINT)
    while not servicer.cancels:  # the keeper is now waiting for an acknowledgement that never comes
        await asyncio.sleep(0.01)
    k.proc.send_signal(signal.SIGINT)
    code, _, err = await k.finish()
    assert code == 130
    assert "second Ctrl+C: quitting now" in err
    assert "did not confirm" not in err


@pytest.mark.parametrize("fake", [Script(tokens=["one", " two", " three"], stall_after=2)], indirect=True)
async def test_stall_through_the_cli(tmp_path, fake):
    servicer, address = fake
    code, out, err = await run_keeper(
        tmp_path, "--worker", address, "--api-key", API_KEY, "--prompt", "hi", "--max-tokens", "9",
        RBEE_KEEPER_STALL_TIMEOUT_S="0.5",
    )
    assert code == 1
    assert out == "one two\n"
    assert "STREAM_STALLED" in err and "tokens generated: 2 / 9" in err
    assert len(servicer.cancels) == 1
    saved = list((tmp_path / "rbee" / "partial").glob("*.partial.txt"))
    assert len(saved) == 1 and saved[0].read_text() == "one two"
    assert f"partial result: {saved[0]}" in err


@pytest.mark.parametrize(
    "args, code_name",
    [
        (["--max-tokens", "0"], "INVALID_ARGUMENT"),
        (["--temperature", "-1"], "INVALID_ARGUMENT"),
        (["--temperature", "9"], "INVALID_ARGUMENT"),
        (["--backend", "tpu"], "INVALID_BACKEND"),
        (["--device", "-2"], "INVALID_DEVICE"),
        (["--stall-timeout", "0"], "INVALID_ARGUMENT"),
        (["--model", "ollama:llama3"], "INVALID_MODEL_REF"),
    ],
)
async def test_validation_fails_before_any_connection(tmp_path, args, code_name):
    # Port 1 on loopback has nothing listening: only validation can answer.
    code, out, err = await run_keeper(tmp_path, "--worker", "127.0.0.1:1", "--api-key", "k", "--prompt", "hi", *args)
    assert code == 1 and out == ""
    assert f"❌ {code_name}" in err
    assert "Cannot reach" not in err and "Sending" not in err and "Traceback" not in err


async def test_help_lists_direct_and_queen_options():
    proc = await asyncio.create_subprocess_exec(KEEPER, "infer", "--help", stdout=asyncio.subprocess.PIPE, env=proc_env(COLUMNS="200"))
    out, _ = await proc.communicate()
    text = out.decode()
    for option in ("--worker", "--api-key", "--max-tokens", "--temperature", "--top-p", "--node", "--model", "--backend", "--device"):
        assert option in text
    assert "--stall-timeout" not in text




@pytest.mark.parametrize("fake", [Script(tokens=[f"w{i} " for i in range(500)], token_delay_s=0.01)], indirect=True)
async def test_closed_stdout_cancels_the_request(tmp_path, fake):
    servicer, address = fake
    read_end, write_end = os.pipe()
    environment = proc_env(HOME=str(tmp_path), RBEE_HOME=str(tmp_path / "rbee"))
    proc = await asyncio.create_subprocess_exec(
        KEEPER, "infer", "--worker", address, "--api-key", API_KEY, "--prompt", "hi", "--max-tokens", "500",
        stdout=write_end, stderr=asyncio.subprocess.PIPE, env=environment,
    )
    os.close(write_end)
    assert await asyncio.to_thread(os.read, read_end, 1)
    os.close(read_end)  # the reader goes away, like `| head -c 1` exiting
    _, err = await proc.communicate()
    assert proc.returncode == 1
    text = err.decode()
    assert "❌ CANCELLED: stdout was closed" in text and "Traceback" not in text and "Exception ignored" not in text
    assert servicer.cancels == [servicer.requests[0].request_id]
