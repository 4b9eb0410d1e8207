"""GGUF header metadata, read with the gguf package."""

from __future__ import annotations

import numpy as np
import pytest

from rbee.errors import RbeeError
from rbee_hive.gguf_meta import is_gguf_path, read_gguf_metadata
from tests.fixtures.models import write_gguf


def test_detection_by_extension():
    assert is_gguf_path("a/b/Model.Q4_K_M.GGUF") and is_gguf_path("x.gguf")
    assert not is_gguf_path("model.safetensors") and not is_gguf_path("gguf")


def test_header_fields(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", vocab=77, eos=5, file_type=3)
    info = read_gguf_metadata(path)
    assert info.architecture == "llama"
    assert info.vocab_size == 77
    assert info.eos_token_id == 5
    assert info.quantization == "Q4_1"
    assert info.parameter_count == 77 * 8
    assert info.context_length == 256
    assert info.name == "tiny test model"
    assert info.as_metadata()["quantization"] == "Q4_1"


def test_without_file_type_the_dominant_tensor_type_names_the_quantization(tmp_path):
    tensors = {
        "token_embd.weight": np.zeros((64, 32), dtype=np.float32),
        "output_norm.weight": np.zeros((8,), dtype=np.float16),
    }
    info = read_gguf_metadata(write_gguf(tmp_path / "m.gguf", file_type=None, tensors=tensors, name=None))
    assert info.quantization == "F32"
    assert info.name is None
    assert info.parameter_count == 64 * 32 + 8


def test_vocab_size_falls_back_to_the_token_list(tmp_path):
    import gguf

    path = tmp_path / "m.gguf"
    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_token_list(["a", "b", "c"])
    writer.add_tensor("t", np.zeros((2,), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    info = read_gguf_metadata(path)
    assert (info.architecture, info.vocab_size, info.eos_token_id) == ("qwen2", 3, None)


def test_not_gguf_and_truncated_files_are_clear_errors(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(RbeeError) as exc:
        read_gguf_metadata(bad)
    assert exc.value.code == "INVALID_MODEL_FORMAT" and "bad header" in exc.value.message
    good = write_gguf(tmp_path / "good.gguf")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good.read_bytes()[:40])
    with pytest.raises(RbeeError) as exc:
        read_gguf_metadata(cut)
    assert exc.value.code == "INVALID_MODEL_FORMAT"
    with pytest.raises(RbeeError) as exc:
        read_gguf_metadata(tmp_path / "missing.gguf")
    assert exc.value.code == "NOT_FOUND"


def test_the_real_smollm2_gguf(smollm2_gguf):
    info = read_gguf_metadata(smollm2_gguf)
    assert info.architecture == "llama"
    assert info.vocab_size == 49152
    assert info.eos_token_id == 2
    assert info.quantization == "Q4_1"
    assert 134_000_000 < info.parameter_count < 135_000_000
