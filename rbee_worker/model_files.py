"""What the worker reads from a model's folder itself: the tokenizer files'
digest (GetModelInfo's tokenizer_sha256) and the context length config.json
declares, capped by --max-model-len."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

# Files that make up a Hugging Face tokenizer (whichever the model has).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt",
    "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)


def tokenizer_sha256(model_path: str) -> str:
    h = hashlib.sha256()
    for name in TOKENIZER_FILES:
        path = Path(model_path) / name
        if path.is_file():
            h.update(name.encode() + b"\0")
            h.update(path.read_bytes())
    return h.hexdigest()


# Keys under which Hugging Face configs give the context length.
_LEN_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "max_sequence_length")


def model_context_len(model_path: str) -> int | None:
    """The context length the model's config.json declares (None if unknown)."""
    try:
        cfg = json.loads((Path(model_path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    for source in (cfg, cfg.get("text_config") or {}):
        for key in _LEN_KEYS:
            value = source.get(key)
            if isinstance(value, int) and value > 0:
                return value
    return None


def bounded_max_model_len(model_path: str, cap: int | None) -> int | None:
    """min(model's context, cap); None lets vLLM derive it."""
    declared = model_context_len(model_path)
    if cap is None:
        return declared
    return min(declared, cap) if declared else cap
