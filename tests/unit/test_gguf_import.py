"""The GGUF importer's refusals, and the default model folder it produced."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rbee.errors import RbeeError
from rbee_hive.gguf_import import MARKER, import_gguf, is_imported


def test_missing_file_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(RbeeError) as info:
        import_gguf(tmp_path / "absent.gguf", tmp_path / "out")
    assert info.value.code == "NOT_FOUND"
    assert "absent.gguf" in info.value.message


def test_wrong_extension_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\0" * 16)
    with pytest.raises(RbeeError) as info:
        import_gguf(path, tmp_path / "out")
    assert info.value.code == "INVALID_ARGUMENT"


def test_corrupt_gguf_fails_cleanly_and_leaves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 64)
    out = tmp_path / "models" / "broken"
    with pytest.raises(RbeeError) as info:
        import_gguf(path, out)
    assert info.value.code == "MODEL_LOAD_FAILED"
    assert not out.exists()
    # no staging folder left behind either
    assert list((tmp_path / "models").iterdir()) == []


def test_default_model_folder_is_complete(default_model: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    assert is_imported(default_model)
    marker = json.loads((default_model / MARKER).read_text())
    assert marker["architecture"] == "llama"
    config = AutoConfig.from_pretrained(default_model)
    assert config.vocab_size == 49152
    assert "quantization_config" not in config.to_dict()
    tokenizer = AutoTokenizer.from_pretrained(default_model)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert "<|im_start|>assistant" in text
    assert tokenizer.eos_token_id == 2
