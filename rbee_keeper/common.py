"""What keeper commands share: the --hive and --api-key options of the
commands that reach a hive, API-key lookup, and running a coroutine with the
project's exit codes."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Coroutine
from typing import Any

import typer

from rbee.cli_common import EXIT_ERROR, EXIT_INTERRUPTED, print_error
from rbee.config import load_config
from rbee.errors import RbeeError

from rbee_keeper.validation import LOCAL_HIVE

ACTOR = "rbee-keeper"

# The options of every command that reaches a hive (workers, models, logs).
# A hive on this machine is the common case, so --hive defaults to it. The
# bracket is escaped: typer renders help as rich markup.
HIVE_HELP = "The hive as HOST:PORT; leave it out for the hive on this machine."
HIVE_KEY_HELP = "API key of the hive (or RBEE_API_KEY, or \\[keeper] api_key in the config file)."
HIVE_OPTION = typer.Option(LOCAL_HIVE, "--hive", metavar="HOST:PORT", help=HIVE_HELP)
HIVE_KEY_OPTION = typer.Option(None, "--api-key", metavar="KEY", help=HIVE_KEY_HELP)


def resolve_api_key(cli_value: str | None, address: str) -> tuple[str, str]:
    """The API key for a daemon and where it came from (for error messages).

    Order: --api-key, RBEE_API_KEY, config file ``[keeper] api_key``.
    """
    if cli_value:
        return cli_value, "--api-key"
    if os.environ.get("RBEE_API_KEY"):
        return os.environ["RBEE_API_KEY"], "RBEE_API_KEY"
    config, path = load_config()
    key = (config.get("keeper") or {}).get("api_key")
    if key:
        return str(key), f"{path} [keeper] api_key"
    raise RbeeError(
        "MISSING_API_KEY",
        f"No API key for {address}",
        {"address": address},
        ["Pass --api-key KEY, set RBEE_API_KEY, or set api_key in the [keeper] section of the config file"],
    )


def explain_auth(err: RbeeError, address: str, key_source: str) -> RbeeError:
    """Add the host and where the key was configured to an auth failure."""
    if err.code in ("MISSING_API_KEY", "INVALID_API_KEY"):
        err.details.setdefault("host", address)
        err.details.setdefault("key_from", key_source)
        err.suggestions.append(f"Check the key given by {key_source} against the one {address} was started with")
    return err


def run(coro: Coroutine[Any, Any, int | None]) -> None:
    """Run a command's coroutine; RbeeError → message + exit 1, Ctrl+C → 130."""
    try:
        code = asyncio.run(coro)
    except RbeeError as err:
        print_error(err, ACTOR)
        sys.exit(EXIT_ERROR)
    except KeyboardInterrupt:
        print(f"[{ACTOR}] 🛑 interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    sys.exit(code or 0)
