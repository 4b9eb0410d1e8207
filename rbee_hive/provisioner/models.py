"""The model provisioner: from a model reference to a catalog entry on disk.

``hf:`` references are downloaded (shared between concurrent requests) and
registered only once complete and verified; ``file://`` references are
registered where they are. GGUF files get their header metadata stored and,
for an engine that cannot load GGUF, are imported into a loadable folder.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from rbee.errors import RbeeError
from rbee.modelref import ModelRef, parse_model_ref
from rbee.narration import Narrator, event
from rbee.paths import confined, within
from rbee.v1 import common_pb2
from rbee_hive.catalog.models import ModelCatalog, ModelRecord
from rbee_hive.gguf_meta import is_gguf_path, read_gguf_metadata
from rbee_hive.provisioner.downloads import ModelDownload, human_bytes
from rbee_hive.provisioner.events import Reporter
from rbee_hive.provisioner.hub import HubClient, offline_error
from rbee_hive.provisioner.jobs import JobTable
from rbee_hive.provisioner.settings import DownloadSettings

log = logging.getLogger(__name__)

# Engines that load a GGUF file as it is. vLLM's CPU build does not, so
# GGUF models are imported into a safetensors folder for it.
ENGINE_LOADS_GGUF = {"cuda": True, "cpu": False, "metal": False}
IMPORT_DIR = "imported"


def detect_format(path: Path) -> str:
    if path.is_file():
        if is_gguf_path(path):
            return "gguf"
        if path.suffix == ".safetensors":
            return "safetensors"
        if path.suffix in (".bin", ".pt", ".pth"):
            return "pytorch"
        return "unknown"
    names = [p.name for p in path.rglob("*") if p.is_file()] if path.is_dir() else []
    if any(n.endswith(".safetensors") for n in names):
        return "safetensors"
    if any(n.lower().endswith(".gguf") for n in names):
        return "gguf"
    if any(n.endswith((".bin", ".pt", ".pth")) for n in names):
        return "pytorch"
    return "unknown"


def size_on_disk(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def gguf_file_of(path: Path) -> Path | None:
    if path.is_file():
        return path if is_gguf_path(path) else None
    found = sorted(p for p in path.rglob("*") if p.is_file() and is_gguf_path(p)) if path.is_dir() else []
    return found[0] if found else None


class ModelProvisioner:
    def __init__(
        self,
        catalog: ModelCatalog,
        models_dir: Path,
        settings: DownloadSettings | None = None,
        narrator: Narrator | None = None,
        extra_roots: list[Path] | None = None,
    ) -> None:
        self.catalog = catalog
        self.models_dir = Path(models_dir)
        # Where file:// models may be registered from (S13): the models folder
        # and the folders the operator added.
        self.roots = [self.models_dir, *(extra_roots or [])]
        self.settings = settings or DownloadSettings.from_env()
        self.hub = HubClient(self.settings)
        self.narrator = narrator
        self.jobs = JobTable(narrator)
        self._import_locks: dict[str, asyncio.Lock] = {}

    # --- queries ---------------------------------------------------------
    async def list(self, provider: str | None = None) -> list[ModelRecord]:
        return await asyncio.to_thread(self.catalog.list, provider or None)

    async def get(self, text: str) -> ModelRecord | None:
        ref = parse_model_ref(text)
        return await asyncio.to_thread(self.catalog.get, ref.provider, ref.reference)

    async def loadable(self, text: str, backend: str) -> Path | None:
        """What a worker on ``backend`` loads for the catalog entry ``text``;
        None when the entry is missing or its files are gone."""
        record = await self.get(text)
        if record is None or not Path(record.local_path).exists():
            return None
        return self.loadable_path(record, backend)

    async def remove(self, text: str) -> ModelRecord:
        ref = parse_model_ref(text)
        if str(ref) in self.jobs.active():
            raise RbeeError(
                "INVALID_ARGUMENT",
                f"{ref} is being downloaded right now; remove it once the download ends",
                {"model": str(ref)},
            )
        record = await asyncio.to_thread(self.catalog.remove, ref.provider, ref.reference, self.models_dir)
        self._say("🗑️", f"Removed {ref} from the catalog ({human_bytes(record.size_bytes)})")
        return record

    # --- download ----------------------------------------------------------
    async def download(self, text: str, backend: str = "") -> AsyncIterator[common_pb2.Event | ModelRecord]:
        """Narration/progress events, then the catalog entry (yielded last)."""
        ref = parse_model_ref(text)
        record: ModelRecord | None = None

        def joined() -> common_pb2.Event:
            return common_pb2.Event(
                narration=event("rbee-hive", "🤝", f"{ref} is already being downloaded; following that download")
            )

        async for item in self.jobs.follow(str(ref), lambda report: self._acquire_narrated(ref, report), joined):
            if isinstance(item, ModelRecord):
                record = item
            else:
                yield item
        assert record is not None
        if backend:
            queue: asyncio.Queue[common_pb2.Event | None] = asyncio.Queue()
            report = Reporter(self.narrator)
            report.add_listener(queue.put_nowait)
            task = asyncio.create_task(self.ensure_loadable(record, backend, report))
            task.add_done_callback(lambda _t: queue.put_nowait(None))
            try:
                while (ev := await queue.get()) is not None:
                    yield ev
                record = task.result()
            finally:
                if not task.done():
                    task.cancel()
        yield record

    async def ensure(
        self, text: str, backend: str, on_event: Callable[[common_pb2.Event], object] | None = None
    ) -> ModelRecord:
        """For the spawn flow (S1 step 7): the catalog entry of ``text``,
        downloaded (and imported for ``backend``) first if needed. The
        download's narration and progress go to ``on_event`` (already printed
        in the hive's log by the download itself); the worker loads
        ``loadable_path(record, backend)``."""
        record: ModelRecord | None = None
        async for item in self.download(text, backend):
            if isinstance(item, ModelRecord):
                record = item
            elif on_event is not None:
                on_event(item)
        assert record is not None
        return record

    async def _acquire_narrated(self, ref: ModelRef, report: Reporter) -> ModelRecord:
        try:
            return await self._acquire(ref, report)
        except RbeeError as err:
            # The daemon's log says why; the client gets the error itself.
            if self.narrator is not None:
                self.narrator("❌", f"{ref}: {err.code}: {err.message}", "error")
            raise
        except asyncio.CancelledError:
            if self.narrator is not None:
                self.narrator("⏸️", f"{ref}: download stopped (no client left); partial files kept for a retry")
            raise

    async def _acquire(self, ref: ModelRef, report: Reporter) -> ModelRecord:
        existing = await asyncio.to_thread(self.catalog.get, ref.provider, ref.reference)
        if existing is not None and Path(existing.local_path).exists():
            report.narrate("✅", f"{ref} is in the catalog: {existing.local_path}")
            return existing
        if existing is not None:
            report.narrate("⚠️", f"{ref} is in the catalog but {existing.local_path} is gone; fetching it again", "warn")
        if ref.provider == "file":
            return await self._register_local(ref, report)
        if self.settings.offline:
            raise offline_error(ref)
        report.narrate("📥", f"Downloading {ref} from {self.hub.endpoint_label}")
        cancel = threading.Event()
        download = ModelDownload(self.hub, self.settings, self.models_dir, report, cancel)
        folder, remote = await download.run(ref)
        local = confined(folder, ref.filename, what="Model file") if ref.filename else folder
        metadata: dict[str, Any] = {
            "folder": str(folder),
            "repo_id": ref.repo_id,
            "revision": ref.revision or "main",
            "commit": remote.commit,
            "files": [{"path": f.path, "size": f.size, "etag": f.etag} for f in remote.files],
        }
        return await self._register(ref, local, metadata, report, "Downloaded")

    async def _register_local(self, ref: ModelRef, report: Reporter) -> ModelRecord:
        try:
            path = within(self.roots, ref.path or ref.reference, what="Model path", details={"model": str(ref)})
        except RbeeError as err:
            err.suggestions[:0] = [
                "Place the model under the hive's models folder, or ask the node's operator to add its folder "
                "to model_dirs (RBEE_HIVE_MODEL_DIRS)"
            ]
            raise
        if not path.exists():
            raise RbeeError(
                "MODEL_NOT_FOUND",
                f"Model not found: {ref} (no such file or folder on this node)",
                {"model": str(ref), "path": str(path)},
                ["file:// references name a path on the node running the hive"],
            )
        report.narrate("📁", f"Registering local model {path}")
        return await self._register(ref, path, {"source": "local"}, report, "Registered")

    async def _register(
        self, ref: ModelRef, local: Path, metadata: dict[str, Any], report: Reporter, verb: str
    ) -> ModelRecord:
        fmt = await asyncio.to_thread(detect_format, local)
        size = await asyncio.to_thread(size_on_disk, local)
        if fmt == "gguf":
            gguf_file = await asyncio.to_thread(gguf_file_of, local)
            if gguf_file is not None:
                info = await asyncio.to_thread(read_gguf_metadata, gguf_file)
                metadata["gguf"] = info.as_metadata()
                metadata["gguf_file"] = str(gguf_file)
                report.narrate(
                    "🔎",
                    f"GGUF: {info.architecture}, {info.quantization or '?'}, vocab {info.vocab_size}, "
                    f"EOS id {info.eos_token_id}, {info.parameter_count or 0:,} parameters",
                )
        record = ModelRecord(
            provider=ref.provider,
            reference=ref.reference,
            local_path=str(local),
            size_bytes=size,
            format=fmt,
            metadata=metadata,
            downloaded_at_unix=int(time.time()),
        )
        record = await asyncio.to_thread(self.catalog.add, record)
        report.narrate("✅", f"{verb} {ref}: {human_bytes(size)}, {fmt} → {local}")
        return record

    # --- engines -----------------------------------------------------------
    def loadable_path(self, record: ModelRecord, backend: str) -> Path:
        """What to hand the worker's ``--model`` for ``backend``."""
        if record.format == "gguf" and not ENGINE_LOADS_GGUF.get(backend, False):
            imported = record.metadata.get("loadable_path")
            if imported:
                return Path(imported)
            raise RbeeError(
                "MODEL_LOAD_FAILED",
                f"{record.model_ref} is GGUF and the {backend} engine needs it imported first",
                {"model": record.model_ref, "backend": backend},
            )
        return Path(record.local_path)

    async def ensure_loadable(self, record: ModelRecord, backend: str, report: Reporter) -> ModelRecord:
        """Import a GGUF model for an engine that cannot load GGUF (once)."""
        if record.format != "gguf" or ENGINE_LOADS_GGUF.get(backend, False):
            return record
        lock = self._import_locks.setdefault(record.model_ref, asyncio.Lock())
        async with lock:
            fresh = await asyncio.to_thread(self.catalog.get, record.provider, record.reference) or record
            from rbee_hive.gguf_import import import_gguf, is_imported

            current = fresh.metadata.get("loadable_path")
            if current and is_imported(Path(current)):
                return fresh
            gguf_file = Path(fresh.metadata.get("gguf_file") or fresh.local_path)
            out = self._import_dir(fresh)
            report.narrate("🔧", f"The {backend} engine cannot load GGUF directly; importing {gguf_file.name} into {out}")
            await asyncio.to_thread(import_gguf, gguf_file, out, report.narrate)
            return await asyncio.to_thread(
                self.catalog.update_metadata, fresh.provider, fresh.reference, loadable_path=str(out)
            )

    def _import_dir(self, record: ModelRecord) -> Path:
        folder = record.metadata.get("folder")
        if folder:
            return confined(within([self.models_dir], folder, what="Model folder"), IMPORT_DIR)
        return confined(self.models_dir, "imported", parse_model_ref(record.model_ref).slug(), what="Import folder")

    def _say(self, emoji: str, message: str) -> None:
        if self.narrator is not None:
            self.narrator(emoji, message)
        else:
            log.info("%s %s", emoji, message)
