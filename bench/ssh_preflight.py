"""SSH preflight as a user waits for it: the wall time of `rbee-keeper setup
add-node` and of `rbee-keeper setup check-node --ssh-only` against OpenSSH's
sshd on 127.0.0.1, through a real queen-rbee, and where that time goes.

Measured side by side in one run, interleaved run by run so that machine
noise hits every figure alike (median of --runs):

  keeper start-up        `rbee-keeper --version`: the keeper process alone
  SSH connect + auth     an asyncssh connection opened and authenticated
                         (host key verified), in this process, nothing run
  connect + `echo test`  the same plus one command, the bare minimum of a preflight
  one command            `echo test` on an already open connection: what each
                         remote command of a preflight costs (sshd starts the
                         user's login shell for it)
  keeper → queen RPC     `rbee-keeper setup list-nodes --json` less the keeper's
                         start-up: the keeper's channel, one call, the reply
  rbee-hive --version,   the hive program's start-up, run locally: the preflight
  rbee-hive detect       runs the first on the node to find the hive's version,
                         add-node the second to record backends

Each keeper command's time is then split into keeper start-up, the keeper →
queen RPC, SSH connect + auth, its remote commands (how many: counted in
sshd's log, not assumed; each costs one `echo test` on an open connection),
the hive program's own runs on the node, and the rest: the queen's own work.

The node is this machine through sshd: "rbee installed" is an install path
whose .venv is this checkout's (the same programs an install puts there).

Run: .venv/bin/python -m bench.ssh_preflight [--runs 7]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncssh

from tests.fixtures.common import VENV_BIN, proc_env
from tests.fixtures.ports import free_port
from tests.fixtures.queen import KEEPER_BIN, QueenProc, start_queen
from tests.fixtures.ssh import SshdNode, make_ssh_keys, running_sshd

SESSION_MARK = "Starting session: command"
BLOCKS = ("keeper", "list_nodes", "connect", "connect_echo", "exec", "hive_version", "hive_detect")
BLOCK_LABELS = {
    "keeper": "rbee-keeper --version (keeper start-up)",
    "list_nodes": "rbee-keeper setup list-nodes --json (+ one RPC)",
    "connect": "asyncssh connect + auth",
    "connect_echo": "asyncssh connect + auth + `echo test`",
    "exec": "`echo test` on an open connection (one command)",
    "hive_version": "rbee-hive --version, run locally",
    "hive_detect": "rbee-hive detect --json, run locally",
}
# The hive program runs each command makes on the node (rbee_queen/nodes/manager.py:
# add-node probes `rbee-hive --version` and, when it runs, `detect --json`;
# the SSH preflight asks `rbee-hive --version`). Its other remote commands are
# shell built-ins and coreutils, costed as one `echo test` each.
PROGRAM_RUNS = {"add_fresh": (), "add_installed": ("hive_version", "hive_detect"), "check_ssh": ("hive_version",)}
COMMANDS = ("add_fresh", "add_installed", "check_ssh")
COMMAND_LABELS = {
    "add_fresh": "setup add-node (rbee not installed yet)",
    "add_installed": "setup add-node (rbee installed: + detect)",
    "check_ssh": "setup check-node --ssh-only",
}


async def _timed(work: Callable[[], Awaitable[object]]) -> float:
    started = time.perf_counter()
    await work()
    return (time.perf_counter() - started) * 1000


async def _process(*argv: str, env: dict[str, str] | None = None) -> None:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL, env=env or proc_env()
    )
    if await proc.wait() != 0:
        raise RuntimeError(f"{argv} exited with {proc.returncode}")


class Bench:
    def __init__(self, base: Path, node: SshdNode, queen: QueenProc) -> None:
        self.base = base
        self.node = node
        self.queen = queen
        self.known_hosts = node.write_known_hosts(base / "bench_known_hosts")
        node.write_known_hosts(queen.home / "known_hosts")  # the queen knows the node's host key
        self.installed = base / "node-installed" / "rbee"
        self.installed.mkdir(parents=True)
        (self.installed / ".venv").symlink_to(VENV_BIN.parent)
        self.node_home = base / "node-home"
        # No hive is started: list-nodes' probe of this port is refused at once.
        self.hive_port = free_port()
        self.sessions: dict[str, int] = {}

    # -- building blocks ---------------------------------------------------------------------

    async def _connect(self) -> asyncssh.SSHClientConnection:
        return await asyncssh.connect(
            self.node.host, self.node.port, username=self.node.user, client_keys=[self.node.keys.client_key],
            known_hosts=str(self.known_hosts), config=[], agent_path=None, password=None,
            kbdint_auth=False, host_based_auth=False, gss_host=None,
        )  # fmt: skip

    async def connect(self) -> None:
        conn = await self._connect()
        conn.close()
        await conn.wait_closed()

    async def connect_echo(self) -> None:
        conn = await self._connect()
        result = await conn.run("echo test", check=True)
        assert result.stdout == "test\n"
        conn.close()
        await conn.wait_closed()

    async def exec_samples(self, conn: asyncssh.SSHClientConnection) -> float:
        started = time.perf_counter()
        result = await conn.run("echo test", check=True)
        assert result.stdout == "test\n"
        return (time.perf_counter() - started) * 1000

    async def keeper_version(self) -> None:
        await _process(str(KEEPER_BIN), "--version")

    async def hive_version(self) -> None:
        await _process(str(self.installed / ".venv" / "bin" / "rbee-hive"), "--version")

    async def hive_detect(self) -> None:
        await _process(str(self.installed / ".venv" / "bin" / "rbee-hive"), "detect", "--json",
                       env=proc_env(RBEE_HOME=str(self.node_home)))  # fmt: skip

    async def list_nodes(self) -> None:
        await self.keeper("setup", "list-nodes", "--json")

    # -- what the user types -----------------------------------------------------------------

    async def keeper(self, *args: str, expect: int = 0) -> None:
        code, _out, err = await self.queen.keeper(*args)
        if code != expect:
            raise RuntimeError(f"rbee-keeper {' '.join(args)} exited {code}:\n{err}")

    def add_args(self, name: str, install_path: Path) -> list[str]:
        n = self.node
        return [
            "setup", "add-node", "--name", name, "--ssh-host", n.host, "--ssh-port", str(n.port), "--ssh-user", n.user,
            "--ssh-key", str(n.key_path), "--install-path", str(install_path), "--rbee-home", str(self.node_home),
            "--hive-port", str(self.hive_port),
        ]  # fmt: skip

    async def add_fresh(self, run: int) -> None:
        await self.keeper(*self.add_args(f"fresh-{run}", self.base / "not-installed" / "rbee"))

    async def add_installed(self, run: int) -> None:
        await self.keeper(*self.add_args(f"installed-{run}", self.installed))

    async def check_ssh(self, run: int) -> None:
        await self.keeper("setup", "check-node", "--name", "checked", "--ssh-only")

    async def forget(self, run: int) -> None:
        for name in (f"fresh-{run}", f"installed-{run}"):
            await self.keeper("setup", "remove-node", "--name", name)

    def session_count(self) -> int:
        return self.node.log().count(SESSION_MARK)

    # -- the run -----------------------------------------------------------------------------

    async def run(self, runs: int) -> dict:
        await self.keeper(*self.add_args("checked", self.installed))
        samples: dict[str, list[float]] = defaultdict(list)
        conn = await self._connect()
        try:
            for run in range(runs + 1):  # run 0 warms up caches and counts the remote commands
                warm = run == 0
                for name, work in (
                    ("keeper", self.keeper_version),
                    ("list_nodes", self.list_nodes),
                    ("connect", self.connect),
                    ("connect_echo", self.connect_echo),
                    ("hive_version", self.hive_version),
                    ("hive_detect", self.hive_detect),
                ):
                    ms = await _timed(work)
                    if not warm:
                        samples[name].append(ms)
                ms = await self.exec_samples(conn)
                if not warm:
                    samples["exec"].append(ms)
                for name in COMMANDS:
                    before = self.session_count()
                    ms = await _timed(lambda name=name: getattr(self, name)(run))
                    if warm:
                        await asyncio.sleep(0.2)  # sshd's log line may trail the reply
                        self.sessions[name] = self.session_count() - before
                    else:
                        samples[name].append(ms)
                await self.forget(run)
        finally:
            conn.close()
        return {"runs": runs, "median": {k: statistics.median(v) for k, v in samples.items()},
                "sessions": self.sessions}  # fmt: skip


async def bench(runs: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="rbee-bench-ssh-") as tmp:
        base = Path(tmp)
        keys = make_ssh_keys(base / "keys")
        with running_sshd(keys, base / "sshd") as node:
            queen = await start_queen(base / "queen")
            try:
                return await Bench(base, node, queen).run(runs)
            finally:
                await queen.close()


def report(result: dict) -> None:
    m = result["median"]
    print(f"OpenSSH sshd on 127.0.0.1, a real queen-rbee; median of {result['runs']} interleaved runs")
    print(f"{'building block':<50} {'ms':>8}")
    for name in BLOCKS:
        print(f"{BLOCK_LABELS[name]:<50} {m[name]:>8.1f}")
    print()
    rpc = m["list_nodes"] - m["keeper"]
    header = (f"{'what the user waits for':<42} {'ms':>6} {'× bare':>7} {'keeper start':>13} {'keeper→queen':>13} "
              f"{'SSH conn+auth':>13} {'remote cmds':>16} {'hive program':>13} {'the rest':>13}")  # fmt: skip
    print(header)
    for name in COMMANDS:
        total = m[name]
        n = result["sessions"].get(name, 0)
        programs = sum(m[p] for p in PROGRAM_RUNS[name])
        parts = [m["keeper"], rpc, m["connect"], n * m["exec"], programs]
        rest = total - sum(parts)

        def share(ms: float) -> str:
            return f"{ms:>5.0f} ({ms / total:>4.0%})"

        cells = [share(p) for p in parts]
        cells[3] = f"{n}x " + cells[3]
        print(f"{COMMAND_LABELS[name]:<42} {total:>6.0f} {total / m['connect_echo']:>6.1f}x "
              + " ".join(f"{c:>{w}}" for c, w in zip([*cells, share(rest)], (13, 13, 13, 16, 13, 13))))  # fmt: skip
    print("× bare: the command's time over a bare asyncssh connect + auth + `echo test`.")
    print("keeper→queen: list-nodes --json less --version. remote cmds: sessions sshd started for the command (its log)")
    print("× one `echo test` on an open connection. hive program: its runs on the node, timed locally. the rest: the queen.")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="bench.ssh_preflight", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args(argv)
    result = asyncio.run(bench(args.runs))
    report(result)
    return result


if __name__ == "__main__":
    main()
