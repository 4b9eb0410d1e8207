"""Deployments: the models the queen keeps running (the keeper's ``models
deploy``, docs/queen.md "Replicas"), one row per model in the ``deployments``
table of the queen's ``beehives.db``: how many workers, on which nodes (none
named = any), the backend, when it was made. The wish outlives the queen: a
queen that restarts reads it back and its reconcile loop
(rbee_queen/replicas.py) carries on.

Every input is bounded here, before it is stored: replicas 1..MAX_REPLICAS,
at most MAX_NODES node names of the registry's own form, a model reference
the shared parser accepts and no longer than MAX_MODEL_REF_CHARS, and at most
MAX_DEPLOYMENTS rows (each is reconciled in a loop).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from rbee.backends import BACKENDS
from rbee.errors import RbeeError
from rbee.modelref import parse_model_ref

from rbee_queen.nodes.store import MIGRATIONS
from rbee_queen.nodes.validation import NAME

MAX_REPLICAS = 64
MAX_NODES = 64
MAX_DEPLOYMENTS = 256
MAX_MODEL_REF_CHARS = 1024

LIST_HINT = "See the deployments with `rbee-keeper models list --deployed`"


@dataclass(frozen=True)
class Deployment:
    model_ref: str
    replicas: int
    # Allowed nodes; () = every registered node.
    nodes: tuple[str, ...] = ()
    backend: str = "cpu"
    created_at_unix: int = 0


def _invalid(field: str, message: str, suggestion: str) -> RbeeError:
    return RbeeError("INVALID_ARGUMENT", message, {"field": field}, [suggestion])


def canonical_ref(model_ref: str) -> str:
    if len(model_ref or "") > MAX_MODEL_REF_CHARS:
        raise RbeeError("INVALID_MODEL_REF", f"Model reference longer than {MAX_MODEL_REF_CHARS} characters",
                        {"field": "model_ref"}, ["Pass hf:ORG/REPO[/FILE][@REVISION] or file:///abs/path"])  # fmt: skip
    return str(parse_model_ref(model_ref))


def validate(model_ref: str, replicas: int, nodes: list[str] | tuple[str, ...], backend: str) -> Deployment:
    """A deployment from a request's fields, or INVALID_ARGUMENT naming the field."""
    ref = canonical_ref(model_ref)
    if not 1 <= replicas <= MAX_REPLICAS:
        raise _invalid("replicas", f"--replicas must be between 1 and {MAX_REPLICAS}, not {replicas}",
                       f"Pass --replicas 1 to {MAX_REPLICAS}: `rbee-keeper models deploy {ref} --replicas 2`")  # fmt: skip
    if len(nodes) > MAX_NODES:
        raise _invalid("nodes", f"--nodes names {len(nodes)} nodes; at most {MAX_NODES}",
                       "Leave --nodes out to allow every registered node")  # fmt: skip
    names: list[str] = []
    for name in nodes:
        name = name.strip()
        if not NAME.match(name):
            shown = name if len(name) <= 80 else f"{name[:80]}…"
            raise _invalid("nodes", f"Invalid node name {shown!r} in --nodes: 1 to 64 letters, digits, '.', '_' or '-'",
                           "See the registered nodes with `rbee-keeper setup list-nodes`")  # fmt: skip
        if name not in names:
            names.append(name)
    chosen = (backend or "cpu").strip().lower()
    if chosen not in BACKENDS:
        raise RbeeError("INVALID_BACKEND", f"Unknown backend {backend[:40]!r}: choose one of {', '.join(BACKENDS)}",
                        {"backend": backend[:40]}, ["Pass --backend cpu, --backend cuda or --backend metal"])  # fmt: skip
    return Deployment(ref, replicas, tuple(names), chosen)


def not_found(model_ref: str) -> RbeeError:
    return RbeeError("DEPLOYMENT_NOT_FOUND", f"{model_ref} is not deployed", {"model": model_ref},
                     [LIST_HINT, f"Deploy it with `rbee-keeper models deploy {model_ref} --replicas 1`"])  # fmt: skip


class DeploymentStore:
    """The ``deployments`` table of ``beehives.db`` (0600, as rbee/db.py makes every catalog)."""

    def __init__(self, path: Path) -> None:
        from rbee.db import open_engine

        self.path = Path(path)
        self._engine = open_engine(self.path, MIGRATIONS)

    def close(self) -> None:
        self._engine.dispose()

    def _fail(self, exc: SQLAlchemyError) -> RbeeError:
        return RbeeError("CATALOG_ERROR", f"Deployments in {self.path}: {getattr(exc, 'orig', exc)}", {"path": str(self.path)})

    def put(self, d: Deployment) -> tuple[Deployment, bool]:
        """Store ``d`` (replacing the model's wish, keeping its creation time); (stored, replaced)."""
        try:
            with self._engine.begin() as conn:
                row = conn.execute(text("SELECT created_at_unix FROM deployments WHERE model_ref = :m"), {"m": d.model_ref}).first()
                if row is None:
                    count = conn.execute(text("SELECT COUNT(*) FROM deployments")).scalar_one()
                    if count >= MAX_DEPLOYMENTS:
                        raise RbeeError("DEPLOYMENT_LIMIT", f"The queen keeps {count} deployments, the most it holds",
                                        {"deployments": count, "limit": MAX_DEPLOYMENTS},
                                        [LIST_HINT, "Undeploy one you no longer need: `rbee-keeper models undeploy MODEL`"])  # fmt: skip
                created = row[0] if row is not None else int(time.time())
                stored = Deployment(d.model_ref, d.replicas, d.nodes, d.backend, created)
                conn.execute(
                    text("INSERT INTO deployments (model_ref, replicas, nodes, backend, created_at_unix) "
                         "VALUES (:m, :r, :n, :b, :c) ON CONFLICT(model_ref) DO UPDATE SET "
                         "replicas = excluded.replicas, nodes = excluded.nodes, backend = excluded.backend"),
                    {"m": d.model_ref, "r": d.replicas, "n": json.dumps(list(d.nodes)), "b": d.backend, "c": created},
                )  # fmt: skip
        except SQLAlchemyError as exc:
            raise self._fail(exc) from None
        return stored, row is not None

    def list(self) -> list[Deployment]:
        try:
            with self._engine.connect() as conn:
                rows = conn.execute(text("SELECT model_ref, replicas, nodes, backend, created_at_unix FROM deployments "
                                         "ORDER BY model_ref")).all()  # fmt: skip
        except SQLAlchemyError as exc:
            raise self._fail(exc) from None
        return [Deployment(m, r, tuple(json.loads(n or "[]")), b, c) for m, r, n, b, c in rows]

    def get(self, model_ref: str) -> Deployment:
        found = [d for d in self.list() if d.model_ref == model_ref]
        if not found:
            raise not_found(model_ref)
        return found[0]

    def remove(self, model_ref: str) -> Deployment:
        try:
            with self._engine.begin() as conn:
                row = conn.execute(text("SELECT model_ref, replicas, nodes, backend, created_at_unix FROM deployments "
                                        "WHERE model_ref = :m"), {"m": model_ref}).first()  # fmt: skip
                if row is None:
                    raise not_found(model_ref)
                conn.execute(text("DELETE FROM deployments WHERE model_ref = :m"), {"m": model_ref})
        except SQLAlchemyError as exc:
            raise self._fail(exc) from None
        m, r, n, b, c = row
        return Deployment(m, r, tuple(json.loads(n or "[]")), b, c)
