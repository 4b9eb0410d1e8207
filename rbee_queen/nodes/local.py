"""A node that is the queen's own machine (`setup add-node --local`): the
same commands as over SSH, run as local processes with ``sh -c``."""

from __future__ import annotations

import asyncio
import os
import signal

from rbee.errors import RbeeError

from rbee_queen.nodes.transport import DEFAULT_COMMAND_TIMEOUT_S, CommandResult, Narrate, NodeTransport


class LocalTransport(NodeTransport):
    kind = "local"

    def __init__(self, node_name: str, narrate: Narrate | None = None) -> None:
        super().__init__(node_name, narrate)

    @property
    def target(self) -> str:
        return "this machine"

    async def connect(self) -> None:
        self.narrate("🏠", f"Node {self.node_name} is this machine: commands run locally")

    async def run(self, command: str, *, input: str | None = None, timeout: float = DEFAULT_COMMAND_TIMEOUT_S) -> CommandResult:
        proc = await asyncio.create_subprocess_exec(
            "/bin/sh", "-c", command,
            stdin=asyncio.subprocess.PIPE if input is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )  # fmt: skip
        try:
            out, err = await asyncio.wait_for(proc.communicate(input.encode() if input is not None else None), timeout)
        except asyncio.TimeoutError:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            await proc.wait()
            raise RbeeError(
                "DEADLINE_EXCEEDED",
                f"Command on node {self.node_name} did not finish within {timeout:g}s: {command[:80]}",
                {"node": self.node_name, "timeout_s": f"{timeout:g}"},
            ) from None
        return CommandResult(proc.returncode if proc.returncode is not None else 255, out.decode(errors="replace"), err.decode(errors="replace"))

    async def close(self) -> None:
        return None
