"""GGUF header metadata (architecture, vocabulary, EOS id, quantization,
parameter count), read with the ``gguf`` package without loading weights."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rbee.errors import RbeeError

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"


def is_gguf_path(path: str | Path) -> bool:
    """GGUF is detected by extension (S5.1); the header check comes on reading."""
    return str(path).lower().endswith(".gguf")


@dataclass
class GgufInfo:
    architecture: str
    vocab_size: int | None
    eos_token_id: int | None
    quantization: str | None
    parameter_count: int | None
    context_length: int | None
    name: str | None
    tensor_count: int

    def as_metadata(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def _field(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return None
    try:
        return field.contents()
    except Exception:  # a malformed value is treated as absent
        return None


def _array_len(reader: Any, key: str) -> int | None:
    field = reader.fields.get(key)
    return len(field.data) if field is not None else None


def _quantization(reader: Any, gguf: Any) -> str | None:
    file_type = _field(reader, "general.file_type")
    if file_type is not None:
        try:
            name = gguf.LlamaFileType(int(file_type)).name
            return name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except ValueError:
            pass
    # No file type: name the tensor type that holds most of the weights.
    weights = Counter()
    for tensor in reader.tensors:
        weights[tensor.tensor_type.name] += int(tensor.n_elements)
    return weights.most_common(1)[0][0] if weights else None


def read_gguf_metadata(path: str | Path) -> GgufInfo:
    path = Path(path)
    try:
        with path.open("rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise RbeeError("NOT_FOUND", f"Cannot read GGUF file {path}: {exc.strerror or exc}", {"path": str(path)}) from exc
    if magic != GGUF_MAGIC:
        raise RbeeError(
            "INVALID_MODEL_FORMAT",
            f"Not a GGUF file (bad header): {path}",
            {"path": str(path), "magic": magic.hex()},
            ["Check that the download completed and the file really is GGUF"],
        )
    try:
        import gguf

        reader = gguf.GGUFReader(str(path), "r")
    except Exception as exc:  # the reader raises ValueError/struct errors on truncation
        raise RbeeError(
            "INVALID_MODEL_FORMAT",
            f"Cannot parse the GGUF header of {path}: {exc}",
            {"path": str(path)},
            ["The file may be truncated or corrupt; download it again"],
        ) from exc
    arch = _field(reader, "general.architecture") or "unknown"
    vocab = _field(reader, f"{arch}.vocab_size")
    if vocab is None:
        vocab = _array_len(reader, "tokenizer.ggml.tokens")
    params = _field(reader, "general.parameter_count")
    if params is None and reader.tensors:
        params = sum(int(t.n_elements) for t in reader.tensors)
    info = GgufInfo(
        architecture=str(arch),
        vocab_size=int(vocab) if vocab is not None else None,
        eos_token_id=_int(_field(reader, "tokenizer.ggml.eos_token_id")),
        quantization=_quantization(reader, gguf),
        parameter_count=int(params) if params is not None else None,
        context_length=_int(_field(reader, f"{arch}.context_length")),
        name=_field(reader, "general.name"),
        tensor_count=len(reader.tensors),
    )
    log.debug("gguf %s: %s", path, info)
    return info


def _int(value: Any) -> int | None:
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None
