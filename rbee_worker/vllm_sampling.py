"""Between rbee's requests and vLLM's: a request's SamplingOptions as
SamplingParams arguments, and vLLM's finish reasons and logprobs as rbee's.
Plain data both ways (vLLM is not imported), so the unit tests check the
mapping without an engine."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from rbee_worker.engine import ABORT, PositionLogprobs, SamplingOptions, TokenLogprob

# vLLM's finish reasons -> rbee's.
FINISH_REASONS = {"stop": "stop", "length": "length", "abort": ABORT}
# SamplingOptions fields that pass to SamplingParams under the same name
# when set; unset ones take the model's defaults (generation config).
_SAMPLING_FIELDS = (
    "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty", "seed",
)
# The constraint kinds -> StructuredOutputsParams arguments.
_CONSTRAINT_ARGS = {"json_schema": "json", "regex": "regex", "grammar": "grammar", "choice": "choice"}


def sampling_kwargs(options: SamplingOptions, defaults: Mapping[str, Any]) -> dict[str, Any]:
    """SamplingParams keyword arguments for one request: the model's defaults,
    then every field the request set. The constraint comes back as
    ("structured_outputs", {argument: value}) for the caller to wrap."""
    kw: dict[str, Any] = {k: v for k, v in defaults.items() if k != "max_tokens"}
    for name in _SAMPLING_FIELDS:
        value = getattr(options, name)
        if value is not None:
            kw[name] = value
    kw.update(
        n=options.n,
        max_tokens=options.max_tokens,
        min_tokens=options.min_tokens,
        stop=list(options.stop) or None,
        stop_token_ids=list(options.stop_token_ids) or None,
        include_stop_str_in_output=options.include_stop_str_in_output,
        skip_special_tokens=options.skip_special_tokens,
        ignore_eos=options.ignore_eos,
        logit_bias=dict(options.logit_bias) or None,
        logprobs=options.logprobs,
        prompt_logprobs=options.prompt_logprobs,
    )
    c = options.constraint
    if c is not None:
        value = json.loads(c.value) if c.kind == "json_schema" else list(c.value) if c.kind == "choice" else c.value
        kw["structured_outputs"] = {_CONSTRAINT_ARGS[c.kind]: value}
    return kw


def position_logprobs(entries: Mapping[int, Any] | None, chosen: int, k: int) -> PositionLogprobs | None:
    """vLLM's {token id: Logprob} at one position -> the chosen token and the
    top k, highest logprob first."""
    if not entries:
        return None

    def entry(token_id: int, lp: Any) -> TokenLogprob:
        return TokenLogprob(token_id, float(lp.logprob), int(lp.rank or 0), lp.decoded_token or "")

    top = sorted(
        (entry(t, lp) for t, lp in entries.items() if lp.rank is not None and lp.rank <= k),
        key=lambda e: (-e.logprob, e.rank),
    )[:k]
    picked = entries.get(chosen)
    return PositionLogprobs(entry(chosen, picked) if picked is not None else None, tuple(top))
