"""The worker-environments catalog (``$RBEE_HOME/workers.db``): which worker
environments are installed on this node, for which backend, where."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import BigInteger, String, Text, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from rbee.errors import RbeeError
from rbee.db import open_engine

MIGRATIONS: list[list[str]] = [
    [
        """CREATE TABLE worker_envs (
            id VARCHAR(128) PRIMARY KEY,
            worker_type VARCHAR(64) NOT NULL,
            backend VARCHAR(16) NOT NULL,
            features TEXT NOT NULL DEFAULT '[]',
            path TEXT NOT NULL,
            version VARCHAR(64) NOT NULL,
            engine VARCHAR(128) NOT NULL DEFAULT '',
            source TEXT NOT NULL DEFAULT '',
            details TEXT NOT NULL DEFAULT '{}',
            installed_at_unix BIGINT NOT NULL
        )""",
        "CREATE INDEX ix_worker_envs_backend ON worker_envs (backend)",
    ],
]


class _Base(DeclarativeBase):
    pass


class _WorkerEnvRow(_Base):
    __tablename__ = "worker_envs"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    worker_type: Mapped[str] = mapped_column(String(64))
    backend: Mapped[str] = mapped_column(String(16))
    features: Mapped[str] = mapped_column(Text, default="[]")
    path: Mapped[str] = mapped_column(Text)
    version: Mapped[str] = mapped_column(String(64))
    engine: Mapped[str] = mapped_column(String(128), default="")
    source: Mapped[str] = mapped_column(Text, default="")
    details: Mapped[str] = mapped_column(Text, default="{}")
    installed_at_unix: Mapped[int] = mapped_column(BigInteger)


@dataclass
class WorkerEnvRecord:
    id: str
    worker_type: str
    backend: str
    path: str
    version: str
    engine: str = ""
    source: str = ""
    features: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    installed_at_unix: int = 0

    @property
    def binary(self) -> Path:
        return Path(self.path) / "bin" / "llm-worker-rbee"


def _to_record(row: _WorkerEnvRow) -> WorkerEnvRecord:
    return WorkerEnvRecord(
        id=row.id,
        worker_type=row.worker_type,
        backend=row.backend,
        path=row.path,
        version=row.version,
        engine=row.engine,
        source=row.source,
        features=json.loads(row.features or "[]"),
        details=json.loads(row.details or "{}"),
        installed_at_unix=row.installed_at_unix,
    )


def _db_error(action: str, exc: SQLAlchemyError) -> RbeeError:
    return RbeeError("CATALOG_ERROR", f"Worker catalog: cannot {action}: {getattr(exc, 'orig', exc)}")


class WorkerCatalog:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._engine = open_engine(self.path, MIGRATIONS)

    def close(self) -> None:
        self._engine.dispose()

    def get(self, env_id: str) -> WorkerEnvRecord | None:
        try:
            with Session(self._engine) as session:
                row = session.get(_WorkerEnvRow, env_id)
                return _to_record(row) if row else None
        except SQLAlchemyError as exc:
            raise _db_error("look up a worker environment", exc) from exc

    def list(self, backend: str | None = None) -> list[WorkerEnvRecord]:
        try:
            with Session(self._engine) as session:
                query = select(_WorkerEnvRow).order_by(_WorkerEnvRow.id)
                if backend:
                    query = query.where(_WorkerEnvRow.backend == backend)
                return [_to_record(row) for row in session.scalars(query)]
        except SQLAlchemyError as exc:
            raise _db_error("list worker environments", exc) from exc

    def put(self, record: WorkerEnvRecord) -> WorkerEnvRecord:
        stamp = record.installed_at_unix or int(time.time())
        try:
            with Session(self._engine) as session, session.begin():
                row = session.get(_WorkerEnvRow, record.id)
                if row is None:
                    row = _WorkerEnvRow(id=record.id)
                    session.add(row)
                row.worker_type = record.worker_type
                row.backend = record.backend
                row.features = json.dumps(record.features)
                row.path = record.path
                row.version = record.version
                row.engine = record.engine
                row.source = record.source
                row.details = json.dumps(record.details, sort_keys=True)
                row.installed_at_unix = stamp
                session.flush()
                return _to_record(row)
        except SQLAlchemyError as exc:
            raise _db_error("record a worker environment", exc) from exc

    def remove(self, env_id: str) -> bool:
        try:
            with Session(self._engine) as session, session.begin():
                row = session.get(_WorkerEnvRow, env_id)
                if row is None:
                    return False
                session.delete(row)
                return True
        except SQLAlchemyError as exc:
            raise _db_error("remove a worker environment", exc) from exc
