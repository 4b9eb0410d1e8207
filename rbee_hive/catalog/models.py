"""The model catalog (``$RBEE_HOME/models.db``): what is on this node's disk.

Only complete, verified models are ever added; a download in progress lives
in a staging folder and has no row.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import BigInteger, Integer, String, Text, UniqueConstraint, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from rbee.errors import RbeeError
from rbee.db import open_engine
from rbee_hive.catalog.fits import MIGRATION as MEASURED_FITS_MIGRATION
from rbee_hive.catalog.fits import MIGRATION_FULL_LOAD as MEASURED_FITS_FULL_LOAD
from rbee_hive.catalog.fits import MeasuredFits

log = logging.getLogger(__name__)

MIGRATIONS: list[list[str]] = [
    [
        """CREATE TABLE models (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            provider VARCHAR(16) NOT NULL,
            reference VARCHAR(1024) NOT NULL,
            local_path TEXT NOT NULL,
            size_bytes BIGINT NOT NULL,
            format VARCHAR(32) NOT NULL,
            metadata TEXT NOT NULL DEFAULT '{}',
            downloaded_at_unix BIGINT NOT NULL,
            CONSTRAINT uq_models_provider_reference UNIQUE (provider, reference)
        )""",
        "CREATE INDEX ix_models_provider ON models (provider)",
    ],
    MEASURED_FITS_MIGRATION,
    MEASURED_FITS_FULL_LOAD,
]


class _Base(DeclarativeBase):
    pass


class _ModelRow(_Base):
    __tablename__ = "models"
    __table_args__ = (UniqueConstraint("provider", "reference", name="uq_models_provider_reference"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    provider: Mapped[str] = mapped_column(String(16))
    reference: Mapped[str] = mapped_column(String(1024))
    local_path: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    format: Mapped[str] = mapped_column(String(32))
    metadata_json: Mapped[str] = mapped_column("metadata", Text, default="{}")
    downloaded_at_unix: Mapped[int] = mapped_column(BigInteger)


@dataclass
class ModelRecord:
    provider: str
    reference: str
    local_path: str
    size_bytes: int
    format: str
    metadata: dict[str, Any] = field(default_factory=dict)
    downloaded_at_unix: int = 0
    id: int = 0

    @property
    def model_ref(self) -> str:
        return format_model_ref(self.provider, self.reference)


def format_model_ref(provider: str, reference: str) -> str:
    """The reference as typed: ``file:///abs/path`` or ``hf:ORG/REPO...``."""
    return f"file://{reference}" if provider == "file" else f"{provider}:{reference}"


def _to_record(row: _ModelRow) -> ModelRecord:
    try:
        meta = json.loads(row.metadata_json or "{}")
    except json.JSONDecodeError:
        meta = {}
    return ModelRecord(
        id=row.id,
        provider=row.provider,
        reference=row.reference,
        local_path=row.local_path,
        size_bytes=row.size_bytes,
        format=row.format,
        metadata=meta,
        downloaded_at_unix=row.downloaded_at_unix,
    )


def _find(session: Session, provider: str, reference: str) -> _ModelRow | None:
    query = select(_ModelRow).where(_ModelRow.provider == provider, _ModelRow.reference == reference)
    return session.scalars(query).first()


def _existing(session: Session, provider: str, reference: str) -> _ModelRow:
    row = _find(session, provider, reference)
    if row is None:
        raise _not_found(provider, reference)
    return row


def _db_error(action: str, exc: SQLAlchemyError) -> RbeeError:
    return RbeeError("CATALOG_ERROR", f"Model catalog: cannot {action}: {getattr(exc, 'orig', exc)}")


class ModelCatalog:
    """Repository over the ``models`` table; one session per operation."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._engine = open_engine(self.path, MIGRATIONS)
        # What workers of each model measured (rbee_hive/catalog/fits.py).
        self.measured = MeasuredFits(self._engine)

    def close(self) -> None:
        self._engine.dispose()

    def get(self, provider: str, reference: str) -> ModelRecord | None:
        try:
            with Session(self._engine) as session:
                row = _find(session, provider, reference)
                return _to_record(row) if row else None
        except SQLAlchemyError as exc:
            raise _db_error("look up a model", exc) from exc

    def list(self, provider: str | None = None) -> list[ModelRecord]:
        try:
            with Session(self._engine) as session:
                query = select(_ModelRow).order_by(_ModelRow.provider, _ModelRow.reference)
                if provider:
                    query = query.where(_ModelRow.provider == provider)
                return [_to_record(row) for row in session.scalars(query)]
        except SQLAlchemyError as exc:
            raise _db_error("list models", exc) from exc

    def add(self, record: ModelRecord) -> ModelRecord:
        """Insert, or replace the row with the same provider+reference."""
        stamp = record.downloaded_at_unix or int(time.time())
        try:
            with Session(self._engine) as session, session.begin():
                row = _find(session, record.provider, record.reference)
                if row is None:
                    row = _ModelRow(provider=record.provider, reference=record.reference)
                    session.add(row)
                row.local_path = record.local_path
                row.size_bytes = int(record.size_bytes)
                row.format = record.format
                row.metadata_json = json.dumps(record.metadata, sort_keys=True)
                row.downloaded_at_unix = stamp
                session.flush()
                return _to_record(row)
        except SQLAlchemyError as exc:
            raise _db_error("register a model", exc) from exc

    def update_metadata(self, provider: str, reference: str, **values: Any) -> ModelRecord:
        try:
            with Session(self._engine) as session, session.begin():
                row = _existing(session, provider, reference)
                meta = json.loads(row.metadata_json or "{}")
                meta.update(values)
                row.metadata_json = json.dumps(meta, sort_keys=True)
                session.flush()
                return _to_record(row)
        except SQLAlchemyError as exc:
            raise _db_error("update a model", exc) from exc

    def remove(self, provider: str, reference: str, owned_root: Path | None = None) -> ModelRecord:
        """Delete the row, then the files under ``owned_root`` (the models folder).

        Files outside it (a ``file://`` model the user pointed at) are the user's
        and stay; what the hive derived from them (an imported folder) goes.
        """
        try:
            with Session(self._engine) as session, session.begin():
                row = _existing(session, provider, reference)
                record = _to_record(row)
                session.delete(row)
                others = [_to_record(r) for r in session.scalars(select(_ModelRow))]
        except SQLAlchemyError as exc:
            raise _db_error("remove a model", exc) from exc
        # A model fetched again may be another revision: it is measured afresh.
        self.measured.forget(record.model_ref)
        if owned_root is not None:
            # A catalog written before folder names were one per reference may
            # hold two models in one folder: what another row still uses stays.
            root = Path(owned_root).resolve()
            used = [u for other in others for p in _paths(other) if (u := p.resolve()) != root and root in u.parents]
            for path in owned_paths(record, Path(owned_root)):
                target = path.resolve()
                shared = [u for u in used if u == target or target in u.parents or u in target.parents]
                if shared:
                    log.warning("kept %s: another model of the catalog still uses %s", path, shared[0])
                    continue
                _delete(path)
        return record


def _paths(record: ModelRecord) -> list[Path]:
    values = [record.metadata.get("folder"), record.local_path, record.metadata.get("loadable_path")]
    return [Path(v) for v in values if v]


def owned_paths(record: ModelRecord, owned_root: Path) -> list[Path]:
    """The hive's own files for ``record``: its folder under the models root."""
    root = owned_root.resolve()
    out: list[Path] = []
    for path in _paths(record):
        try:
            resolved = path.resolve()
        except OSError:
            continue
        if resolved != root and root in resolved.parents and not any(p in out for p in [path, *path.parents]):
            out.append(path)
    return out


def _delete(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    except OSError as exc:
        log.warning("could not delete %s: %s", path, exc)


def _not_found(provider: str, reference: str) -> RbeeError:
    ref = format_model_ref(provider, reference)
    return RbeeError(
        "MODEL_NOT_FOUND",
        f"Model not in the catalog: {ref}",
        {"model": ref},
        ["List what this node has with `rbee-keeper models list --hive HOST:PORT`"],
    )
