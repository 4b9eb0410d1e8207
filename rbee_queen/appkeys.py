"""Keys for applications on the queen's HTTP API (rbee-keeper's ``keys`` commands):
named keys of scope ``inference`` or ``admin`` that an admin creates, lists
and revokes, kept in the queen's ``beehives.db`` (table ``app_keys``).

Only a SHA-256 digest of each key is stored. A key is 256 random bits
(``secrets``), so its digest cannot be reversed or guessed: a slow password
hash (bcrypt, scrypt, argon2) protects secrets people choose, which have few
bits, and would cost every HTTP request milliseconds for nothing here. A
stolen ``beehives.db`` therefore yields no usable application key.

``verify(token)`` is what the HTTP front door asks on every request. It
compares the presented key's digest with every stored digest with
``hmac.compare_digest`` and without stopping at a match, so its time does not
depend on which key (or how much of one) matched. The digests are held in
memory and reloaded whenever the table changed: SQLite's ``PRAGMA
data_version`` on a connection of our own moves when any other connection
(this process's writes, or another process) commits. A revoked key is
refused by the very next request, and no request pays a query of the table.

Last use is recorded in memory at once (``list`` shows it) and written to the
table by ``flush_last_used`` (the queen calls it every half minute and on
stop), so serving requests never waits on a database write.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from rbee.db import open_engine
from rbee.errors import RbeeError
from rbee.scopes import Scope

from rbee_queen.nodes.store import MIGRATIONS

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
SCOPES = (Scope.INFERENCE, Scope.ADMIN)
KEY_PREFIX = "rbee_"
# Longer presented tokens are not hashed: no key of ours is that long.
MAX_TOKEN_CHARS = 256
# Every request compares against every key: a bound keeps that cheap.
MAX_KEYS = 1000
FLUSH_INTERVAL_S = 30.0

log = logging.getLogger(__name__)

LIST_HINT = "See the keys with `rbee-keeper keys list`"


@dataclass(frozen=True)
class AppKey:
    name: str
    scope: Scope
    created_at_unix: int
    last_used_unix: int = 0


@dataclass(frozen=True)
class _Entry:
    name: str
    digest: bytes
    scope: Scope


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "replace")).digest()


def new_app_key() -> str:
    """256 random bits, URL-safe, with a prefix that names what it is (secret scanners, people)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def validate_name(name: str) -> str:
    if not NAME.fullmatch(name or ""):
        shown = name if len(name or "") <= 80 else f"{name[:80]}…"
        raise RbeeError(
            "INVALID_ARGUMENT",
            f"Invalid key name {shown!r}: 1 to 64 characters of letters, digits, '.', '_' and '-', starting with a letter or digit",
            {"field": "name"},
            ["Name the application the key is for, e.g. `rbee-keeper keys create --name webui`"],
        )
    return name


def validate_scope(scope: str) -> Scope:
    if scope not in SCOPES:
        raise RbeeError(
            "INVALID_ARGUMENT",
            f"Invalid key scope {scope[:40]!r}: 'inference' (the OpenAI routes) or 'admin' (everything the HTTP API serves)",
            {"field": "scope"},
            ["Pass --scope inference or --scope admin: `rbee-keeper keys create --name NAME --scope inference`"],
        )
    return Scope(scope)


def key_exists(name: str) -> RbeeError:
    return RbeeError(
        "APP_KEY_EXISTS",
        f"An application key named {name!r} exists already",
        {"name": name},
        [LIST_HINT, f"Revoke it first with `rbee-keeper keys revoke {name}`, or pick another --name"],
    )


def key_not_found(name: str) -> RbeeError:
    return RbeeError("APP_KEY_NOT_FOUND", f"No application key named {name!r}", {"name": name}, [LIST_HINT])


class AppKeyStore:
    """The ``app_keys`` table of ``beehives.db`` (0600, as rbee/db.py makes every catalog)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._engine = open_engine(self.path, MIGRATIONS)
        # Our own connection for verify: data_version moves when any other connection commits.
        self._watch = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._lock = threading.Lock()
        self._version: int | None = None
        self._entries: tuple[_Entry, ...] = ()
        self._used: dict[str, int] = {}
        self._dirty: set[str] = set()

    def close(self) -> None:
        self.flush_last_used()
        with self._lock:
            self._watch.close()
        self._engine.dispose()

    def _fail(self, exc: SQLAlchemyError | sqlite3.Error) -> RbeeError:
        cause = getattr(exc, "orig", exc)
        return RbeeError("CATALOG_ERROR", f"Application keys in {self.path}: {cause}", {"path": str(self.path)})

    # -- what the admin does (through the queen's KeyService) -----------------

    def create(self, name: str, scope: str = Scope.INFERENCE) -> tuple[AppKey, str]:
        """A new key: its record and the key itself, which is never stored nor shown again."""
        name, scope = validate_name(name), validate_scope(scope)
        key = new_app_key()
        record = AppKey(name, scope, int(time.time()))
        try:
            with self._engine.begin() as conn:
                count = conn.execute(text("SELECT COUNT(*) FROM app_keys")).scalar_one()
                if count >= MAX_KEYS:
                    raise RbeeError(
                        "APP_KEY_LIMIT",
                        f"The queen holds {count} application keys, the most it keeps",
                        {"keys": count, "limit": MAX_KEYS},
                        [LIST_HINT, "Revoke the ones no application uses with `rbee-keeper keys revoke NAME`"],
                    )
                conn.execute(
                    text("INSERT INTO app_keys (name, key_hash, scope, created_at_unix) VALUES (:n, :h, :s, :c)"),
                    {"n": name, "h": digest(key), "s": str(scope), "c": record.created_at_unix},
                )
        except IntegrityError:
            raise key_exists(name) from None
        except SQLAlchemyError as exc:
            raise self._fail(exc) from None
        self._invalidate()
        return record, key

    def list(self) -> list[AppKey]:
        try:
            with self._engine.connect() as conn:
                rows = conn.execute(text("SELECT name, scope, created_at_unix, last_used_unix FROM app_keys ORDER BY name")).all()
        except SQLAlchemyError as exc:
            raise self._fail(exc) from None
        with self._lock:
            used = dict(self._used)
        return [AppKey(n, Scope(s), c, max(u, used.get(n, 0))) for n, s, c, u in rows]

    def revoke(self, name: str) -> AppKey:
        """Delete the key; the next request presenting it is refused."""
        if not NAME.fullmatch(name or ""):
            raise key_not_found(name[:80])
        try:
            with self._engine.begin() as conn:
                row = conn.execute(
                    text("SELECT name, scope, created_at_unix, last_used_unix FROM app_keys WHERE name = :n"), {"n": name}
                ).first()
                if row is None:
                    raise key_not_found(name)
                conn.execute(text("DELETE FROM app_keys WHERE name = :n"), {"n": name})
        except SQLAlchemyError as exc:
            raise self._fail(exc) from None
        self._invalidate()
        with self._lock:
            used = self._used.pop(name, 0)
            self._dirty.discard(name)
        return AppKey(row[0], Scope(row[1]), row[2], max(row[3], used))

    # -- what every HTTP request asks -----------------------------------------

    def verify(self, token: str) -> Scope | None:
        """The scope of ``token`` when it is a live application key, else None."""
        if not token or len(token) > MAX_TOKEN_CHARS:
            return None
        presented = digest(token)
        match: _Entry | None = None
        for entry in self._current():
            # No early exit: the time taken does not say which key matched.
            if hmac.compare_digest(entry.digest, presented):
                match = entry
        if match is None:
            return None
        now = int(time.time())
        with self._lock:
            if self._used.get(match.name, 0) != now:
                self._used[match.name] = now
                self._dirty.add(match.name)
        return match.scope

    def _invalidate(self) -> None:
        with self._lock:
            self._version = None

    def _current(self) -> tuple[_Entry, ...]:
        with self._lock:
            try:
                version = self._watch.execute("PRAGMA data_version").fetchone()[0]
                if version != self._version:
                    rows = self._watch.execute("SELECT name, key_hash, scope FROM app_keys").fetchall()
                    self._entries = tuple(_Entry(n, bytes(h), Scope(s)) for n, h, s in rows)
                    self._version = version
            except sqlite3.Error as exc:
                # A table that cannot be read opens nothing; the admin key still works.
                log.error("application keys in %s cannot be read: %s", self.path, exc)
                self._entries, self._version = (), None
            return self._entries

    # -- last use --------------------------------------------------------------

    async def keep_last_used(self, interval_s: float = FLUSH_INTERVAL_S) -> None:
        """Flush last uses every ``interval_s`` until cancelled (the queen runs it as a task)."""
        while True:
            await asyncio.sleep(interval_s)
            await asyncio.to_thread(self.flush_last_used)

    def flush_last_used(self) -> int:
        """Write the last uses recorded since the previous flush; how many keys."""
        with self._lock:
            pending = {name: self._used[name] for name in self._dirty if name in self._used}
            self._dirty.clear()
        if not pending:
            return 0
        try:
            with self._engine.begin() as conn:
                for name, unix in pending.items():
                    conn.execute(
                        text("UPDATE app_keys SET last_used_unix = :u WHERE name = :n AND last_used_unix < :u"),
                        {"u": unix, "n": name},
                    )
        except SQLAlchemyError as exc:
            log.warning("last use of application keys not saved (kept for the next flush): %s", getattr(exc, "orig", exc))
            with self._lock:
                self._dirty.update(pending)
            return 0
        return len(pending)
