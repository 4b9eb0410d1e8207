"""Which hives this queen works with (S4.2): the same API version and a program
version meeting HIVE_VERSION_REQUIREMENT; otherwise the reason, naming both sides."""

from __future__ import annotations

import pytest
from packaging.specifiers import SpecifierSet

from rbee.config import API_VERSION, HIVE_VERSION_REQUIREMENT, VERSION
from rbee_queen.hives import compatible

REQUIREMENT = SpecifierSet(HIVE_VERSION_REQUIREMENT)


def test_a_hive_of_this_release_is_compatible() -> None:
    assert compatible(VERSION, API_VERSION) is None


@pytest.mark.parametrize("version", ["0.1.0", "0.1.1", "0.1.99"])
def test_versions_inside_the_requirement_are_compatible(version: str) -> None:
    assert version in REQUIREMENT  # the figures below assume ">=0.1.0,<0.2"
    assert compatible(version, API_VERSION) is None


@pytest.mark.parametrize("version", ["0.0.9", "0.2.0", "1.0.0"])
def test_versions_outside_the_requirement_name_the_version_and_the_requirement(version: str) -> None:
    assert version not in REQUIREMENT
    assert compatible(version, API_VERSION) == f"version {version} (this queen needs {HIVE_VERSION_REQUIREMENT})"


@pytest.mark.parametrize("api", ["v0", "v2", ""])
def test_another_api_version_is_refused_whatever_the_program_version(api: str) -> None:
    reason = compatible(VERSION, api)
    assert reason == f"API version {api or '(none)'} (this queen speaks {API_VERSION})"


def test_the_api_version_is_checked_before_the_program_version() -> None:
    assert compatible("9.9.9", "v0").startswith("API version v0")


@pytest.mark.parametrize("version", ["", "not-a-version", "0.1.x"])
def test_a_version_that_does_not_parse_is_refused_not_raised(version: str) -> None:
    assert compatible(version, API_VERSION) == f"version {version!r} (not a version this queen understands)"


@pytest.mark.parametrize("version, api", [("0.2.0", API_VERSION), ("1.0.0", API_VERSION), (VERSION, "v2")])
def test_a_newer_hive_asks_to_update_this_machine(version: str, api: str) -> None:
    from rbee_queen.hives import hive_is_newer, mismatch_advice

    assert compatible(version, api) is not None and hive_is_newer(version, api)
    advice = mismatch_advice("box", version, api)
    assert "newer than this queen" in advice[0] and "make setup" in advice[0]
    assert "rbee-keeper setup install --node box" in advice[1]


@pytest.mark.parametrize("version, api", [("0.0.9", API_VERSION), (VERSION, "v0"), ("not-a-version", API_VERSION)])
def test_an_older_or_unreadable_hive_asks_to_reinstall_the_node(version: str, api: str) -> None:
    from rbee_queen.hives import hive_is_newer, mismatch_advice

    assert not hive_is_newer(version, api)
    assert mismatch_advice("box", version, api) == [
        "The hive on box is older than this queen: update it with `rbee-keeper setup install --node box`"
    ]


def test_the_hive_status_and_a_first_release_hive_s_ok_both_mean_healthy() -> None:
    from rbee.enum_words import HIVE_STATUSES
    from rbee.v1 import preflight_pb2
    from rbee_queen.hives import hive_is_healthy

    reply = preflight_pb2.GetHiveHealthResponse
    assert hive_is_healthy(HIVE_STATUSES.word(reply.HIVE_STATUS_HEALTHY))
    assert not hive_is_healthy(HIVE_STATUSES.word(reply.HIVE_STATUS_SHUTTING_DOWN))
    # A first-release hive sent the string "ok" in field 1; a newer one may send a number this build lacks.
    first_release = reply.FromString(b"\x0a\x02ok" + b"\x12\x050.1.0")
    assert (first_release.hive_status, first_release.version) == (0, "0.1.0")
    newer = reply.FromString(b"\x08\x63")
    assert hive_is_healthy(HIVE_STATUSES.word(first_release.hive_status)) and hive_is_healthy(HIVE_STATUSES.word(newer.hive_status))
