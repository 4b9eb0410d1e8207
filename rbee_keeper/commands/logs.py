"""`rbee-keeper logs`: a node's daemon and worker logs, streamed until Ctrl+C."""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import typer

from rbee.cli_common import EXIT_INTERRUPTED
from rbee_keeper.common import ACTOR, HIVE_KEY_OPTION, HIVE_OPTION, NODE_OPTION, QUEEN_OPTION, hive_for, run


# After Ctrl+C the stream is cancelled; should it not end within this long,
# the command exits anyway: Ctrl+C always ends `logs --follow`.
INTERRUPT_GRACE_S = 2.0


async def _print_logs(node: str | None, hive: str | None, queen: str | None, api_key: str | None, worker: str, tail: int,
                      follow: bool) -> int:  # fmt: skip
    async with await hive_for(hive, node, api_key, queen) as client:
        async for item in client.logs(worker_id=worker, tail_lines=tail, follow=follow):
            # Log lines are the command's output: stdout, one per line, source first.
            sys.stdout.write(f"{item.source} | {item.line.rstrip()}\n")
            sys.stdout.flush()
    return 0


async def _logs(*args) -> int:
    loop = asyncio.get_running_loop()
    reader = asyncio.ensure_future(_print_logs(*args))
    pressed: list[bool] = []

    def give_up() -> None:
        print(f"[{ACTOR}] 🛑 interrupted", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(EXIT_INTERRUPTED)

    def on_ctrl_c() -> None:
        if pressed:
            give_up()
        pressed.append(True)
        reader.cancel()
        loop.call_later(INTERRUPT_GRACE_S, give_up)

    loop.add_signal_handler(signal.SIGINT, on_ctrl_c)
    try:
        return await reader
    except asyncio.CancelledError:
        if not pressed:
            raise
        print(f"[{ACTOR}] 🛑 interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    finally:
        loop.remove_signal_handler(signal.SIGINT)


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
