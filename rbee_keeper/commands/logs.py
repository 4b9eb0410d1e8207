"""`rbee-keeper logs`: a node's daemon and worker logs, streamed until Ctrl+C."""

from __future__ import annotations

import sys

import typer

from rbee_keeper.common import HIVE_KEY_OPTION, HIVE_OPTION, NODE_OPTION, QUEEN_OPTION, hive_for, run


async def _logs(node: str | None, hive: str | None, queen: str | None, api_key: str | None, worker: str, tail: int, follow: bool) -> int:
    async with await hive_for(hive, node, api_key, queen) as client:
        async for item in client.logs(worker_id=worker, tail_lines=tail, follow=follow):
            # Log lines are the command's output: stdout, one per line, source first.
            sys.stdout.write(f"{item.source} | {item.line.rstrip()}\n")
            sys.stdout.flush()
    return 0


def logs(
    node: str = NODE_OPTION,
    hive: str = HIVE_OPTION,
    queen: str = QUEEN_OPTION,
    api_key: str = HIVE_KEY_OPTION,
    worker: str = typer.Option("", "--worker", help="Only this worker's log (default: the hive's log and every worker's)."),
    tail: int = typer.Option(50, "--tail", min=1, help="Lines of history per log."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep streaming new lines until Ctrl+C."),
) -> None:
    """Print a node's logs (the hive and its workers) on stdout; --follow streams new lines until Ctrl+C (exit 130).

    Example: rbee-keeper logs --node workstation --follow
    """
    run(_logs(node, hive, queen, api_key, worker, tail, follow))


def register(app: typer.Typer) -> None:
    app.command("logs")(logs)
