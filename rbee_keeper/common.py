"""What keeper commands share: the --hive and --api-key options of the
commands that reach a hive, the hive a command means, and running a coroutine
with the project's exit codes. (API-key lookup: rbee_keeper/credentials.py.)"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Coroutine
from typing import Any

import typer

from rbee.cli_common import EXIT_ERROR, EXIT_INTERRUPTED, print_error
from rbee.config import keeper_settings
from rbee.errors import RbeeError

from rbee_keeper.validation import LOCAL_HIVE, LOCAL_QUEEN

ACTOR = "rbee-keeper"

# The options of every command that reaches a hive (workers, models, logs):
# --node NAME (resolved through the queen) where a user means a machine,
# --hive HOST:PORT for direct use without a queen. Without either, the
# default node of the config file ([keeper] node, RBEE_NODE), else the hive on
# this machine. The bracket is escaped: typer renders help as rich markup.
HIVE_HELP = "The hive as HOST:PORT, for direct use without a queen (default: RBEE_HIVE, \\[keeper] hive, else 127.0.0.1:7900)."
HIVE_KEY_HELP = (
    "With --hive: the hive's key (or RBEE_API_KEY, or \\[keeper] api_key in the config file). "
    "With --node: the queen's key (or RBEE_QUEEN_API_KEY, \\[keeper] queen_api_key, $RBEE_HOME/queen.key)."
)
NODE_HELP = "The node, by its name at the queen (default: RBEE_NODE, \\[keeper] node; see `rbee-keeper setup list-nodes`)."
QUEEN_HELP = "The queen as HOST:PORT (default: RBEE_QUEEN, \\[keeper] queen, else 127.0.0.1:7800)."
HIVE_OPTION = typer.Option(None, "--hive", metavar="HOST:PORT", help=HIVE_HELP)
HIVE_KEY_OPTION = typer.Option(None, "--api-key", metavar="KEY", help=HIVE_KEY_HELP)
NODE_OPTION = typer.Option(None, "--node", metavar="NAME", help=NODE_HELP)
QUEEN_OPTION = typer.Option(None, "--queen", metavar="HOST:PORT", help=QUEEN_HELP)


def resolve_queen(cli_value: str | None) -> str:
    """--queen, then RBEE_QUEEN, then ``[keeper] queen``, then the queen on this machine."""
    return cli_value or keeper_settings().queen or LOCAL_QUEEN


def resolve_node(cli_value: str | None) -> str | None:
    """--node, then RBEE_NODE, then ``[keeper] node``; None when none is set."""
    return cli_value or keeper_settings().node or None


async def hive_for(hive: str | None, node: str | None, api_key: str | None, queen: str | None = None):
    """A HiveClient (not connected yet) for what the user named: --hive directly;
    --node (or the default node) through the queen, which hands out the node's
    hive address and key; else RBEE_HIVE / ``[keeper] hive`` / the local hive."""
    from rbee_keeper.hive_client import HiveClient

    if hive and node:
        raise RbeeError(
            "USAGE_ERROR",
            "--hive and --node both name a machine: pass one of them",
            {"hive": hive, "node": node},
            ["Use --node NAME through the queen, or --hive HOST:PORT to talk to a hive directly"],
        )
    if hive:
        return HiveClient.connect(hive, api_key)
    settings = keeper_settings()
    name = node or settings.node
    if not name:
        return HiveClient.connect(settings.hive or LOCAL_HIVE, api_key)
    from rbee_keeper.output import debug
    from rbee_keeper.queen_client import QueenClient

    async with QueenClient.connect(resolve_queen(queen), api_key) as client:
        access = await client.node_access(name)
    debug(f"node {name} ({'--node' if node else settings.source('node')}): hive at {access.hive_address}")
    return HiveClient(access.hive_address, access.hive_api_key, f"the queen's record of node {name}", tls=access.node.tls,
                      tls_name=access.node.tls_name)


def run(coro: Coroutine[Any, Any, int | None]) -> None:
    """Run a command's coroutine; RbeeError → message + exit 1, Ctrl+C → 130."""
    try:
        # A bad config file stops every command, naming the file and the key,
        # even one whose options happen to need nothing from it.
        settings = keeper_settings()
        from rbee_keeper.output import debug

        debug(f"config file: {settings.path or 'none found'}")
        code = asyncio.run(coro)
    except RbeeError as err:
        coro.close()
        print_error(err, ACTOR)
        sys.exit(EXIT_ERROR)
    except KeyboardInterrupt:
        coro.close()
        print(f"[{ACTOR}] 🛑 interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    sys.exit(code or 0)
