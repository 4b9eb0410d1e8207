"""What models the cluster can serve, for ``/v1/models`` and the ``model``
parameter: every model loaded in a worker somewhere (the global worker
registry) or downloaded on a node (each hive's catalog), each listed once
with where it is loaded and where it is downloaded. ``model`` accepts the
rbee model reference or its short name (the repository's or folder's name)
when only one model has it."""

from __future__ import annotations

import asyncio
import logging
import posixpath
from dataclasses import dataclass, field

from rbee.errors import RbeeError
from rbee.modelref import parse_model_ref
from rbee.v1 import common_pb2, provisioning_pb2

from rbee_queen.hives import HiveLink
from rbee_queen.http.errors import ApiError
from rbee_queen.nodes.store import NodeStore
from rbee_queen.survey import canonical
from rbee_queen.workers import ClusterWorkers

log = logging.getLogger(__name__)
State = common_pb2.WorkerState
# One hive's catalog listing; a node that does not answer in time is left out.
CATALOG_TIMEOUT_S = 3.0
LIVE_STATES = (State.WORKER_STATE_IDLE, State.WORKER_STATE_BUSY, State.WORKER_STATE_LOADING, State.WORKER_STATE_DRAINING)


def short_names(ref: str) -> set[str]:
    """The names a reference may be called by: ``hf:ORG/REPO`` → ``REPO`` and
    ``ORG/REPO``; ``file:///x/y/model`` → ``model``."""
    try:
        parsed = parse_model_ref(ref)
    except RbeeError:
        return set()
    if parsed.provider == "file":
        return {posixpath.basename(parsed.reference.rstrip("/"))}
    names = {parsed.reference}
    if parsed.repo_id:
        names |= {parsed.repo_id, parsed.repo_id.split("/")[-1]}
    if parsed.filename:
        names.add(posixpath.basename(parsed.filename))
    return names


@dataclass
class ClusterModel:
    ref: str
    loaded_on: list[str] = field(default_factory=list)
    downloaded_on: list[str] = field(default_factory=list)
    created: int = 0

    def as_openai(self) -> dict:
        short = sorted(short_names(self.ref), key=len)
        return {
            "id": self.ref, "object": "model", "created": self.created, "owned_by": "rbee",
            "name": short[0] if short else self.ref,
            "loaded_on": sorted(set(self.loaded_on)), "downloaded_on": sorted(set(self.downloaded_on)),
        }  # fmt: skip


class ModelDirectory:
    def __init__(self, store: NodeStore, registry: ClusterWorkers) -> None:
        self.store = store
        self.registry = registry

    def loaded(self) -> dict[str, list[str]]:
        """Model reference → the nodes with a live worker of it."""
        out: dict[str, list[str]] = {}
        for cw in self.registry.list():
            if cw.worker.state in LIVE_STATES:
                out.setdefault(canonical(cw.worker.model_ref), []).append(cw.node)
        return out

    async def downloaded(self) -> dict[str, tuple[list[str], int]]:
        """Model reference → (the nodes whose hive holds it, when first downloaded)."""
        try:
            records = self.store.list()
        except RbeeError:
            return {}

        async def one(record):
            link = HiveLink(record)
            try:
                reply = await link.call(link.provisioning.ListModels, provisioning_pb2.ListModelsRequest(), timeout=CATALOG_TIMEOUT_S)
                return record.name, list(reply.models)
            except (RbeeError, asyncio.TimeoutError) as err:
                log.info("models of %s not listed: %s", record.name, err)
                return record.name, []
            finally:
                await link.close()

        out: dict[str, tuple[list[str], int]] = {}
        for name, models in await asyncio.gather(*(one(r) for r in records)):
            for m in models:
                nodes, created = out.setdefault(canonical(m.model_ref), ([], 0))
                nodes.append(name)
                # OpenAI's "created" is unix seconds.
                downloaded = m.downloaded_at_unix_ms // 1000
                if downloaded and (not created or downloaded < created):
                    out[canonical(m.model_ref)] = (nodes, downloaded)
        return out

    async def all(self) -> list[ClusterModel]:
        models: dict[str, ClusterModel] = {}
        for ref, (nodes, created) in (await self.downloaded()).items():
            models[ref] = ClusterModel(ref, downloaded_on=nodes, created=created)
        for ref, nodes in self.loaded().items():
            models.setdefault(ref, ClusterModel(ref)).loaded_on.extend(nodes)
        return [models[k] for k in sorted(models)]

    async def resolve(self, name: str) -> str:
        """The rbee reference ``name`` means: the reference itself (known or not:
        a reference nobody has yet is a cold start that downloads it), or the
        short name of exactly one known model. 404 otherwise; 400 when ambiguous."""
        if not isinstance(name, str) or not name or len(name) > 1024:
            raise ApiError(400, "model: a model name is required", "model", "invalid_value")
        try:
            return str(parse_model_ref(name))
        except RbeeError:
            pass
        loaded = set(self.loaded())
        matches = {ref for ref in loaded if name in short_names(ref)}
        if not matches:
            known = loaded | set(await self.downloaded())
            matches = {ref for ref in known if name in short_names(ref)}
        if len(matches) == 1:
            return matches.pop()
        if matches:
            raise ApiError(400, f"The model name {name!r} is ambiguous: use one of {', '.join(sorted(matches))}",
                           "model", "model_ambiguous")  # fmt: skip
        raise ApiError(404, f"The model {name!r} does not exist in this cluster (see GET /v1/models)", "model",
                       "model_not_found")  # fmt: skip
