"""What backends this node has: cpu always, cuda through NVML, metal on Apple silicon."""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass

from rbee.backends import BACKENDS

from rbee_hive.resources import ResourceSource

BACKEND_NAMES = BACKENDS


@dataclass(frozen=True)
class BackendInfo:
    name: str
    available: bool
    device_count: int
    detail: str = ""

    @property
    def devices(self) -> list[int]:
        return list(range(self.device_count)) if self.available else []


@dataclass(frozen=True)
class Detection:
    backends: tuple[BackendInfo, ...]

    def get(self, name: str) -> BackendInfo | None:
        return next((b for b in self.backends if b.name == name), None)

    @property
    def available(self) -> list[BackendInfo]:
        return [b for b in self.backends if b.available]

    def registry_form(self) -> dict[str, object]:
        """What the queen's node registry stores (S3): backends and devices per backend."""
        return {
            "backends": [b.name for b in self.available],
            "devices": {b.name: b.device_count for b in self.available},
        }

    def registry_lines(self) -> list[str]:
        form = self.registry_form()
        return [f"backends: {json.dumps(form['backends'])}", f"devices: {json.dumps(form['devices'])}"]

    def human_lines(self) -> list[str]:
        lines = []
        for b in self.backends:
            if b.available:
                unit = "device" if b.device_count == 1 else "devices"
                lines.append(f"✅ {b.name}: {b.device_count} {unit} {b.devices}" + (f" — {b.detail}" if b.detail else ""))
            else:
                lines.append(f"❌ {b.name}: not available" + (f" — {b.detail}" if b.detail else ""))
        return lines


def _metal(system: str, machine: str) -> BackendInfo:
    if system == "Darwin" and machine in ("arm64", "aarch64"):
        return BackendInfo("metal", True, 1, "Apple silicon GPU")
    if system == "Darwin":
        return BackendInfo("metal", False, 0, "Metal needs Apple silicon")
    return BackendInfo("metal", False, 0, f"Metal is macOS only (this node runs {system})")


def detect(source: ResourceSource, system: str | None = None, machine: str | None = None) -> Detection:
    system = system or platform.system()
    machine = machine or platform.machine()
    cpu = BackendInfo("cpu", True, 1, f"{platform.processor() or machine}")
    probe = source.cuda()
    cuda = BackendInfo("cuda", probe.available, len(probe.gpus) if probe.available else 0, probe.detail)
    return Detection((cpu, cuda, _metal(system, machine)))
