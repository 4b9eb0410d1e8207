"""Import a GGUF file into a folder vLLM loads (safetensors + tokenizer + chat template).

The engine here cannot load quantized GGUF weights for every architecture, so
the file is dequantized with transformers and saved as a normal model folder.
The folder is written next to its destination and renamed into place, so an
interrupted import never leaves a half-written model behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from rbee.errors import RbeeError

log = logging.getLogger(__name__)

MARKER = "rbee-import.json"
Narrate = Callable[[str, str], object]


def _quiet(emoji: str, message: str) -> None:
    log.info("%s %s", emoji, message)


def sha256_of(path: Path, chunk: int = 4 * 1024 * 1024) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def is_imported(folder: Path) -> bool:
    """True when ``folder`` holds a complete import (the marker is written last)."""
    return (folder / MARKER).is_file() and (folder / "config.json").is_file()


def import_gguf(
    gguf_path: Path,
    out_dir: Path,
    narrate: Narrate = _quiet,
    dtype: str = "bfloat16",
) -> Path:
    """Dequantize ``gguf_path`` into ``out_dir`` and return ``out_dir``."""
    gguf_path = Path(gguf_path).resolve()
    out_dir = Path(out_dir)
    if not gguf_path.is_file():
        raise RbeeError("NOT_FOUND", f"GGUF file not found: {gguf_path}", {"path": str(gguf_path)})
    if gguf_path.suffix.lower() != ".gguf":
        raise RbeeError(
            "INVALID_ARGUMENT",
            f"Not a GGUF file (expected a .gguf extension): {gguf_path}",
            {"path": str(gguf_path)},
        )
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise RbeeError(
            "INTERNAL",
            f"GGUF import needs transformers, gguf and accelerate: {exc}",
            suggestions=["Install the project with its 'gguf' extra (make setup does)"],
        ) from exc

    started = time.monotonic()
    torch_dtype = getattr(torch, dtype)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.importing-", dir=out_dir.parent))
    try:
        narrate("📦", f"Reading {gguf_path.name} ({gguf_path.stat().st_size / 1e6:.0f} MB) and dequantizing")
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        # Dequantizing kernels compute in float32; cast once when saving.
        quantized = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
        )
        # save_pretrained refuses a model whose config still names the GGUF
        # quantization, so rebuild a plain model from a clean config.
        config = quantized.config
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        plain = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
        missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False)
        # Tied embeddings legitimately leave lm_head out of the state dict.
        real_missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
        if real_missing or unexpected:
            raise RbeeError(
                "INTERNAL",
                f"GGUF import: weights do not match the architecture (missing {real_missing[:5]}, unexpected {unexpected[:5]})",
                {"path": str(gguf_path)},
            )
        del quantized
        narrate("💾", f"Writing safetensors, tokenizer and chat template to {out_dir}")
        plain.save_pretrained(str(staging), safe_serialization=True)
        tokenizer.save_pretrained(str(staging))
        if not getattr(tokenizer, "chat_template", None):
            log.warning("%s carries no chat template", gguf_path.name)
        marker = {
            "source": str(gguf_path),
            "source_sha256": sha256_of(gguf_path),
            "dtype": dtype,
            "architecture": config.model_type,
            "imported_at_unix": int(time.time()),
        }
        (staging / MARKER).write_text(json.dumps(marker, indent=2))
        staging.chmod(0o700)  # mkdtemp's mode, said outright: models stay the hive user's
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    except RbeeError:
        raise
    except OSError as exc:
        raise RbeeError(
            "DISK_FULL" if getattr(exc, "errno", None) == 28 else "INTERNAL",
            f"GGUF import failed writing {out_dir}: {exc}",
            {"path": str(out_dir)},
        ) from exc
    except Exception as exc:  # transformers raises many kinds for unreadable files
        raise RbeeError(
            "MODEL_LOAD_FAILED",
            f"Cannot import {gguf_path.name}: {type(exc).__name__}: {exc}",
            {"path": str(gguf_path)},
            ["Check that the file is a complete GGUF of a supported architecture"],
        ) from exc
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    narrate("✅", f"Imported {gguf_path.name} in {time.monotonic() - started:.1f}s")
    return out_dir
