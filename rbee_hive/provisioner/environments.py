"""Worker environments (S5.3): one virtual environment per backend under
``$RBEE_HOME/workers/<id>/`` whose ``llm-worker-rbee`` runs the worker.

Installing an engine costs minutes and gigabytes, so it is shared when it
can be: if an engine satisfying the project's requirement for the backend is
already installed on the node (normally in the hive's own environment, put
there by `make setup`), the new environment links that site-packages folder
through a ``.pth`` file instead of installing a second copy. The project
itself is then installed from its source (a path, by default the node's
checkout) without dependencies, which the linked folder provides. Only when
no matching engine exists is it installed into the environment.

Re-provisioning a recorded environment that still verifies does nothing;
``force`` rebuilds the environment (the shared engine is linked again, an
engine installed into the environment is installed again).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from rbee.errors import RbeeError
from rbee.paths import confined, private_dir
from rbee_hive.catalog.workers import WorkerCatalog, WorkerEnvRecord
from rbee_hive.workers.environment import without_secrets
from rbee_hive.provisioner.engines import (
    CPU_ENGINE_EXTRAS_TO_DROP,
    EngineRequirement,
    InstalledEngine,
    check_backend_available,
    default_cuda_probe,
    engine_requirement,
    find_engine,
    hive_site_packages,
    validate_backend,
)

log = logging.getLogger(__name__)

WORKER_TYPE = "llm-worker-rbee"
ENGINE_LINK = "_rbee_shared_engine.pth"
# What a copy of the source leaves out: environments, VCS data, build output.
_SOURCE_IGNORE = shutil.ignore_patterns(
    ".git", ".venv", "venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "node_modules"
)
OUTPUT_LINES = 25
PROJECT_INSTALL_TIMEOUT_S = 600
ENGINE_INSTALL_TIMEOUT_S = 3600
VERIFY_TIMEOUT_S = 60

Narrate = Callable[..., object]


def env_id(backend: str) -> str:
    return f"{WORKER_TYPE}-{backend}"


def default_source() -> Path | None:
    """The checkout this hive runs from (an editable install), if any."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").is_file() else None


def git_commit(source: Path) -> str:
    if not (source / ".git").exists():
        return ""
    try:
        out = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def _site_packages(env: Path) -> Path:
    return env / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"


class WorkerProvisioner:
    """``source`` is the default project source (the hive's own installation
    unless given); ``extra_sources`` the others the operator allows. A request
    may only pick one of these: building an environment runs the source's
    build backend, so a client-chosen folder would run a client's code."""

    def __init__(
        self,
        catalog: WorkerCatalog,
        home: Path,
        source: Path | None = None,
        engine_sites: list[Path] | None = None,
        python: str = sys.executable,
        cuda_probe: Callable[[], tuple[bool, str]] = default_cuda_probe,
        extra_sources: list[Path] | None = None,
    ) -> None:
        self.catalog = catalog
        self.workers_dir = Path(home) / "workers"
        self.source = Path(source) if source else default_source()
        self.sources = [p for p in (self.source, *(Path(x).expanduser() for x in extra_sources or [])) if p is not None]
        self.engine_sites = engine_sites if engine_sites is not None else [hive_site_packages()]
        self.python = python
        self.cuda_probe = cuda_probe
        self._locks: dict[str, asyncio.Lock] = {}

    def list(self, backend: str | None = None) -> list[WorkerEnvRecord]:
        return self.catalog.list(validate_backend(backend) if backend else None)

    async def provision(
        self, backend: str, narrate: Narrate, source: Path | str | None = None, force: bool = False
    ) -> WorkerEnvRecord:
        backend = validate_backend(backend)
        chosen = self.allowed_source(source) if source else None
        check_backend_available(backend, self.cuda_probe)
        async with self._locks.setdefault(backend, asyncio.Lock()):
            return await self._provision(backend, narrate, chosen, force)

    async def _provision(self, backend: str, narrate: Narrate, source: Path | None, force: bool) -> WorkerEnvRecord:
        wid = env_id(backend)
        existing = await asyncio.to_thread(self.catalog.get, wid)
        if existing is not None and not force:
            try:
                await self.verify(existing.binary)
                narrate("♻️", f"Worker environment {wid} is installed and works ({existing.path}); nothing to do")
                return existing
            except RbeeError as err:
                narrate("🔧", f"Worker environment {wid} is recorded but broken ({err.message}); repairing it", "warn")
        src = source or self.source
        if src is None:
            raise RbeeError(
                "WORKER_BUILD_FAILED",
                f"Worker build failed: no project source to install {WORKER_TYPE} for {backend} from",
                {"worker_type": WORKER_TYPE, "backend": backend},
                ["Configure one on the hive: worker_sources (RBEE_HIVE_WORKER_SOURCES), e.g. the rbee checkout on this node"],
            )
        src = src.expanduser().resolve()
        if not src.is_dir():
            raise RbeeError(
                "NOT_FOUND",
                f"Project source not found: {src}",
                {"source": str(src), "backend": backend},
                ["Point the source at the rbee checkout on this node (`rbee-keeper setup install --node NODE` clones it)"],
            )
        private_dir(self.workers_dir)
        env = confined(self.workers_dir, wid, what="Worker environment")
        started = time.monotonic()
        narrate("🔨", f"Provisioning {wid} in {env} from {src}{' (forced)' if force else ''}")
        if force and env.exists():
            narrate("🧹", f"Removing the old environment {env}")
            await asyncio.to_thread(shutil.rmtree, env)
        python = await self._ensure_venv(env, backend, narrate)
        requirement = engine_requirement(backend, src)
        engine, shared = await self._ensure_engine(env, python, requirement, narrate)
        await self._install_project(env, python, src, backend, shared, narrate)
        version = await self.verify(env / "bin" / WORKER_TYPE)
        commit = git_commit(src)
        record = WorkerEnvRecord(
            id=wid,
            worker_type=WORKER_TYPE,
            backend=backend,
            path=str(env),
            version=_project_version(version),
            engine=f"{engine.name} {engine.version}" + (" (shared)" if shared else ""),
            source=f"{src}" + (f"@{commit}" if commit else ""),
            features=[backend],
            details={"engine_site": str(engine.site), "verify_output": version},
            installed_at_unix=int(time.time()),
        )
        record = await asyncio.to_thread(self.catalog.put, record)
        narrate("✅", f"{wid} ready in {time.monotonic() - started:.0f} s: {version}")
        return record

    def allowed_source(self, source: Path | str) -> Path:
        """The configured source ``source`` names (compared resolved, links
        followed), else PATH_NOT_ALLOWED; nothing about the path is looked at
        beyond resolving it."""
        text = str(source)
        wanted = os.path.realpath(os.path.expanduser(text)) if text and "\x00" not in text else None
        for allowed in self.sources:
            if wanted is not None and os.path.realpath(allowed) == wanted:
                return allowed
        shown = ", ".join(str(p) for p in self.sources) or "none"
        raise RbeeError(
            "PATH_NOT_ALLOWED",
            f"Worker source {text!r} is not one this hive builds worker environments from (allowed: {shown})",
            {"field": "source", "path": text, "allowed": shown},
            [
                "Leave the source out to build from the hive's own installation",
                "To build from another folder, the node's operator adds it to worker_sources (RBEE_HIVE_WORKER_SOURCES)",
            ],
        )

    # --- steps -------------------------------------------------------------
    async def _ensure_venv(self, env: Path, backend: str, narrate: Narrate) -> Path:
        python = env / "bin" / "python"
        if python.exists():
            narrate("♻️", f"Reusing the virtual environment {env}")
            return python
        narrate("🐍", f"Creating a virtual environment in {env}")
        env.parent.mkdir(parents=True, exist_ok=True)
        # Without pip: the hive's pip installs into it (pip --python), which
        # saves bootstrapping a second pip.
        await self._run([self.python, "-m", "venv", "--without-pip", str(env)], backend, "create the environment", 120)
        return python

    async def _ensure_engine(
        self, env: Path, python: Path, req: EngineRequirement, narrate: Narrate
    ) -> tuple[InstalledEngine, bool]:
        own_site = _site_packages(env)
        own = find_engine(req, [own_site])
        if own is not None:
            narrate("♻️", f"Engine {own.name} {own.version} already installed in the environment")
            return own, False
        shared = find_engine(req, [s for s in self.engine_sites if s.resolve() != own_site.resolve()])
        if shared is not None:
            own_site.mkdir(parents=True, exist_ok=True)
            (own_site / ENGINE_LINK).write_text(f"{shared.site}\n")
            narrate(
                "🔗",
                f"Sharing the installed engine {shared.name} {shared.version} from {shared.site} "
                f"(satisfies {req}; no second install)",
            )
            return shared, True
        (own_site / ENGINE_LINK).unlink(missing_ok=True)
        narrate("📦", f"Installing the engine {req} into {env} (several minutes, several GB)")
        await self._pip(python, ["install", str(req.requirement)], req.backend, "install the engine", ENGINE_INSTALL_TIMEOUT_S)
        if req.backend == "cpu":
            await self._pip(
                python, ["uninstall", "-y", *CPU_ENGINE_EXTRAS_TO_DROP], req.backend, "drop CUDA-only extras", 300, check=False
            )
        installed = find_engine(req, [own_site])
        if installed is None:
            raise RbeeError(
                "WORKER_BUILD_FAILED",
                f"Worker build failed: {req} is not importable after its install",
                {"worker_type": WORKER_TYPE, "backend": req.backend, "requirement": str(req)},
            )
        return installed, False

    async def _install_project(
        self, env: Path, python: Path, src: Path, backend: str, shared: bool, narrate: Narrate
    ) -> None:
        narrate("📦", f"Installing rbee from {src} into {env}")
        with tempfile.TemporaryDirectory(prefix="rbee-src-") as tmp:
            # Build from a copy: an in-tree build would leave build/ output in
            # the checkout and could pick up stale files from an older build.
            copy = Path(tmp) / "src"
            try:
                await asyncio.to_thread(shutil.copytree, src, copy, ignore=_SOURCE_IGNORE, symlinks=True)
            except (OSError, shutil.Error) as exc:
                raise _build_failed(backend, f"cannot copy the source {src}: {exc}", [str(exc)], src) from exc
            args = ["install", "--no-input", "--ignore-installed", str(copy)]
            if shared:
                # Dependencies come from the shared site-packages; building with
                # its setuptools needs no download either.
                args[1:1] = ["--no-deps", "--no-build-isolation"]
            await self._pip(python, args, backend, f"install rbee from {src}", PROJECT_INSTALL_TIMEOUT_S, source=src)

    async def verify(self, binary: Path) -> str:
        """Run ``llm-worker-rbee --version``; its output, or BINARY_VERIFICATION_FAILED."""
        binary = Path(binary)
        reason = ""
        lines: list[str] = []
        if not binary.is_file():
            reason = "file missing"
        elif not os.access(binary, os.X_OK):
            reason = "not executable"
        else:
            try:
                proc = await asyncio.create_subprocess_exec(
                    str(binary), "--version", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
                )
                try:
                    out, _ = await asyncio.wait_for(proc.communicate(), VERIFY_TIMEOUT_S)
                except asyncio.TimeoutError:
                    proc.kill()
                    await proc.wait()
                    out, reason = b"", f"no answer within {VERIFY_TIMEOUT_S} s"
                lines = out.decode(errors="replace").strip().splitlines()
                if not reason and proc.returncode != 0:
                    reason = f"exit code {proc.returncode}"
                elif not reason and not (lines and lines[0].startswith(WORKER_TYPE)):
                    reason = "unexpected output"
            except OSError as exc:
                reason = exc.strerror or str(exc)
        if reason:
            raise RbeeError(
                "BINARY_VERIFICATION_FAILED",
                f"Binary verification failed: {binary} ({reason})",
                {"path": str(binary), "reason": reason, "output": "\n".join(lines[-OUTPUT_LINES:])},
                ["Reinstall the worker environment (provision with force)"],
            )
        return lines[0]

    # --- processes -----------------------------------------------------------
    async def _pip(
        self, python: Path, args: list[str], backend: str, what: str, timeout: float, check: bool = True,
        source: Path | None = None,
    ) -> None:
        cmd = [self.python, "-m", "pip", "--python", str(python), "--disable-pip-version-check", *args]
        await self._run(cmd, backend, what, timeout, check, source)

    async def _run(
        self, cmd: list[str], backend: str, what: str, timeout: float, check: bool = True, source: Path | None = None
    ) -> None:
        log.info("running %s", " ".join(cmd))
        tail: deque[str] = deque(maxlen=200)
        # pip needs its own settings (index, proxies, certificates) but not the
        # hive's keys or tokens: a source's build backend runs in this process.
        env = without_secrets(os.environ)
        env.pop("PYTHONPATH", None)  # the new environment must not see the hive's path tweaks
        if sys.platform == "linux":
            # Through the workers' launcher: pip (and a build backend it runs)
            # gets SIGTERM should the hive die, instead of writing on into an
            # environment the next hive rebuilds.
            cmd = [sys.executable, "-m", "rbee_hive.workers.launch", *cmd]
        try:
            proc = await asyncio.create_subprocess_exec(
                *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env
            )
        except OSError as exc:
            raise _build_failed(backend, f"cannot {what}: {exc}", [str(exc)], source) from exc

        async def read() -> None:
            assert proc.stdout is not None
            async for raw in proc.stdout:
                line = raw.decode(errors="replace").rstrip()
                if line:
                    tail.append(line)
                    log.debug("%s", line)

        try:
            await asyncio.wait_for(asyncio.gather(read(), proc.wait()), timeout)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            raise _build_failed(backend, f"cannot {what}: no result within {timeout:.0f} s", list(tail), source) from None
        except asyncio.CancelledError:
            proc.kill()
            await proc.wait()
            raise
        if check and proc.returncode != 0:
            raise _build_failed(backend, f"cannot {what} (exit {proc.returncode})", list(tail), source)


def _error_lines(lines: list[str]) -> list[str]:
    """The lines that explain a pip failure: from the first error on, else the tail."""
    for i, line in enumerate(lines):
        if line.lstrip().startswith(("ERROR", "error:", "×", "Traceback")):
            return lines[i : i + OUTPUT_LINES]
    return lines[-OUTPUT_LINES:]


def _build_failed(backend: str, what: str, lines: list[str], source: Path | None) -> RbeeError:
    shown = _error_lines(lines)
    details = {"worker_type": WORKER_TYPE, "backend": backend, "output": "\n".join(shown)}
    if source is not None:
        details["source"] = str(source)
    return RbeeError(
        "WORKER_BUILD_FAILED",
        f"Worker build failed: {WORKER_TYPE} for {backend}: {what}",
        details,
        ["Check that the source is an rbee checkout (pyproject.toml) and that pip can reach its package index"],
    )


def _project_version(verify_line: str) -> str:
    # "llm-worker-rbee 0.1.0 (vllm 0.32.0)" → "0.1.0"
    parts = verify_line.split()
    return parts[1] if len(parts) > 1 else verify_line
