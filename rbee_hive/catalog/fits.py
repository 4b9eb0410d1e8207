"""Measured fits (``measured_fits`` in ``$RBEE_HOME/models.db``): the peak
memory a worker of a model really used on this node, per model reference,
backend and the settings it ran with (dtype, slots, context). The queen
places with it instead of the estimate once its settings match
(docs/queen.md, "Fit").

One row per key keeps the highest peak any worker with those settings
reached (a worker that served a heavier load measures more), with the time
of its last update.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass

from sqlalchemy import BigInteger, Engine, Integer, String, UniqueConstraint, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from rbee.errors import RbeeError
from rbee.fit import MAX_MEASURED, MEASURED_KEY

# The schema step models.db takes to get the table (rbee_hive/catalog/models.py MIGRATIONS).
MIGRATION: list[str] = [
    """CREATE TABLE measured_fits (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        model_ref VARCHAR(1100) NOT NULL,
        backend VARCHAR(16) NOT NULL,
        dtype VARCHAR(16) NOT NULL,
        slots INTEGER NOT NULL,
        context INTEGER NOT NULL,
        peak_bytes BIGINT NOT NULL,
        device_peak_bytes BIGINT NOT NULL DEFAULT 0,
        measured_at_unix BIGINT NOT NULL,
        CONSTRAINT uq_measured_fits_key UNIQUE (model_ref, backend, dtype, slots, context)
    )""",
    "CREATE INDEX ix_measured_fits_model_ref ON measured_fits (model_ref)",
]
# The next step: whether any worker behind the row had every slot busy at a sample.
MIGRATION_FULL_LOAD: list[str] = ["ALTER TABLE measured_fits ADD COLUMN full_load INTEGER NOT NULL DEFAULT 0"]


class _Base(DeclarativeBase):
    pass


class _FitRow(_Base):
    __tablename__ = "measured_fits"
    __table_args__ = (UniqueConstraint("model_ref", "backend", "dtype", "slots", "context", name="uq_measured_fits_key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model_ref: Mapped[str] = mapped_column(String(1100))
    backend: Mapped[str] = mapped_column(String(16))
    dtype: Mapped[str] = mapped_column(String(16))
    slots: Mapped[int] = mapped_column(Integer)
    context: Mapped[int] = mapped_column(Integer)
    peak_bytes: Mapped[int] = mapped_column(BigInteger)
    device_peak_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    measured_at_unix: Mapped[int] = mapped_column(BigInteger)
    full_load: Mapped[int] = mapped_column(Integer, default=0)


@dataclass(frozen=True)
class MeasuredFit:
    model_ref: str
    backend: str
    dtype: str
    slots: int
    context: int
    # Sum of VmHWM over the worker's process tree (host RAM).
    peak_bytes: int
    # On CUDA: the most device memory the tree held at a sample (0 = not measured).
    device_peak_bytes: int = 0
    measured_at_unix: int = 0
    # A worker behind it had every slot busy at a sample: the peak covers a full batch.
    full_load: bool = False

    def as_dict(self) -> dict[str, int | str]:
        out = asdict(self)
        del out["model_ref"]
        return out


def _to_fit(row: _FitRow) -> MeasuredFit:
    return MeasuredFit(row.model_ref, row.backend, row.dtype, row.slots, row.context, row.peak_bytes,
                       row.device_peak_bytes, row.measured_at_unix, bool(row.full_load))  # fmt: skip


def _db_error(action: str, exc: SQLAlchemyError) -> RbeeError:
    return RbeeError("CATALOG_ERROR", f"Model catalog: cannot {action}: {getattr(exc, 'orig', exc)}")


class MeasuredFits:
    """Repository over ``measured_fits`` (the model catalog's engine)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def record(self, fit: MeasuredFit) -> MeasuredFit:
        """Insert, or raise the row of the same key to the higher peaks."""
        stamp = fit.measured_at_unix or int(time.time())
        try:
            with Session(self._engine) as session, session.begin():
                query = select(_FitRow).where(_FitRow.model_ref == fit.model_ref, _FitRow.backend == fit.backend,
                                              _FitRow.dtype == fit.dtype, _FitRow.slots == fit.slots, _FitRow.context == fit.context)  # fmt: skip
                row = session.scalars(query).first()
                if row is None:
                    row = _FitRow(model_ref=fit.model_ref, backend=fit.backend, dtype=fit.dtype, slots=fit.slots,
                                  context=fit.context, peak_bytes=0, device_peak_bytes=0, full_load=0)  # fmt: skip
                    session.add(row)
                row.peak_bytes = max(row.peak_bytes, int(fit.peak_bytes))
                row.device_peak_bytes = max(row.device_peak_bytes, int(fit.device_peak_bytes))
                row.full_load = int(bool(row.full_load) or fit.full_load)
                row.measured_at_unix = stamp
                session.flush()
                return _to_fit(row)
        except SQLAlchemyError as exc:
            raise _db_error("record a measured fit", exc) from exc

    def for_model(self, model_ref: str) -> list[MeasuredFit]:
        """The model's measurements, the most recent first."""
        try:
            with Session(self._engine) as session:
                query = select(_FitRow).where(_FitRow.model_ref == model_ref).order_by(_FitRow.measured_at_unix.desc(), _FitRow.id.desc())
                return [_to_fit(row) for row in session.scalars(query)]
        except SQLAlchemyError as exc:
            raise _db_error("list measured fits", exc) from exc

    def forget(self, model_ref: str) -> int:
        try:
            with Session(self._engine) as session, session.begin():
                rows = list(session.scalars(select(_FitRow).where(_FitRow.model_ref == model_ref)))
                for row in rows:
                    session.delete(row)
                return len(rows)
        except SQLAlchemyError as exc:
            raise _db_error("forget measured fits", exc) from exc


def listing_metadata(fits: list[MeasuredFit]) -> dict[str, str]:
    """The model listing's ``fit.measured`` (rbee/fit.py ``measurements``): a
    JSON list of the most recent measurements (backend, dtype, slots,
    context, peak_bytes, device_peak_bytes, measured_at_unix, full_load);
    nothing when there are none."""
    if not fits:
        return {}
    return {MEASURED_KEY: json.dumps([f.as_dict() for f in fits[:MAX_MEASURED]], sort_keys=True)}
