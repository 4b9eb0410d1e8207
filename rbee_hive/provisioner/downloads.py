"""Download one hub model: resolve its files, check the disk, fetch every file
with narrated retries, verify, and move the finished folder into place.

Layout under the models folder:

    .downloads/<slug>/                  staging; partial files are
        <file>.<etag16>.part            resumed on the next attempt, also
        .rbee-download.json             after a restart of the hive
    hf/<slug>/                          finished models (renamed from staging)

Nothing here touches the catalog: the caller registers the finished folder.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from huggingface_hub.errors import HfHubHTTPError

from rbee.errors import RbeeError
from rbee.modelref import ModelRef
from rbee.paths import confined, private_dir
from rbee.retry import backoff_delays
from rbee_hive.provisioner.events import Reporter
from rbee_hive.provisioner.hub import HubClient, RemoteFile, RemoteModel, TransientError
from rbee_hive.provisioner.settings import DownloadSettings
from rbee_hive.provisioner.transfer import Cancelled, DiskFull, Meter, Verifier, fetch_once, is_disk_full

log = logging.getLogger(__name__)

STAGING_DIR = ".downloads"
MANIFEST = ".rbee-download.json"


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def staging_dir(models_dir: Path, ref: ModelRef) -> Path:
    return confined(models_dir, STAGING_DIR, ref.slug(), what="Staging folder")


def final_dir(models_dir: Path, ref: ModelRef) -> Path:
    return confined(models_dir, ref.provider, ref.slug(), what="Model folder")


def _target(staging: Path, remote: RemoteFile, ref: ModelRef | None) -> Path:
    """Where ``remote`` lands in staging: checked again at write time, links
    followed, so a link inside the staging folder cannot lead a file out."""
    try:
        return confined(staging, remote.path, code="INVALID_HUB_FILE", what="Hub file")
    except RbeeError as err:
        raise RbeeError(
            "INVALID_HUB_FILE",
            f"{ref or 'the model'}: {err.message}; nothing was written",
            {**err.details, "model": str(ref or ""), "file": remote.path},
            ["Remove the staging folder on the node and download again", *err.suggestions],
        ) from None


def _part_path(staging: Path, remote: RemoteFile, ref: ModelRef | None = None) -> Path:
    target = _target(staging, remote, ref)
    return target.with_name(f"{target.name}.{remote.etag[:16]}.part")


class ModelDownload:
    def __init__(
        self,
        hub: HubClient,
        settings: DownloadSettings,
        models_dir: Path,
        report: Reporter,
        cancel: threading.Event,
    ) -> None:
        self.hub = hub
        self.settings = settings
        self.models_dir = Path(models_dir)
        self.report = report
        self.cancel = cancel
        self._ref: ModelRef | None = None

    # --- threads -----------------------------------------------------------
    async def _in_thread(self, fn: Any, *args: Any) -> Any:
        """Run blocking work; on cancellation stop it and wait for it, so no
        thread still writes a partial file the next attempt will use."""
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(None, functools.partial(fn, *args))
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            self.cancel.set()
            with contextlib.suppress(BaseException):
                await future
            raise

    # --- the whole model -------------------------------------------------
    async def run(self, ref: ModelRef) -> tuple[Path, RemoteModel]:
        self._ref = ref
        remote: RemoteModel = await self._retrying("resolve", ref.repo_id or str(ref), lambda: self.hub.resolve(ref))
        self.report.narrate(
            "📋",
            f"{ref}: {len(remote.files)} file(s), {human_bytes(remote.total_bytes)} at commit {remote.commit[:8]}",
        )
        staging = staging_dir(self.models_dir, ref)
        private_dir(staging)
        # Every file's place is checked before the first byte of any of them.
        for remote_file in remote.files:
            _part_path(staging, remote_file, ref)
        manifest = self._load_manifest(staging)
        present = {f.path: self._bytes_present(staging, f, manifest) for f in remote.files}
        self._check_disk(remote, staging, sum(present.values()))
        resumed = sum(present.values())
        if resumed:
            self.report.narrate("♻️", f"Resuming: {human_bytes(resumed)} already on disk")
        meter = Meter(remote.total_bytes, done=resumed)
        started = time.monotonic()
        for remote_file in remote.files:
            await self._fetch_file(remote_file, staging, manifest, meter, present)
        self.report.progress("download", remote.total_bytes, remote.total_bytes, meter.rate(), "complete")
        elapsed = max(time.monotonic() - started, 1e-6)
        fetched = remote.total_bytes - resumed
        self.report.narrate(
            "✅", f"All files verified ({human_bytes(fetched)} fetched in {elapsed:.1f} s, {human_bytes(fetched / elapsed)}/s)"
        )
        final = await self._in_thread(self._move_into_place, staging, final_dir(self.models_dir, ref))
        return final, remote

    # --- retries ---------------------------------------------------------
    async def _retrying(self, what: str, name: str, fn: Any) -> Any:
        """Run blocking ``fn`` with S5.2's retry policy for transient failures."""
        delays = list(backoff_delays(self.settings.backoff_base_ms, self.settings.retries + 1, self.settings.jitter))
        last: TransientError | None = None
        for attempt in range(self.settings.retries + 1):
            try:
                return await self._in_thread(fn)
            except TransientError as exc:
                last = exc
            if attempt == self.settings.retries:
                break
            self._narrate_retry(name, last, attempt, delays[attempt], None)
            await asyncio.sleep(delays[attempt])
        raise self._give_up(name, last)

    def _narrate_retry(self, name: str, exc: TransientError, attempt: int, delay: float, resume_from: int | None) -> None:
        what = {
            "stall": "stalled",
            "connection": "connection lost",
            "server": "server error",
            "checksum": "checksum mismatch, partial file deleted",
            "range": "range mismatch, starting the file over",
        }.get(exc.kind, exc.kind)
        resume = f", resuming from {human_bytes(resume_from)}" if resume_from else ""
        self.report.narrate(
            "🔁",
            f"{name}: {what} ({exc.detail}); retry {attempt + 1}/{self.settings.retries} in {delay * 1000:.0f} ms{resume}",
            level="warn",
        )

    def _give_up(self, name: str, last: TransientError | None) -> RbeeError:
        ref = str(self._ref)
        attempts = self.settings.retries + 1
        detail = last.detail if last else "unknown"
        if last is not None and last.kind == "stall":
            return RbeeError(
                "DOWNLOAD_TIMEOUT",
                f"Download of {ref} timed out: {name} stalled on every attempt (the first and {self.settings.retries} retries: {attempts} attempts, no data for {self.settings.stall_timeout_s:g} s)",
                {"model": ref, "file": name, "attempts": attempts, "last_error": detail},
                ["Check the node's network connection to the hub, then run the download again (it resumes)"],
            )
        return RbeeError(
            "DOWNLOAD_FAILED",
            f"Download of {ref} failed after {self.settings.retries} retries ({attempts} attempts): {name}: {detail}",
            {"model": ref, "file": name, "attempts": attempts, "last_error": detail},
            ["Check the node's network connection and HF_ENDPOINT, then run the download again (it resumes)"],
        )

    # --- one file --------------------------------------------------------
    def _bytes_present(self, staging: Path, remote: RemoteFile, manifest: dict[str, Any]) -> int:
        done = _target(staging, remote, self._ref)
        if manifest.get("files", {}).get(remote.path) == remote.etag and done.is_file():
            return done.stat().st_size
        part = _part_path(staging, remote, self._ref)
        return part.stat().st_size if part.is_file() else 0

    async def _fetch_file(
        self, remote: RemoteFile, staging: Path, manifest: dict[str, Any], meter: Meter, present: dict[str, int]
    ) -> None:
        target = _target(staging, remote, self._ref)
        if manifest.get("files", {}).get(remote.path) == remote.etag and target.is_file():
            return
        part = _part_path(staging, remote, self._ref)
        private_dir(part.parent, tighten=False)
        for stale in part.parent.glob(f"{target.name}.*.part"):
            if stale != part:
                stale.unlink(missing_ok=True)
        base = meter.done - present.get(remote.path, 0)
        headers = self.hub.headers(remote)
        delays = list(backoff_delays(self.settings.backoff_base_ms, self.settings.retries + 1, self.settings.jitter))
        last: TransientError | None = None
        verifier = Verifier(remote)
        for attempt in range(self.settings.retries + 1):
            meter.set_done(base + (part.stat().st_size if part.exists() else 0))
            ticker = asyncio.create_task(self._tick(meter, remote))
            try:
                verifier = await self._in_thread(
                    fetch_once,
                    remote,
                    part,
                    headers,
                    self.settings.stall_timeout_s,
                    self.settings.connect_timeout_s,
                    self.cancel,
                    meter.add,
                    verifier,
                )
                self.report.progress("verify", meter.done, meter.total, meter.rate(), remote.path)
                problem = verifier.check(part.stat().st_size)
                if problem is not None:
                    part.unlink(missing_ok=True)
                    raise TransientError("checksum", f"{problem}")
                os.replace(part, target)
                manifest.setdefault("files", {})[remote.path] = remote.etag
                self._save_manifest(staging, manifest)
                return
            except DiskFull as exc:
                part.unlink(missing_ok=True)
                raise self._disk_full(remote, exc) from exc
            except Cancelled:
                raise asyncio.CancelledError() from None
            except TransientError as exc:
                last = exc
            except RbeeError:
                raise
            except Exception as exc:  # noqa: BLE001 - the hub client's errors, local I/O
                if is_disk_full(exc):
                    part.unlink(missing_ok=True)
                    raise self._disk_full(remote, DiskFull(part, 0, exc)) from exc  # type: ignore[arg-type]
                if isinstance(exc, OSError) and not isinstance(exc, HfHubHTTPError):
                    raise RbeeError("DOWNLOAD_FAILED", f"Cannot write {part}: {exc}", {"path": str(part)}) from exc
                mapped = self.hub.map_error(exc, self._ref)  # type: ignore[arg-type]
                if isinstance(mapped, RbeeError):
                    raise mapped from exc
                last = mapped
            finally:
                ticker.cancel()
            if attempt == self.settings.retries:
                break
            resume_from = part.stat().st_size if part.exists() else 0
            self._narrate_retry(remote.path, last, attempt, delays[attempt], resume_from)
            await asyncio.sleep(delays[attempt])
        raise self._give_up(remote.path, last)

    async def _tick(self, meter: Meter, remote: RemoteFile) -> None:
        while True:
            self.report.progress("download", meter.done, meter.total, meter.rate(), remote.path)
            await asyncio.sleep(self.settings.progress_interval_s)

    # --- disk ------------------------------------------------------------
    def _check_disk(self, remote: RemoteModel, staging: Path, present: int) -> None:
        needed = max(0, remote.total_bytes - present)
        free = shutil.disk_usage(staging).free
        if free < needed:
            short = needed - free
            raise RbeeError(
                "INSUFFICIENT_DISK",
                f"Not enough disk space for {remote.ref}: needs {human_bytes(needed)}, {human_bytes(free)} free in {self.models_dir}; free at least {human_bytes(short)}",
                {
                    "model": str(remote.ref),
                    "required_mb": f"{needed / 1e6:.1f}",
                    "available_mb": f"{free / 1e6:.1f}",
                    "to_free_mb": f"{short / 1e6:.1f}",
                    "path": str(self.models_dir),
                },
                ["Remove models you no longer need: rbee-keeper models rm MODEL --hive HOST:PORT"],
            )

    def _disk_full(self, remote: RemoteFile, exc: DiskFull) -> RbeeError:
        return RbeeError(
            "DISK_FULL",
            f"Disk full during download of {self._ref}: {remote.path} stopped at {human_bytes(exc.written)} of {human_bytes(remote.size or 0)}; the partial file was deleted",
            {"model": str(self._ref), "file": remote.path, "path": str(self.models_dir), "error": str(exc.cause)},
            ["Free disk space on the node (rbee-keeper models rm MODEL --hive HOST:PORT), then download again"],
        )

    # --- manifest and final move --------------------------------------------
    def _load_manifest(self, staging: Path) -> dict[str, Any]:
        try:
            return json.loads((staging / MANIFEST).read_text())
        except (OSError, json.JSONDecodeError):
            return {"files": {}}

    def _save_manifest(self, staging: Path, manifest: dict[str, Any]) -> None:
        tmp = staging / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest))
        os.replace(tmp, staging / MANIFEST)

    def _move_into_place(self, staging: Path, final: Path) -> Path:
        (staging / MANIFEST).unlink(missing_ok=True)
        for leftover in staging.rglob("*.part"):
            leftover.unlink(missing_ok=True)
        private_dir(final.parent, tighten=False)
        if final.exists():
            # A folder without a catalog row: a previous run died before registering.
            shutil.rmtree(final)
        os.replace(staging, final)
        return final
