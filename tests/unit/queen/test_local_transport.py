"""LocalTransport: a node that is the queen's own machine runs the same
commands as local processes (`sh -c`), with the transport's promises: exit
status and output, stdin, a deadline that ends the command, files written
owner-only and atomically, programs started to outlive the call."""

from __future__ import annotations

import asyncio
import os
import shlex
import signal
import stat
import sys
import time
from pathlib import Path

import psutil
import pytest

from rbee.errors import RbeeError
from rbee_queen.nodes.local import LocalTransport

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest.fixture
async def local():
    transport = LocalTransport("here")
    await transport.connect()
    yield transport
    await transport.close()


async def wait_gone(pid: int, timeout: float = 10.0) -> bool:
    try:
        proc = psutil.Process(pid)
        await asyncio.to_thread(proc.wait, timeout)
    except psutil.NoSuchProcess:
        pass
    except psutil.TimeoutExpired:
        return False
    return True


async def test_run_returns_exit_status_stdout_and_stderr(local: LocalTransport) -> None:
    result = await local.run("echo out; echo err >&2; exit 3")
    assert (result.exit_status, result.stdout, result.stderr) == (3, "out\n", "err\n")
    assert not result.ok and result.tail() == "out\nerr"
    missing = await local.run("/no/such/program --version")
    assert missing.exit_status == 127


async def test_input_goes_to_stdin_and_no_input_means_an_empty_stdin(local: LocalTransport) -> None:
    result = await local.run("cat; echo done", input="first line\nsecond line\n")
    assert result.ok and result.stdout == "first line\nsecond line\ndone\n"
    # Without input nothing waits on a terminal: stdin reads as empty at once.
    quick = await local.run("cat; echo done", timeout=5)
    assert quick.stdout == "done\n"


async def test_a_command_past_its_deadline_is_ended_with_deadline_exceeded(local: LocalTransport, tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    started = time.monotonic()
    with pytest.raises(RbeeError) as caught:
        await local.run(f"echo $$ > {shlex.quote(str(pid_file))}; sleep 30 & wait", timeout=0.5)
    assert time.monotonic() - started < 5
    err = caught.value
    assert err.code == "DEADLINE_EXCEEDED" and err.details["node"] == "here" and err.details["timeout_s"] == "0.5"
    assert "did not finish within 0.5s" in err.message
    # The shell and its child (the whole process group) are gone.
    shell = int(pid_file.read_text())
    assert await wait_gone(shell)
    assert not [p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] == ["sleep", "30"] and _group(p) == shell]


def _group(proc: psutil.Process) -> int | None:
    try:
        return os.getpgid(proc.pid)
    except ProcessLookupError:
        return None


async def test_check_raises_with_the_exit_status_and_the_output_tail(local: LocalTransport) -> None:
    with pytest.raises(RbeeError) as caught:
        await local.check("seq 1 30; exit 2", "Counting", code="INSTALL_FAILED")
    err = caught.value
    assert err.code == "INSTALL_FAILED" and "Counting failed on node here (exit status 2)" == err.message
    assert str(err.details["exit_status"]) == "2"
    assert err.details["output"].splitlines() == [str(i) for i in range(11, 31)]


async def test_write_file_is_owner_only_and_atomic(local: LocalTransport, tmp_path: Path) -> None:
    target = tmp_path / "deep" / "folder" / "hive.key"
    old_umask = os.umask(0o000)  # even with a permissive umask
    try:
        await local.write_file(str(target), "secret-1\n")
    finally:
        os.umask(old_umask)
    assert target.read_text() == "secret-1\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    first_inode = target.stat().st_ino

    # Rewritten by a rename over the old file: a reader sees the old or the new
    # content whole, never a half-written file, and no temporary is left over.
    await local.write_file(str(target), "secret-2\n")
    assert target.read_text() == "secret-2\n"
    assert target.stat().st_ino != first_inode
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert sorted(p.name for p in target.parent.iterdir()) == ["hive.key"]


async def test_start_detached_returns_the_programs_pid_and_the_program_outlives_the_call(local: LocalTransport, tmp_path: Path) -> None:
    log = tmp_path / "logs" / "program.log"
    # The program answers one line on a FIFO after the link has gone: proof it
    # still runs then (a signal sent by close() arrives before it runs again).
    fifo = tmp_path / "ask"
    os.mkfifo(fifo)
    script = (
        "import os, sys, time; print('started', os.getpid(), flush=True); "
        f"line = open({str(fifo)!r}).readline(); print('answered', line.strip(), flush=True); time.sleep(60)"
    )
    command = f"{shlex.quote(sys.executable)} -c {shlex.quote(script)}"
    pid = await local.start_detached(command, str(log), cwd=str(tmp_path))
    try:
        # The program prints its own pid: the one returned is the program's,
        # not that of a shell around it (setsid and sh exec into it).
        for _ in range(200):
            if log.exists() and "started" in log.read_text():
                break
            await asyncio.sleep(0.05)
        assert log.read_text() == f"started {pid}\n"
        proc = psutil.Process(pid)
        assert proc.cmdline()[:2] == [sys.executable, "-c"]
        assert proc.cwd() == str(tmp_path)
        assert os.getsid(pid) == pid  # its own session: no terminal, no parent's signals
        await local.close()  # the link goes; the program stays
        for _ in range(600):  # until the program has the FIFO open for reading (ENXIO before)
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
                break
            except OSError:
                await asyncio.sleep(0.05)
        os.write(fd, b"still there?\n")
        os.close(fd)
        for _ in range(600):
            if "answered" in log.read_text() or not proc.is_running():
                break
            await asyncio.sleep(0.05)
        assert log.read_text() == f"started {pid}\nanswered still there?\n"
        assert proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        await wait_gone(pid)


async def test_round_trip_measures_echo_test(local: LocalTransport) -> None:
    seconds = await local.round_trip()
    assert 0 < seconds < 5
    assert local.kind == "local" and local.target == "this machine"
