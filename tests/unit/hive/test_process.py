"""WorkerProcess with real (small) processes: output capture, exits, trees."""

import signal
import sys
import textwrap
from pathlib import Path

import psutil
import pytest

from rbee_hive.workers.process import WorkerProcess

pytestmark = pytest.mark.asyncio(loop_scope="session")

PY = Path(sys.executable)


async def start(code: str, lines: list[str]) -> WorkerProcess:
    return await WorkerProcess.start(PY, ["-u", "-c", textwrap.dedent(code)], {"PATH": "/usr/bin:/bin"}, lines.append)


async def first_line(proc: WorkerProcess, lines: list[str]) -> str:
    while not lines:
        await proc.wait_for_exit(0.05)
    return lines[0]


async def start_with_child() -> tuple[WorkerProcess, psutil.Process]:
    """A process with a sleeping child that inherits its stdout (like an
    engine subprocess does); the child's pid is the first line printed."""
    lines: list[str] = []
    proc = await start(
        """
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        print(child.pid, flush=True)
        time.sleep(600)
        """,
        lines,
    )
    return proc, psutil.Process(int(await first_line(proc, lines)))


async def test_output_is_captured_and_exit_described():
    lines: list[str] = []
    proc = await start("print('[llm-worker-rbee] 🌅 hi'); import sys; sys.exit(3)", lines)
    info = await proc.wait()
    assert info.returncode == 3 and not info.requested and not info.oom_killed
    assert lines == ["[llm-worker-rbee] 🌅 hi"]
    assert proc.tail() == lines
    assert info.describe() == "exited with code 3"


async def test_terminate_stops_the_whole_tree():
    proc, child = await start_with_child()
    info, forced = await proc.terminate(grace=10)
    assert info is not None and info.returncode == -signal.SIGTERM and info.requested and not forced
    assert child.wait(timeout=10) is not None or not child.is_running()
    assert proc.alive_tree() == []


async def test_a_process_that_ignores_sigterm_is_force_killed():
    lines: list[str] = []
    proc = await start(
        """
        import signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("ready", flush=True)
        time.sleep(600)
        """,
        lines,
    )
    await first_line(proc, lines)
    info, forced = await proc.terminate(grace=0.5)
    assert forced and info is not None and info.returncode == -signal.SIGKILL
    assert info.describe() == "killed by SIGKILL"
    assert not info.oom_killed  # the hive killed it, not the kernel


async def test_a_stopped_process_still_terminates():
    lines: list[str] = []
    proc = await start("import time; print('up', flush=True); time.sleep(600)", lines)
    await first_line(proc, lines)
    psutil.Process(proc.pid).suspend()  # SIGSTOP
    info, forced = await proc.terminate(grace=10)
    assert info is not None and info.returncode == -signal.SIGTERM and not forced


async def test_exit_is_seen_even_while_a_grandchild_holds_the_output_pipe():
    proc, child = await start_with_child()
    psutil.Process(proc.pid).kill()  # from outside, not through the hive
    info = await proc.wait_for_exit(30)
    assert info is not None and info.returncode == -signal.SIGKILL and not info.requested
    child.wait(timeout=10)  # the leftover child went with its group
