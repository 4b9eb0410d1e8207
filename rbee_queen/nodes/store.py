"""The node registry (``$RBEE_HOME/beehives.db``, S3): one row per node with
how to reach it, where rbee is installed there, what it has, and the hive key
the queen generated for it. The file is 0600: it holds the nodes' hive keys."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sqlalchemy import BigInteger, Boolean, Integer, String, Text, select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from rbee.db import open_engine
from rbee.errors import RbeeError

MIGRATIONS: list[list[str]] = [
    [
        """CREATE TABLE nodes (
            name VARCHAR(64) PRIMARY KEY,
            transport VARCHAR(16) NOT NULL,
            ssh_host VARCHAR(255) NOT NULL DEFAULT '',
            ssh_port INTEGER NOT NULL DEFAULT 22,
            ssh_user VARCHAR(64) NOT NULL DEFAULT '',
            ssh_key_path TEXT NOT NULL DEFAULT '',
            git_repo_url TEXT NOT NULL DEFAULT '',
            git_branch VARCHAR(255) NOT NULL DEFAULT 'main',
            install_path TEXT NOT NULL,
            rbee_home TEXT NOT NULL DEFAULT '',
            hive_port INTEGER NOT NULL DEFAULT 7900,
            hive_key TEXT NOT NULL,
            status VARCHAR(16) NOT NULL DEFAULT 'unknown',
            last_connected_unix BIGINT NOT NULL DEFAULT 0,
            last_error TEXT NOT NULL DEFAULT '',
            backends TEXT NOT NULL DEFAULT '{}',
            hive_version VARCHAR(64) NOT NULL DEFAULT '',
            created_at_unix BIGINT NOT NULL
        )""",
    ],
    # Mutual TLS for the node's hive and workers (S13).
    ["ALTER TABLE nodes ADD COLUMN tls INTEGER NOT NULL DEFAULT 0"],
    # Keys for applications on the queen's HTTP API (rbee_queen/appkeys.py):
    # SHA-256 of the key only, never the key.
    [
        """CREATE TABLE app_keys (
            name VARCHAR(64) PRIMARY KEY,
            key_hash BLOB NOT NULL UNIQUE,
            scope VARCHAR(16) NOT NULL,
            created_at_unix BIGINT NOT NULL,
            last_used_unix BIGINT NOT NULL DEFAULT 0
        )""",
    ],
    # Models the queen keeps running (rbee_queen/deployments.py): nodes as a JSON list.
    [
        """CREATE TABLE deployments (
            model_ref VARCHAR(1024) PRIMARY KEY,
            replicas INTEGER NOT NULL,
            nodes TEXT NOT NULL DEFAULT '[]',
            backend VARCHAR(16) NOT NULL DEFAULT 'cpu',
            created_at_unix BIGINT NOT NULL
        )""",
    ],
]

STATUSES = ("unknown", "reachable", "unreachable")


class _Base(DeclarativeBase):
    pass


class _NodeRow(_Base):
    __tablename__ = "nodes"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    transport: Mapped[str] = mapped_column(String(16))
    ssh_host: Mapped[str] = mapped_column(String(255), default="")
    ssh_port: Mapped[int] = mapped_column(Integer, default=22)
    ssh_user: Mapped[str] = mapped_column(String(64), default="")
    ssh_key_path: Mapped[str] = mapped_column(Text, default="")
    git_repo_url: Mapped[str] = mapped_column(Text, default="")
    git_branch: Mapped[str] = mapped_column(String(255), default="main")
    install_path: Mapped[str] = mapped_column(Text)
    rbee_home: Mapped[str] = mapped_column(Text, default="")
    hive_port: Mapped[int] = mapped_column(Integer, default=7900)
    hive_key: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default="unknown")
    last_connected_unix: Mapped[int] = mapped_column(BigInteger, default=0)
    last_error: Mapped[str] = mapped_column(Text, default="")
    backends: Mapped[str] = mapped_column(Text, default="{}")
    hive_version: Mapped[str] = mapped_column(String(64), default="")
    created_at_unix: Mapped[int] = mapped_column(BigInteger)
    tls: Mapped[bool] = mapped_column(Boolean, default=False)


@dataclass
class NodeRecord:
    name: str
    transport: str  # "ssh" or "local"
    install_path: str
    hive_key: str = field(repr=False)
    ssh_host: str = ""
    ssh_port: int = 22
    ssh_user: str = ""
    ssh_key_path: str = ""
    git_repo_url: str = ""
    git_branch: str = "main"
    rbee_home: str = ""
    hive_port: int = 7900
    status: str = "unknown"
    last_connected_unix: int = 0
    last_error: str = ""
    # backend name -> device count
    backends: dict[str, int] = field(default_factory=dict)
    hive_version: str = ""
    created_at_unix: int = 0
    # The node's hive and workers serve mutual TLS (certificates of the queen's CA).
    tls: bool = False
    # Not stored: the queen's [remote] hive_program, set by the store on every record it returns.
    remote_hive_program: str = field(default="", compare=False)

    @property
    def is_local(self) -> bool:
        return self.transport == "local"

    @property
    def hive_host(self) -> str:
        """Where the queen reaches the node's hive."""
        return "127.0.0.1" if self.is_local or self.ssh_host in ("localhost", "::1") else self.ssh_host

    @property
    def hive_address(self) -> str:
        host = self.hive_host
        return f"[{host}]:{self.hive_port}" if ":" in host else f"{host}:{self.hive_port}"

    @property
    def hive_program(self) -> str:
        """The node's rbee-hive: [remote] hive_program for SSH nodes when the
        queen's config sets it, else the one in install_path's environment."""
        if self.remote_hive_program and not self.is_local:
            return self.remote_hive_program
        return f"{self.install_path.rstrip('/')}/.venv/bin/rbee-hive"


def _to_record(row: _NodeRow, hive_program: str = "") -> NodeRecord:
    values = {c: getattr(row, c) for c in _NodeRow.__table__.columns.keys()}
    values["backends"] = json.loads(values["backends"] or "{}")
    values["tls"] = bool(values["tls"])
    return NodeRecord(**values, remote_hive_program=hive_program)


def node_not_found(name: str) -> RbeeError:
    return RbeeError(
        "NODE_NOT_FOUND",
        f"No node named {name!r} is registered with the queen",
        {"node": name},
        [
            "See the registered nodes with `rbee-keeper setup list-nodes`",
            f"Register it with `rbee-keeper setup add-node --name {name} --ssh-host HOST --ssh-user USER "
            "--ssh-key KEY --install-path PATH`",
        ],
    )


class NodeStore:
    def __init__(self, path: Path, hive_program: str = "") -> None:
        self.path = Path(path)
        self.hive_program = hive_program
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not self.path.exists():
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
        self._engine = open_engine(self.path, MIGRATIONS)
        for suffix in ("", "-wal", "-shm"):
            extra = Path(f"{self.path}{suffix}")
            if extra.exists():
                os.chmod(extra, 0o600)

    def close(self) -> None:
        self._engine.dispose()

    def _session(self) -> Session:
        return Session(self._engine, expire_on_commit=False)

    def _fail(self, exc: SQLAlchemyError) -> RbeeError:
        cause = getattr(exc, "orig", exc)
        return RbeeError("CATALOG_ERROR", f"Node registry {self.path}: {cause}", {"path": str(self.path)})

    def add(self, record: NodeRecord) -> NodeRecord:
        record.created_at_unix = record.created_at_unix or int(time.time())
        values = asdict(record)
        values.pop("remote_hive_program", None)
        values["backends"] = json.dumps(record.backends, sort_keys=True)
        try:
            with self._session() as session, session.begin():
                session.add(_NodeRow(**values))
        except IntegrityError:
            raise node_exists(record.name) from None
        except SQLAlchemyError as exc:
            raise self._fail(exc) from None
        return record

    def get(self, name: str) -> NodeRecord:
        try:
            with self._session() as session:
                row = session.get(_NodeRow, name)
                if row is None:
                    raise node_not_found(name)
                return _to_record(row, self.hive_program)
        except SQLAlchemyError as exc:
            raise self._fail(exc) from None

    def exists(self, name: str) -> bool:
        try:
            with self._session() as session:
                return session.get(_NodeRow, name) is not None
        except SQLAlchemyError as exc:
            raise self._fail(exc) from None

    def list(self) -> list[NodeRecord]:
        try:
            with self._session() as session:
                return [_to_record(r, self.hive_program) for r in session.scalars(select(_NodeRow).order_by(_NodeRow.name))]
        except SQLAlchemyError as exc:
            raise self._fail(exc) from None

    def update(self, name: str, **changes: object) -> NodeRecord:
        if "backends" in changes:
            changes["backends"] = json.dumps(changes["backends"], sort_keys=True)
        try:
            with self._session() as session, session.begin():
                row = session.get(_NodeRow, name)
                if row is None:
                    raise node_not_found(name)
                for key, value in changes.items():
                    if key not in _NodeRow.__table__.columns:
                        raise ValueError(f"unknown node field {key}")
                    setattr(row, key, value)
                session.flush()
                return _to_record(row, self.hive_program)
        except SQLAlchemyError as exc:
            raise self._fail(exc) from None

    def remove(self, name: str) -> NodeRecord:
        try:
            with self._session() as session, session.begin():
                row = session.get(_NodeRow, name)
                if row is None:
                    raise node_not_found(name)
                record = _to_record(row, self.hive_program)
                session.delete(row)
                return record
        except SQLAlchemyError as exc:
            raise self._fail(exc) from None

    def mark_reachable(self, name: str) -> NodeRecord:
        return self.update(name, status="reachable", last_connected_unix=int(time.time()), last_error="")

    def mark_unreachable(self, name: str, error: str) -> NodeRecord:
        return self.update(name, status="unreachable", last_error=error[:2000])


def node_exists(name: str) -> RbeeError:
    return RbeeError(
        "NODE_EXISTS",
        f"A node named {name!r} is already registered",
        {"node": name},
        [
            f"Change it with `rbee-keeper setup update-node --name {name} ...`",
            f"Or remove it first with `rbee-keeper setup remove-node --name {name}`",
        ],
    )
