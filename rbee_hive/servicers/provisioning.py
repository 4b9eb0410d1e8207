"""ProvisioningService: the node's model catalog and worker environments."""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from rbee.backends import backend_enum, backend_name
from rbee.cpus import read_cpu_flags
from rbee.enum_words import MODEL_FORMATS, MODEL_PROVIDERS
from rbee.errors import RbeeError
from rbee.fit import fit_facts
from rbee.narration import Narrator
from rbee.rpc import handle_errors
from rbee.v1 import common_pb2, provisioning_pb2, provisioning_pb2_grpc
from rbee_hive.catalog.fits import listing_metadata
from rbee_hive.catalog.models import ModelCatalog, ModelRecord
from rbee_hive.catalog.workers import WorkerCatalog, WorkerEnvRecord
from rbee_hive.provisioner.events import Reporter
from rbee_hive.provisioner.models import ModelProvisioner
from rbee_hive.provisioner.resolver import ProvisioningResolver
from rbee_hive.provisioner.settings import DownloadSettings
from rbee_hive.provisioner.environments import WorkerProvisioner

log = logging.getLogger(__name__)


def _fit_figures(catalog: ModelCatalog, records: list[ModelRecord]) -> list[dict[str, str]]:
    """Per model: the estimate's figures from its files and what its workers measured."""
    flags = read_cpu_flags()
    return [{**(fit_facts(r.local_path, "cpu", flags) if r.local_path else {}), **listing_metadata(catalog.measured.for_model(r.model_ref))}
            for r in records]  # fmt: skip


def _flat(metadata: dict[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in metadata.items():
        if key == "gguf" and isinstance(value, dict):
            out.update({f"gguf.{k}": str(v) for k, v in value.items()})
        elif isinstance(value, str):
            out[key] = value
        else:
            out[key] = json.dumps(value, sort_keys=True)
    return out


def model_entry(record: ModelRecord, loadable: Path | None = None) -> provisioning_pb2.ModelEntry:
    return provisioning_pb2.ModelEntry(
        id=record.id,
        origin=MODEL_PROVIDERS.number(record.provider),
        reference=record.reference,
        model_ref=record.model_ref,
        local_path=record.local_path,
        size_bytes=record.size_bytes,
        weights_format=MODEL_FORMATS.number(record.format),
        metadata=_flat(record.metadata),
        downloaded_at_unix_ms=record.downloaded_at_unix * 1000,
        loadable_path=str(loadable) if loadable else "",
    )


def worker_environment(record: WorkerEnvRecord) -> provisioning_pb2.WorkerEnvironment:
    return provisioning_pb2.WorkerEnvironment(
        id=record.id,
        worker_type=record.worker_type,
        backend=backend_enum(record.backend),
        features=record.features,
        path=record.path,
        binary_path=str(record.binary),
        version=record.version,
        engine=record.engine,
        source=record.source,
        installed_at_unix_ms=record.installed_at_unix * 1000,
    )


class ProvisioningServicer(provisioning_pb2_grpc.ProvisioningServiceServicer):
    def __init__(self, models: ModelProvisioner, workers: WorkerProvisioner, narrator: Narrator | None = None) -> None:
        self.models = models
        self.workers = workers
        self.narrator = narrator

    @handle_errors
    async def DownloadModel(self, request: provisioning_pb2.DownloadModelRequest, context: grpc.aio.ServicerContext):
        backend = backend_name(request.backend)
        async for item in self.models.download(request.model_ref, backend):
            if isinstance(item, ModelRecord):
                loadable = self.models.loadable_path(item, backend) if backend else None
                yield provisioning_pb2.DownloadModelResponse(model=model_entry(item, loadable))
            else:
                yield provisioning_pb2.DownloadModelResponse(event=item)

    @handle_errors
    async def ListModels(self, request: provisioning_pb2.ListModelsRequest, context: grpc.aio.ServicerContext):
        provider = MODEL_PROVIDERS.word(request.origin)
        if request.origin and not provider:
            # A newer client's provider: listing every model would answer another question.
            raise RbeeError(
                "INVALID_ARGUMENT",
                f"Unknown provider (ListModelsRequest.origin {request.origin})",
                {"field": "origin", "got": request.origin, "accepted": ", ".join(MODEL_PROVIDERS.words)},
            )
        records = await self.models.list(provider or None)
        entries = [model_entry(r) for r in records]
        # What the queen's fit estimate needs from the files (docs/queen.md, "Fit").
        figures = await asyncio.to_thread(_fit_figures, self.models.catalog, records)
        for entry, extra in zip(entries, figures):
            entry.metadata.update(extra)
        return provisioning_pb2.ListModelsResponse(models=entries)

    @handle_errors
    async def RemoveModel(self, request: provisioning_pb2.RemoveModelRequest, context: grpc.aio.ServicerContext):
        record = await self.models.remove(request.model_ref)
        return provisioning_pb2.RemoveModelResponse(removed=model_entry(record))

    @handle_errors
    async def ListWorkerEnvironments(
        self, request: provisioning_pb2.ListWorkerEnvironmentsRequest, context: grpc.aio.ServicerContext
    ):
        records = await asyncio.to_thread(self.workers.list, backend_name(request.backend) or None)
        return provisioning_pb2.ListWorkerEnvironmentsResponse(environments=[worker_environment(r) for r in records])

    @handle_errors
    async def ProvisionWorker(self, request: provisioning_pb2.ProvisionWorkerRequest, context: grpc.aio.ServicerContext):
        queue: asyncio.Queue[common_pb2.Event | None] = asyncio.Queue()
        report = Reporter(self.narrator)
        report.add_listener(queue.put_nowait)
        task = asyncio.create_task(
            self.workers.provision(backend_name(request.backend), report, request.source or None, request.force)
        )
        task.add_done_callback(lambda _t: queue.put_nowait(None))
        # A client that goes away does not stop an install half-way through
        # (that would leave a broken environment): the task runs to its end.
        while (ev := await queue.get()) is not None:
            yield provisioning_pb2.ProvisionWorkerResponse(event=ev)
        record = task.result()
        yield provisioning_pb2.ProvisionWorkerResponse(environment=worker_environment(record))


@dataclass
class Provisioning:
    """The provisioning parts of one hive."""

    models: ModelProvisioner
    workers: WorkerProvisioner
    resolver: ProvisioningResolver
    servicer: ProvisioningServicer

    def close(self) -> None:
        self.models.catalog.close()
        self.workers.catalog.close()


def build_provisioning(
    home: Path,
    narrator: Narrator | None = None,
    settings: DownloadSettings | None = None,
    source: Path | None = None,
    model_dirs: list[Path] | None = None,
    worker_sources: list[Path] | None = None,
) -> Provisioning:
    """``model_dirs``: folders beyond ``home/models`` file:// models may come
    from; ``worker_sources``: sources beyond ``source`` (default: the hive's
    own installation) worker environments may be built from."""
    home = Path(home)
    models = ModelProvisioner(ModelCatalog(home / "models.db"), home / "models", settings, narrator, extra_roots=model_dirs)
    workers = WorkerProvisioner(WorkerCatalog(home / "workers.db"), home, source=source, extra_sources=worker_sources)
    return Provisioning(models, workers, ProvisioningResolver(workers), ProvisioningServicer(models, workers, narrator))


def add_provisioning_service(server: grpc.aio.Server, ctx: Any) -> Provisioning:
    """Register the service on the hive's server and let spawns resolve the
    worker program through the worker-environments catalog (unless the
    operator configured a worker binary explicitly)."""
    settings = ctx.settings
    prov = build_provisioning(
        settings.rbee_home, ctx.narrate, model_dirs=list(settings.model_dirs), worker_sources=list(settings.worker_sources)
    )
    provisioning_pb2_grpc.add_ProvisioningServiceServicer_to_server(prov.servicer, server)
    if getattr(settings, "worker_binary", None) is None:
        ctx.manager.resolver = prov.resolver
    # Spawns by catalog reference load what the catalog holds.
    ctx.manager.models.catalog = prov.models
    # What workers measure goes to the model catalog (docs/queen.md, "Fit").
    ctx.manager.peaks.sink = prov.models.catalog.measured
    ctx.provisioning = prov
    return prov
