"""The worker's stream (TokenDelta ... GenerateFinal) as OpenAI's objects:
``chat.completion``, ``chat.completion.chunk``, ``text_completion``,
``usage``, ``finish_reason``, and logprobs in the chat and the completions
shapes."""

from __future__ import annotations

import math
import time
from typing import Any

from rbee.v1 import inference_pb2

FINISH = {
    inference_pb2.FINISH_REASON_STOP: "stop",
    inference_pb2.FINISH_REASON_LENGTH: "length",
    inference_pb2.FINISH_REASON_ABORT: "abort",
}


def _lp(value: float) -> float:
    # JSON has no -inf; OpenAI's servers send -9999.0 for it.
    return value if math.isfinite(value) else -9999.0


def chat_logprobs(positions) -> dict[str, Any]:
    content = []
    for pos in positions:
        c = pos.chosen
        content.append({
            "token": c.token, "logprob": _lp(c.logprob), "bytes": list(c.token.encode()),
            "top_logprobs": [{"token": t.token, "logprob": _lp(t.logprob), "bytes": list(t.token.encode())} for t in pos.top],
        })  # fmt: skip
    return {"content": content}


def completion_logprobs(positions, offset: int) -> tuple[dict[str, Any], int]:
    """The completions shape; ``offset`` is the text offset of the first token. Returns it and the next offset."""
    out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for pos in positions:
        c = pos.chosen
        out["tokens"].append(c.token)
        out["token_logprobs"].append(_lp(c.logprob))
        out["top_logprobs"].append({t.token: _lp(t.logprob) for t in pos.top} or {c.token: _lp(c.logprob)})
        out["text_offset"].append(offset)
        offset += len(c.token)
    return out, offset


def usage(prompt: int, completion: int, cached: int = 0) -> dict[str, Any]:
    out: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    if cached:
        out["prompt_tokens_details"] = {"cached_tokens": cached}
    return out


def ends(final: inference_pb2.GenerateFinal, n: int) -> dict[int, tuple[str, Any]]:
    """Completion index → (finish_reason, stop_reason)."""
    out: dict[int, tuple[str, Any]] = {}
    for end in final.completions:
        matched = end.stop_string if end.HasField("stop_string") else (end.stop_token_id if end.HasField("stop_token_id") else None)
        out[end.completion] = (FINISH.get(end.reason, "stop"), matched)
    if 0 not in out:
        matched = final.stop_string if final.HasField("stop_string") else (final.stop_token_id if final.HasField("stop_token_id") else None)
        out[0] = (FINISH.get(final.reason, "stop"), matched)
    for i in range(n):
        out.setdefault(i, out[0])
    return out


class Collected:
    """A whole (non-streaming) answer: every completion's text and logprobs."""

    def __init__(self, n: int, completions_shape: bool) -> None:
        self.n = n
        self.texts = [[] for _ in range(n)]
        self.positions: list[list[Any]] = [[] for _ in range(n)]
        self.final: inference_pb2.GenerateFinal | None = None
        self.completions_shape = completions_shape
        self.want_logprobs = False

    def add(self, delta: inference_pb2.TokenDelta) -> None:
        i = delta.completion if delta.completion < self.n else 0
        self.texts[i].append(delta.text)
        if delta.logprobs:
            self.want_logprobs = True
            self.positions[i].extend(delta.logprobs)

    def chat(self, rid: str, model: str, created: int) -> dict[str, Any]:
        assert self.final is not None
        finals = ends(self.final, self.n)
        choices = []
        for i in range(self.n):
            reason, matched = finals[i]
            choices.append({
                "index": i, "message": {"role": "assistant", "content": "".join(self.texts[i]), "tool_calls": []},
                "logprobs": chat_logprobs(self.positions[i]) if self.want_logprobs else None,
                "finish_reason": reason, "stop_reason": matched,
            })  # fmt: skip
        return {"id": rid, "object": "chat.completion", "created": created, "model": model, "choices": choices,
                "usage": usage(self.final.prompt_tokens, self.final.tokens_generated, self.final.cached_tokens)}  # fmt: skip

    def completion(self, rid: str, model: str, created: int) -> dict[str, Any]:
        assert self.final is not None
        finals = ends(self.final, self.n)
        choices = []
        for i in range(self.n):
            reason, matched = finals[i]
            lp = completion_logprobs(self.positions[i], 0)[0] if self.want_logprobs else None
            choices.append({"index": i, "text": "".join(self.texts[i]), "logprobs": lp, "finish_reason": reason,
                            "stop_reason": matched})  # fmt: skip
        return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices,
                "usage": usage(self.final.prompt_tokens, self.final.tokens_generated, self.final.cached_tokens)}  # fmt: skip


def now() -> int:
    return int(time.time())
