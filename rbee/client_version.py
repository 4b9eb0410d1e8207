"""The keeper's release on every call, and the daemons' check of it
(docs/behaviour.md S4.2, "Versions in both directions").

rbee-keeper sends ``x-rbee-client: rbee-keeper``, ``x-rbee-version`` and
``x-rbee-api-version`` with every call. The queen and the hive refuse a keeper
of another API version or older than their ``min_keeper_version`` with
VERSION_MISMATCH naming both releases and the side to update. A call without
the headers (a keeper of the first release, any other gRPC client) is served:
its release is unknown, and the keeper's own check (an RPC the daemon does not
know is gRPC's UNIMPLEMENTED, rbee_keeper/daemon_client.py) covers a daemon
older than the keeper.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from packaging.version import InvalidVersion, Version

from rbee.auth import CheckingInterceptor
from rbee.config import API_VERSION, VERSION
from rbee.errors import RbeeError

CLIENT_HEADER = "x-rbee-client"
VERSION_HEADER = "x-rbee-version"
API_VERSION_HEADER = "x-rbee-api-version"
# The oldest keeper this release's daemons serve (a daemon setting can raise it).
MIN_KEEPER_VERSION = "0.1.0"
# How the keeper is updated on its machine (an installation links its
# programs to the checkout, so updating the checkout updates them).
KEEPER_UPDATE = ("update rbee on the keeper's machine: in its rbee checkout `git pull && make setup` "
                 "(after a system install, `rbee-keeper install --system` again)")  # fmt: skip


def valid_version(value: str) -> str:
    """``value`` when it is a release number (a settings validator)."""
    try:
        Version(value)
    except InvalidVersion:
        raise ValueError(f"{value!r} is not a release number such as {VERSION}") from None
    return value


def client_metadata(program: str = "rbee-keeper") -> tuple[tuple[str, str], ...]:
    """What a client of this release says about itself on every call."""
    return ((CLIENT_HEADER, program), (VERSION_HEADER, VERSION), (API_VERSION_HEADER, API_VERSION))


def _api_number(api: str) -> int | None:
    try:
        return int(api.lower().lstrip("v"))
    except ValueError:
        return None


def check_client(metadata: Iterable[tuple[str, Any]] | None, daemon: str, minimum: str) -> RbeeError | None:
    """None when the caller's release is served by this daemon (or unknown), else why not."""
    md = {k: v for k, v in (metadata or ()) if k in (CLIENT_HEADER, VERSION_HEADER, API_VERSION_HEADER)}
    version, api = str(md.get(VERSION_HEADER, "")), str(md.get(API_VERSION_HEADER, ""))
    if not version and not api:
        return None
    client = str(md.get(CLIENT_HEADER) or "client")[:40]
    details = {"client": client, "client_version": version[:40], "client_api_version": api[:40],
               "daemon": daemon, "daemon_version": VERSION, "daemon_api_version": API_VERSION,
               "min_client_version": minimum}  # fmt: skip
    newer_api = api and api != API_VERSION and (_api_number(api) or 0) > (_api_number(API_VERSION) or 0)
    if newer_api:
        return RbeeError(
            "VERSION_MISMATCH",
            f"This {daemon} ({VERSION}, API {API_VERSION}) is older than the {client} calling it "
            f"({version or 'unknown'}, API {api[:40]})",
            details,
            [f"Update rbee on the {daemon}'s machine to the {client}'s release (in its checkout "
             f"`git pull && make setup`), then restart it",
             f"Or use a {client} of the {daemon}'s release ({VERSION})"],
        )  # fmt: skip
    try:
        older = (api and api != API_VERSION) or Version(version) < Version(minimum)
    except InvalidVersion:
        older = True
    if not older:
        return None
    return RbeeError(
        "VERSION_MISMATCH",
        f"This {daemon} ({VERSION}, API {API_VERSION}) serves {client} {minimum} or newer, "
        f"and this {client} is {version[:40] or 'unknown'} (API {api[:40] or 'unknown'})",
        details,
        [f"Upgrade the {client}: {KEEPER_UPDATE}", f"Then check with `{client} --version` (it should print {minimum} or newer)"],
    )


class ClientVersionInterceptor(CheckingInterceptor):
    """Refuses a keeper this daemon does not serve (check_client), health excepted."""

    def __init__(self, daemon: str, minimum: str = MIN_KEEPER_VERSION) -> None:
        self._daemon = daemon
        self._minimum = minimum

    def check(self, metadata, method: str) -> RbeeError | None:
        return check_client(metadata, self._daemon, self._minimum)
