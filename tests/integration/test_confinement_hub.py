"""Hostile hub answers (confinement, docs/security.md): file names from the hub's
file list that would leave the model's folder are refused with
INVALID_HUB_FILE before a byte is written, and nothing is registered."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from rbee_hive.provisioner.downloads import STAGING_DIR
from tests.fixtures.models import collect, make_provisioner

CONFIG = b'{"model_type": "llama"}'


def escape_name(target: Path) -> str:
    """A relative name that climbs from any folder depth up to ``target``."""
    return "../" * 12 + str(target).lstrip("/")


async def test_a_file_list_naming_a_path_outside_the_model_is_refused_and_nothing_is_written(tmp_path, hub):
    target = Path("/tmp") / f"rbee-escape-{uuid.uuid4().hex}.txt"
    payload = tmp_path / "payload.txt"
    payload.write_bytes(b"written outside the model folder\n")
    # Content given as a file: the hub-like server never writes the hostile name itself.
    hub.add_repo("acme/evil", {"config.json": CONFIG, escape_name(target): payload})
    prov = make_provisioner(tmp_path, hub)
    try:
        c = await collect(prov.download("hf:acme/evil"))
        assert c.error is not None and c.error.code == "INVALID_HUB_FILE", (c.error, c.text)
        assert escape_name(target) in c.error.message
        assert c.error.details["reason"] == "'..' path component"
        assert not target.exists(), f"{target} was written"
        assert prov.catalog.list() == []
        assert not (tmp_path / "models" / "hf").exists()
        staged = tmp_path / "models" / STAGING_DIR
        assert not staged.exists() or not any(p.is_file() for p in staged.rglob("*")), "nothing staged"
        assert not any(r.method == "GET" and "/resolve/" in r.path for r in hub.records), "no file was fetched"
    finally:
        target.unlink(missing_ok=True)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("/tmp/{unique}", "absolute path"),
        ("sub\\..\\..\\{unique}", "backslash in the name"),
        ("a//{unique}", "empty path component"),
        ("./{unique}", "'.' path component"),
        ("dir/../../{unique}", "'..' path component"),
        ("bad\x00{unique}", "control character (NUL, newline, ...) in the name"),
    ],
)
async def test_other_hostile_names_are_refused(tmp_path, hub, name, reason):
    unique = f"rbee-odd-{uuid.uuid4().hex}.txt"
    name = name.format(unique=unique)
    payload = tmp_path / "payload.txt"
    payload.write_bytes(b"x")
    hub.add_repo("acme/odd", {"config.json": CONFIG, name: payload})
    prov = make_provisioner(tmp_path, hub)
    try:
        c = await collect(prov.download("hf:acme/odd"))
        assert c.error is not None and c.error.code == "INVALID_HUB_FILE", (c.error, c.text)
        assert c.error.details["reason"] == reason
        assert prov.catalog.list() == []
        assert not (Path("/tmp") / unique).exists()
    finally:
        (Path("/tmp") / unique).unlink(missing_ok=True)


async def test_a_link_in_the_staging_folder_cannot_lead_a_file_out(tmp_path, hub):
    """A name that is fine on its own but whose folder in staging is a link
    to elsewhere (left by anything): resolved, it lies outside, so refused."""
    outside = tmp_path / "outside"
    outside.mkdir()
    hub.add_repo("acme/linked", {"config.json": CONFIG, "sub/weights.txt": b"w" * 10})
    staging = tmp_path / "models" / STAGING_DIR / "acme--linked"
    staging.mkdir(parents=True)
    (staging / "sub").symlink_to(outside)
    prov = make_provisioner(tmp_path, hub)
    c = await collect(prov.download("hf:acme/linked"))
    assert c.error is not None and c.error.code == "INVALID_HUB_FILE", (c.error, c.text)
    assert list(outside.iterdir()) == [], "nothing written through the link"
    assert prov.catalog.list() == []
