"""The node registry, $RBEE_HOME/beehives.db (S3): rows, names, errors, schema
version, and a file only its owner can read (it holds the nodes' hive keys)."""

from __future__ import annotations

import sqlite3
import stat
from pathlib import Path

import pytest

from rbee.errors import RbeeError
from rbee_queen.nodes.store import MIGRATIONS, NodeRecord, NodeStore


@pytest.fixture
def store(tmp_path: Path):
    s = NodeStore(tmp_path / "home" / "beehives.db")
    yield s
    s.close()


def record(name: str = "box", **fields) -> NodeRecord:
    values = dict(name=name, transport="ssh", install_path=f"/opt/rbee-{name}", hive_key=f"key-of-{name}",
                  ssh_host="192.0.2.10", ssh_port=2222, ssh_user="me", ssh_key_path="/keys/id_ed25519",
                  git_repo_url="https://example.org/rbee.git")  # fmt: skip
    values.update(fields)
    return NodeRecord(**values)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_add_get_list_update_remove(store: NodeStore) -> None:
    added = store.add(record("box", backends={"cpu": 1, "cuda": 2}))
    assert added.created_at_unix > 0
    store.add(record("alpha"))

    got = store.get("box")
    assert got == added
    assert got.hive_key == "key-of-box" and got.backends == {"cpu": 1, "cuda": 2}
    assert got.git_branch == "main" and got.status == "unknown" and got.hive_port == 7900
    assert [r.name for r in store.list()] == ["alpha", "box"]
    assert store.exists("box") and not store.exists("ghost")

    updated = store.update("box", ssh_port=22, backends={"cpu": 1}, hive_version="0.1.0")
    assert (updated.ssh_port, updated.backends, updated.hive_version) == (22, {"cpu": 1}, "0.1.0")
    assert store.get("box") == updated

    removed = store.remove("box")
    assert removed == updated
    assert [r.name for r in store.list()] == ["alpha"]


def test_reachable_and_unreachable_are_recorded(store: NodeStore) -> None:
    store.add(record())
    down = store.mark_unreachable("box", "SSH_CONNECTION_FAILED: " + "x" * 5000)
    assert down.status == "unreachable" and len(down.last_error) == 2000
    up = store.mark_reachable("box")
    assert up.status == "reachable" and up.last_error == "" and up.last_connected_unix > 0


def test_a_taken_name_is_node_exists_with_both_ways_out(store: NodeStore) -> None:
    store.add(record("box", install_path="/opt/first"))
    with pytest.raises(RbeeError) as caught:
        store.add(record("box", install_path="/opt/second"))
    err = caught.value
    assert err.code == "NODE_EXISTS" and "'box'" in err.message and err.details["node"] == "box"
    assert any("rbee-keeper setup update-node --name box" in s for s in err.suggestions)
    assert any("rbee-keeper setup remove-node --name box" in s for s in err.suggestions)
    assert store.get("box").install_path == "/opt/first"


@pytest.mark.parametrize("operation", ["get", "update", "remove"])
def test_an_unknown_name_is_node_not_found_with_the_command_that_adds_it(store: NodeStore, operation: str) -> None:
    call = {"get": lambda: store.get("ghost"), "update": lambda: store.update("ghost", hive_port=1),
            "remove": lambda: store.remove("ghost")}[operation]  # fmt: skip
    with pytest.raises(RbeeError) as caught:
        call()
    err = caught.value
    assert err.code == "NODE_NOT_FOUND" and "'ghost'" in err.message and err.details["node"] == "ghost"
    assert any("rbee-keeper setup add-node --name ghost" in s for s in err.suggestions)
    assert any("rbee-keeper setup list-nodes" in s for s in err.suggestions)


def test_an_unknown_field_is_refused(store: NodeStore) -> None:
    store.add(record())
    with pytest.raises(ValueError, match="no_such_field"):
        store.update("box", no_such_field=1)


def test_schema_version_wal_and_owner_only_files(tmp_path: Path) -> None:
    path = tmp_path / "home" / "beehives.db"
    store = NodeStore(path)
    try:
        store.add(record())
        assert mode(path) == 0o600
        # The pool keeps a connection open, so the WAL files are there now.
        for companion in (Path(f"{path}-wal"), Path(f"{path}-shm")):
            assert companion.exists() and mode(companion) == 0o600, companion
        with sqlite3.connect(path) as db:
            assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
            assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        store.close()


def test_rows_survive_a_reopen_and_the_schema_is_not_applied_twice(tmp_path: Path) -> None:
    path = tmp_path / "beehives.db"
    first = NodeStore(path)
    first.add(record(backends={"cpu": 1}))
    first.close()
    second = NodeStore(path)
    try:
        assert second.get("box").backends == {"cpu": 1}
        with sqlite3.connect(path) as db:
            assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    finally:
        second.close()


def test_hive_address_and_program_follow_the_row() -> None:
    r = record(ssh_host="192.0.2.10", hive_port=7901, install_path="/opt/rbee/")
    assert r.hive_address == "192.0.2.10:7901"
    assert r.hive_program == "/opt/rbee/.venv/bin/rbee-hive"
    assert record(transport="local").hive_address == "127.0.0.1:7900"
    assert record(ssh_host="::1").hive_address == "127.0.0.1:7900"
    assert "key-of" not in repr(record())


def test_a_registry_of_the_first_schema_gains_the_tls_column(tmp_path: Path) -> None:
    # A beehives.db written before TLS existed: its nodes read as plain, and keep their rows.
    path = tmp_path / "beehives.db"
    with sqlite3.connect(path) as db:
        for statement in MIGRATIONS[0]:
            db.execute(statement)
        db.execute(
            "INSERT INTO nodes (name, transport, install_path, hive_key, created_at_unix) VALUES ('old', 'ssh', '/opt/rbee', 'k', 1)"
        )
        db.execute("PRAGMA user_version=1")
    store = NodeStore(path)
    try:
        assert store.get("old").tls is False
        store.update("old", tls=True)
        assert store.get("old").tls is True
    finally:
        store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
