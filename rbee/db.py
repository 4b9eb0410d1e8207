"""SQLite engines for rbee's catalogs (the hive's models.db and workers.db, the queen's
beehives.db): WAL, a busy timeout, and schema versions kept in ``PRAGMA user_version`` and applied on open.

WAL lets readers (keeper listing models) proceed while a download registers
its entry; the busy timeout makes a second writer wait instead of failing.
A killed hive leaves at worst an uncommitted transaction, which SQLite rolls
back on the next open.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Sequence
from pathlib import Path

from sqlalchemy import Engine, create_engine, event

from rbee.errors import RbeeError
from rbee.paths import private_dir, private_file

log = logging.getLogger(__name__)

BUSY_TIMEOUT_MS = 5_000

# One entry per schema version: the statements that bring version i to i+1.
Migrations = Sequence[Sequence[str]]


def _on_connect(dbapi_conn: sqlite3.Connection, _record: object) -> None:
    cur = dbapi_conn.cursor()
    cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def open_engine(path: Path, migrations: Migrations) -> Engine:
    """An engine on ``path`` with the schema brought up to date."""
    path = Path(path)
    try:
        private_dir(path.parent, tighten=False)
        # Created 0600 before SQLite opens it: SQLite gives the -wal and -shm
        # files the database's mode, so the whole catalog is the owner's only.
        private_file(path)
        for companion in (path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
            if companion.exists():
                private_file(companion)
    except OSError as exc:
        raise RbeeError("CATALOG_ERROR", f"Cannot create the catalog {path}: {exc}", {"path": str(path)}) from exc
    engine = create_engine(f"sqlite:///{path}", connect_args={"timeout": BUSY_TIMEOUT_MS / 1000})
    event.listen(engine, "connect", _on_connect)
    try:
        migrate(engine, migrations)
    except sqlite3.DatabaseError as exc:
        engine.dispose()
        raise RbeeError(
            "CATALOG_ERROR",
            f"Catalog {path} cannot be opened: {exc}",
            {"path": str(path)},
            ["Move the damaged file aside; the hive creates a fresh catalog"],
        ) from exc
    except Exception as exc:
        engine.dispose()
        cause = getattr(exc, "orig", exc)
        raise RbeeError("CATALOG_ERROR", f"Catalog {path} cannot be opened: {cause}", {"path": str(path)}) from exc
    return engine


def schema_version(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.exec_driver_sql("PRAGMA user_version").scalar() or 0)


def migrate(engine: Engine, migrations: Migrations) -> None:
    """Apply the missing steps in one IMMEDIATE transaction, so two processes
    opening a fresh catalog at once do not both create it."""
    raw = engine.raw_connection()
    try:
        conn: sqlite3.Connection = raw.driver_connection  # type: ignore[assignment]
        previous = conn.isolation_level
        conn.isolation_level = None  # we issue BEGIN ourselves
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                if version > len(migrations):
                    raise RbeeError(
                        "CATALOG_ERROR",
                        f"Catalog schema version {version} is newer than this program knows ({len(migrations)})",
                        {"found": version, "known": len(migrations)},
                        ["Upgrade rbee on this node"],
                    )
                for step in range(version, len(migrations)):
                    for statement in migrations[step]:
                        conn.execute(statement)
                    log.info("catalog schema migrated to version %d", step + 1)
                conn.execute(f"PRAGMA user_version={len(migrations)}")
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        finally:
            conn.isolation_level = previous
    finally:
        raw.close()
