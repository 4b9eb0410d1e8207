"""The daemons' check of the caller's release (rbee/client_version.py): each
direction and its advice. Through real processes: tests/integration/test_keeper_version.py."""

from __future__ import annotations

import pytest

from rbee.client_version import check_client, client_metadata, valid_version
from rbee.config import API_VERSION, VERSION


def md(version: str = "", api: str = "") -> list[tuple[str, str]]:
    return [("x-rbee-client", "rbee-keeper"), *([("x-rbee-version", version)] if version else []),
            *([("x-rbee-api-version", api)] if api else [])]  # fmt: skip


def test_this_release_and_an_unknown_one_are_served() -> None:
    assert dict(client_metadata()) == {"x-rbee-client": "rbee-keeper", "x-rbee-version": VERSION, "x-rbee-api-version": API_VERSION}
    assert check_client(client_metadata(), "queen-rbee", VERSION) is None
    assert check_client([("authorization", "Bearer k")], "queen-rbee", VERSION) is None
    # A newer keeper of the same API is served (an RPC the daemon lacks is the keeper's UNIMPLEMENTED advice).
    assert check_client(md("9.0.0", API_VERSION), "queen-rbee", VERSION) is None


@pytest.mark.parametrize("version, api", [("0.0.9", "v1"), ("0.1.0", "v0"), ("not a version", "v1"), ("0.1.9", "")])
def test_an_older_keeper_is_told_to_upgrade(version: str, api: str) -> None:
    err = check_client(md(version, api), "rbee-hive", "0.2.0" if version == "0.1.9" else "0.1.0")
    assert err is not None and err.code == "VERSION_MISMATCH"
    assert err.suggestions[0].startswith("Upgrade the rbee-keeper") and "git pull && make setup" in err.suggestions[0]


def test_a_keeper_of_a_later_api_is_told_the_daemon_is_older() -> None:
    err = check_client(md("0.3.0", "v2"), "queen-rbee", "0.1.0")
    assert err is not None and err.code == "VERSION_MISMATCH" and "is older than the rbee-keeper" in err.message
    assert err.suggestions[0].startswith("Update rbee on the queen-rbee's machine")


def test_the_minimum_must_be_a_release_number() -> None:
    assert valid_version("0.2.0") == "0.2.0"
    with pytest.raises(ValueError):
        valid_version("latest")
