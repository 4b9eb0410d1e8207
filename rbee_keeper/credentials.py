"""Which API key the keeper presents to a daemon, and where it came from, so
that an authentication failure can name the host and the key's source. A
leaf module: the clients (daemon_client, hive_client) and the commands import
it, and it imports nothing of the keeper's."""

from __future__ import annotations

from rbee.config import keeper_settings
from rbee.errors import RbeeError


def resolve_api_key(cli_value: str | None, address: str) -> tuple[str, str]:
    """The API key for a daemon and where it came from (for error messages).

    Order: --api-key, RBEE_API_KEY, config file ``[keeper] api_key``.
    """
    if cli_value:
        return cli_value, "--api-key"
    settings = keeper_settings()
    if settings.api_key:
        return settings.api_key, settings.source("api_key")
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
