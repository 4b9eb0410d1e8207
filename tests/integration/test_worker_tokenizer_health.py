"""A worker answers health while a long prompt goes through the real
tokenizer (the default model's): the real worker program, as a process, with
an engine that only tokenizes (bench/limits.py; vLLM adds nothing to the way a
request takes to the engine). A 2 MB prompt, which a 64k context accepts, takes
seconds to tokenize; health probes sent one after another all through it are
answered before the request's own answer. Tokenizing on the event loop, the
first probe waited for the whole prompt and the request answered with it."""

from __future__ import annotations

import asyncio

from bench.limits import MB, generate_once, probe_health_during, start_worker


async def test_health_answers_all_through_a_long_tokenization(tmp_path, default_model):
    worker = start_worker(tmp_path, default_model, "--max-model-len", "65536")
    try:
        await asyncio.to_thread(worker.wait_health)
        text = "The quick brown fox jumps over the lazy dog. "
        prompt = (text * (2 * MB // len(text)))[: 2 * MB]
        result = await asyncio.to_thread(probe_health_during, worker.address, lambda: generate_once(worker.address, prompt))
    finally:
        worker.stop()
    # Tokenized in full, then refused for the context (450k tokens in 65,536).
    assert result["answer"].startswith("INVALID_ARGUMENT") and "prompt tokens" in result["answer"], result["answer"]
    # A probe is sent only once the one before it was answered and the
    # request was still in flight: three means two answered during it.
    assert len(result["latencies"]) >= 3, result
