"""rbee/paths.py: the one place that confines paths to their roots and makes
rbee's files owner-only; and the places that use it for files (catalogs,
logs, partial results), checked by stat under the usual umask."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from rbee.errors import RbeeError
from rbee.paths import confined, open_private, private_dir, private_file, relative_name_problem, within, write_private


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


@pytest.fixture(autouse=True)
def usual_umask():
    """The modes below must not depend on the umask: run under a permissive one."""
    previous = os.umask(0o022)
    yield
    os.umask(previous)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("", "empty name"),
        ("/etc/passwd", "absolute path"),
        ("../x", "'..' path component"),
        ("a/../../x", "'..' path component"),
        ("a/./b", "'.' path component"),
        ("a//b", "empty path component"),
        ("a/", "empty path component"),
        ("a\\..\\b", "backslash in the name"),
        ("a\x00b", "control character (NUL, newline, ...) in the name"),
        ("line\nbreak", "control character (NUL, newline, ...) in the name"),
    ],
)
def test_names_that_could_leave_a_folder_are_named_with_the_reason(name, reason):
    assert relative_name_problem(name) == reason


@pytest.mark.parametrize("name", ["config.json", "sub/dir/model-00001-of-00002.safetensors", "..hidden", "a..b", "ünï.txt"])
def test_plain_relative_names_pass(name):
    assert relative_name_problem(name) is None


def test_confined_joins_under_the_root_and_follows_links(tmp_path):
    root = tmp_path / "root"
    (root / "in").mkdir(parents=True)
    assert confined(root, "in", "file.txt") == root / "in" / "file.txt"
    (tmp_path / "out").mkdir()
    (root / "link").symlink_to(tmp_path / "out")
    with pytest.raises(RbeeError) as exc:
        confined(root, "link/file.txt", code="INVALID_HUB_FILE", what="Hub file")
    assert exc.value.code == "INVALID_HUB_FILE"
    assert exc.value.details["reason"].startswith(f"resolves to {tmp_path / 'out' / 'file.txt'}")
    with pytest.raises(RbeeError) as exc:
        confined(root, "../escape")
    assert exc.value.code == "PATH_NOT_ALLOWED" and exc.value.details["root"] == str(root)


def test_within_accepts_only_paths_below_a_root_resolved(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    (a / "m").mkdir(parents=True)
    b.mkdir()
    (b / "link").symlink_to(tmp_path)
    assert within([a, b], a / "m") == (a / "m").resolve()
    # b/link/a/m is fine: it resolves into a. b/link itself resolves to their parent.
    assert within([a, b], b / "link" / "a" / "m") == (a / "m").resolve()
    for path in ("/", str(a), f"{a}/../b", str(b / "link"), "relative/path", "", "a\x00b"):
        with pytest.raises(RbeeError) as exc:
            within([a, b], path, details={"field": "model_path"})
        err = exc.value
        assert err.code == "PATH_NOT_ALLOWED" and err.details["field"] == "model_path", path
        assert err.details["allowed"] == f"{a}, {b}"


def test_private_folders_and_files_are_owner_only_whatever_the_umask(tmp_path):
    deep = private_dir(tmp_path / "home" / "logs" / "deeper")
    for folder in (tmp_path / "home", tmp_path / "home" / "logs", deep):
        assert mode(folder) == 0o700, folder
    wide = tmp_path / "wide"
    wide.mkdir(mode=0o755)
    private_dir(wide)
    assert mode(wide) == 0o700, "an existing folder of ours is narrowed"
    kept = tmp_path / "kept"
    kept.mkdir(mode=0o755)
    private_dir(kept, tighten=False)
    assert mode(kept) == 0o755
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    private_dir(shared)
    assert mode(shared) == 0o1777, "a shared (sticky) folder like /tmp is never changed"
    existing = tmp_path / "existing.txt"
    existing.write_text("x")
    assert mode(existing) == 0o644
    private_file(existing)
    assert mode(existing) == 0o600 and existing.read_text() == "x"
    with open_private(tmp_path / "log.txt") as fh:
        fh.write("line\n")
    assert mode(tmp_path / "log.txt") == 0o600
    assert mode(write_private(tmp_path / "out.txt", "text")) == 0o600


def test_catalogs_and_their_wal_files_are_0600(tmp_path):
    from rbee_hive.catalog.models import ModelCatalog, ModelRecord
    from rbee_hive.catalog.workers import WorkerCatalog

    models = ModelCatalog(tmp_path / "home" / "models.db")
    models.add(ModelRecord(provider="hf", reference="a/b", local_path="/x", size_bytes=1, format="unknown"))
    workers = WorkerCatalog(tmp_path / "home" / "workers.db")
    workers.list()
    try:
        assert mode(tmp_path / "home") == 0o700
        names = sorted(p.name for p in (tmp_path / "home").iterdir())
        assert {"models.db", "models.db-wal", "models.db-shm", "workers.db"} <= set(names), names
        for name in names:
            assert mode(tmp_path / "home" / name) == 0o600, name
    finally:
        models.close()
        workers.close()
    # A catalog left world-readable by an older version is narrowed on open.
    (tmp_path / "home" / "models.db").chmod(0o644)
    ModelCatalog(tmp_path / "home" / "models.db").close()
    assert mode(tmp_path / "home" / "models.db") == 0o600


def test_hive_logs_are_0600_in_a_0700_folder(tmp_path):
    from rbee_hive.logbook import LogBook

    book = LogBook(tmp_path / "logs")
    book.write("rbee-hive", "started")
    book.write("worker-1a2b3c4d", "loading")
    book.close_all()
    assert mode(tmp_path / "logs") == 0o700
    assert {p.name: mode(p) for p in (tmp_path / "logs").iterdir()} == {"rbee-hive.log": 0o600, "worker-1a2b3c4d.log": 0o600}


def test_partial_results_are_0600_in_a_0700_folder(tmp_path):
    from rbee_keeper.partial import save_partial

    path = save_partial("the text so far", "../../etc/req", tmp_path / "rbee-home" / "partial")
    assert path is not None and path.parent == (tmp_path / "rbee-home" / "partial").resolve()
    assert path.read_text() == "the text so far"
    assert mode(path) == 0o600 and mode(path.parent) == 0o700 and mode(tmp_path / "rbee-home") == 0o700
