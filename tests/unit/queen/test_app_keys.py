"""Keys for applications (rbee_queen/appkeys.py) on a real beehives.db: only
digests stored, constant-time checks over every key, revocation seen at once
(also when another connection revokes), last use, names, scopes, limits, the
schema step that adds the table to a registry with nodes in it, and a file
only its owner can read."""

from __future__ import annotations

import hashlib
import hmac
import sqlite3
import stat
from pathlib import Path

import pytest

import rbee_queen.appkeys as appkeys
from rbee.errors import CODES, RbeeError
from rbee.scopes import Scope
from rbee_queen.appkeys import AppKeyStore
from rbee_queen.nodes.store import MIGRATIONS, NodeRecord, NodeStore


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "home" / "beehives.db"


@pytest.fixture
def store(db: Path):
    s = AppKeyStore(db)
    yield s
    s.close()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_create_verify_list_revoke(store: AppKeyStore) -> None:
    record, key = store.create("webui")
    assert record.name == "webui" and record.scope == Scope.INFERENCE and record.created_at_unix > 0
    assert key.startswith("rbee_") and len(key) >= 40
    admin, admin_key = store.create("ops", "admin")
    assert admin.scope == Scope.ADMIN
    assert store.verify(key) == Scope.INFERENCE
    assert store.verify(admin_key) == Scope.ADMIN
    for wrong in ("", "rbee_", key[:-1], key + "x", key.upper(), "x" * 10_000):
        assert store.verify(wrong) is None, wrong
    listed = store.list()
    assert [(k.name, k.scope) for k in listed] == [("ops", Scope.ADMIN), ("webui", Scope.INFERENCE)]
    assert key not in repr(listed)
    gone = store.revoke("webui")
    assert gone.name == "webui"
    assert store.verify(key) is None
    assert store.verify(admin_key) == Scope.ADMIN
    assert [k.name for k in store.list()] == ["ops"]


def test_only_the_digest_is_stored_and_the_file_is_the_owners(store: AppKeyStore, db: Path) -> None:
    _, key = store.create("webui")
    with sqlite3.connect(db) as conn:
        (stored,) = conn.execute("SELECT key_hash FROM app_keys WHERE name = 'webui'").fetchone()
    assert bytes(stored) == hashlib.sha256(key.encode()).digest()
    for path in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
        if path.exists():
            assert key.encode() not in path.read_bytes(), path
            assert mode(path) == 0o600, path
    assert mode(db) == 0o600


def test_every_key_is_compared_in_constant_time_without_stopping_at_a_match(
    store: AppKeyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = [store.create(f"app{i}")[1] for i in range(3)]
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(appkeys.hmac, "compare_digest", spy)
    assert store.verify(keys[0]) == Scope.INFERENCE
    assert len(calls) == 3, "each stored digest is compared, also after the match"
    assert all(len(a) == len(b) == 32 for a, b in calls), "digests, never the key itself"
    calls.clear()
    assert store.verify("not-a-key") is None
    assert len(calls) == 3


def test_a_revoke_through_another_connection_is_refused_at_once(store: AppKeyStore, db: Path) -> None:
    # The HTTP side's store has seen the key; another store on the same file
    # (another connection, as another process would be) revokes it.
    _, key = store.create("webui")
    assert store.verify(key) == Scope.INFERENCE
    other = AppKeyStore(db)
    try:
        other.revoke("webui")
    finally:
        other.close()
    assert store.verify(key) is None
    # And a key created elsewhere opens at once too.
    other = AppKeyStore(db)
    try:
        _, fresh = other.create("cli")
    finally:
        other.close()
    assert store.verify(fresh) == Scope.INFERENCE


def test_last_use_shows_at_once_and_is_saved_by_the_flush(store: AppKeyStore, db: Path) -> None:
    _, key = store.create("webui")
    assert store.list()[0].last_used_unix == 0
    assert store.verify(key) == Scope.INFERENCE
    used = store.list()[0].last_used_unix
    assert used > 0
    assert store.flush_last_used() == 1
    assert store.flush_last_used() == 0, "nothing new to write"
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT last_used_unix FROM app_keys").fetchone()[0] == used
    # The flush changed the table: the next check still opens.
    assert store.verify(key) == Scope.INFERENCE


@pytest.mark.parametrize("name", ["", "-lead", ".x", "a b", "é", "a/b", "x" * 65, "a;drop", "webui\n"])
def test_bad_names_are_refused_naming_the_field(store: AppKeyStore, name: str) -> None:
    with pytest.raises(RbeeError) as info:
        store.create(name)
    assert info.value.code == "INVALID_ARGUMENT" and info.value.details["field"] == "name"
    assert "keys create --name" in " ".join(info.value.suggestions)
    assert store.list() == []


def test_good_names_and_a_bad_scope(store: AppKeyStore) -> None:
    for name in ("a", "Open-WebUI_2.0", "x" * 64):
        store.create(name)
    with pytest.raises(RbeeError) as info:
        store.create("other", "callback")
    assert info.value.code == "INVALID_ARGUMENT" and info.value.details["field"] == "scope"


def test_a_taken_name_is_app_key_exists_and_the_first_key_keeps_working(store: AppKeyStore) -> None:
    _, key = store.create("webui")
    with pytest.raises(RbeeError) as info:
        store.create("webui", "admin")
    assert info.value.code == "APP_KEY_EXISTS" and CODES["APP_KEY_EXISTS"].name == "ALREADY_EXISTS"
    assert "rbee-keeper keys revoke webui" in " ".join(info.value.suggestions)
    assert store.verify(key) == Scope.INFERENCE
    assert len(store.list()) == 1


@pytest.mark.parametrize("name", ["nobody", "bad name", "x" * 500])
def test_revoking_an_unknown_name_says_how_to_see_the_keys(store: AppKeyStore, name: str) -> None:
    with pytest.raises(RbeeError) as info:
        store.revoke(name)
    assert info.value.code == "APP_KEY_NOT_FOUND" and CODES["APP_KEY_NOT_FOUND"].name == "NOT_FOUND"
    assert "`rbee-keeper keys list`" in " ".join(info.value.suggestions)
    assert len(info.value.message) < 200


def test_the_number_of_keys_is_bounded(store: AppKeyStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(appkeys, "MAX_KEYS", 2)
    store.create("a")
    store.create("b")
    with pytest.raises(RbeeError) as info:
        store.create("c")
    assert info.value.code == "APP_KEY_LIMIT"
    store.revoke("a")
    store.create("c")


def test_a_registry_of_the_previous_schema_gains_the_table_and_keeps_its_nodes(db: Path) -> None:
    db.parent.mkdir(parents=True)
    with sqlite3.connect(db) as conn:
        for step in MIGRATIONS[:2]:
            for statement in step:
                conn.execute(statement)
        conn.execute(
            "INSERT INTO nodes (name, transport, install_path, hive_key, created_at_unix) VALUES ('old', 'ssh', '/opt/rbee', 'k', 1)"
        )
        conn.execute("PRAGMA user_version=2")
    keys = AppKeyStore(db)
    nodes = NodeStore(db)
    try:
        _, key = keys.create("webui")
        assert nodes.get("old").install_path == "/opt/rbee"
        nodes.add(NodeRecord(name="new", transport="local", install_path="/opt/rbee", hive_key="k2"))
        assert keys.verify(key) == Scope.INFERENCE
    finally:
        keys.close()
        nodes.close()
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS) == 4
