"""How much a request may carry: the one table.

Every repeated or free-form field of an inference request has its bound here.
The keeper checks them before it sends (rbee_keeper/validation.py), the
worker before a request takes a slot or reaches the tokenizer
(rbee_worker/contract.py), and the queen's OpenAI routes before they build a
GenerateRequest. A refusal is INVALID_ARGUMENT naming the field and the bound.

The daemons' gRPC receive limits follow from the same figures: the largest
request a worker can accept is what its context allows, and grpc refuses a
larger message from its length prefix, before it is read (docs/security.md).
Sizes of text are UTF-8 bytes.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from rbee.errors import RbeeError

MIB = 1 << 20
# The queen's and the hive's receive limit: their largest request (a node's
# settings, a worker's report) is a few KB.
DAEMON_RECEIVE_LIMIT = 4 * MIB
# A prompt that fits a context of N tokens has at most about N × this many
# bytes (natural text is 3 to 5 bytes a token; runs of spaces or symbols that
# tokenizers merge reach 20 to 80).
PROMPT_BYTES_PER_TOKEN = 32
# The worker's receive limit when nothing says its context (the worker's
# own --max-model-len default).
DEFAULT_CONTEXT = 2048


@dataclass(frozen=True)
class Bound:
    """At most ``limit`` ``unit`` in ``field`` (a GenerateRequest field)."""

    field: str
    limit: int
    unit: str
    # What the bound keeps away, for docs/inference-api.md and docs/security.md.
    why: str

    def refuse(self, got: int, name: str | None = None, suggestion: str = "", **details: object) -> RbeeError:
        """INVALID_ARGUMENT naming the field (``name``: how the caller calls
        it, e.g. a keeper option), what it got and the bound."""
        name = name or self.field
        return RbeeError(
            "INVALID_ARGUMENT",
            f"Invalid {name}: {got} {self.unit}; at most {self.limit}",
            {"field": name, "limit": self.limit, "unit": self.unit, "got": got, **details},
            [suggestion or f"Keep {name} within {self.limit} {self.unit} (the bounds: docs/inference-api.md)"],
        )

    def check(self, got: int, name: str | None = None, suggestion: str = "", **details: object) -> None:
        if got > self.limit:
            raise self.refuse(got, name, suggestion, **details)


REQUEST_ID = Bound("request_id", 128, "characters", "ids are echoed in replies and written to the log")
CANCEL_IDS = Bound("request_ids", 1024, "ids", "one Cancel's work (a worker runs at most 256 requests)")
CHAT_MESSAGES = Bound("chat", 1024, "messages", "the chat template's work before the prompt is even measured")
STOP = Bound("stop", 16, "strings", "the engine compares every stop string at every generated token")
STOP_BYTES = Bound("stop", 1024, "bytes per string", "the same comparison")
STOP_TOKEN_IDS = Bound("stop_token_ids", 256, "ids", "the same comparison, per token id")
LOGIT_BIAS = Bound("logit_bias", 1024, "entries", "a bias applied at every sampling step")
JSON_SCHEMA_BYTES = Bound("json_schema", 64 * 1024, "bytes", "compiling the schema to a grammar")
# Levels of JSON nesting (objects and arrays); a schema level is two
# ({"properties": {...}}). Deeper text would exhaust the parsers' recursion.
JSON_SCHEMA_DEPTH = Bound("json_schema", 32, "levels of nesting", "recursion in the JSON parser and the grammar compiler")
REGEX_BYTES = Bound("regex", 4096, "bytes", "compiling the expression to an automaton")
GRAMMAR_BYTES = Bound("grammar", 64 * 1024, "bytes", "compiling the grammar")
CHOICES = Bound("choice", 256, "choices", "the grammar built from the choices")
CHOICE_BYTES = Bound("choice", 1024, "bytes per choice", "the same grammar")

# Every fixed bound, in the order docs/inference-api.md lists them.
BOUNDS: tuple[Bound, ...] = (
    REQUEST_ID, CHAT_MESSAGES, STOP, STOP_BYTES, STOP_TOKEN_IDS, LOGIT_BIAS, JSON_SCHEMA_BYTES, JSON_SCHEMA_DEPTH,
    REGEX_BYTES, GRAMMAR_BYTES, CHOICES, CHOICE_BYTES, CANCEL_IDS,
)  # fmt: skip


def prompt_bound(max_model_len: int) -> Bound:
    """The prompt's bound (and the chat's, all contents together) for a
    model of ``max_model_len`` tokens: more bytes cannot fit its context."""
    return Bound(
        "prompt", max(1, max_model_len) * PROMPT_BYTES_PER_TOKEN, "bytes",
        f"tokenizing text that cannot fit the context ({PROMPT_BYTES_PER_TOKEN} bytes per token of context)",
    )  # fmt: skip


def utf8_len(text: str) -> int:
    # Cheap answers first: ASCII-only text is one byte a character, and no
    # character takes more than four.
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def worker_receive_limit(max_model_len: int | None) -> int:
    """The largest GenerateRequest a worker of this context can accept (every
    field at its bound), rounded up to a whole MiB: the worker's gRPC receive
    limit."""
    context = max_model_len or DEFAULT_CONTEXT
    framing = 8  # a field's tag and length
    text = prompt_bound(context).limit + CHAT_MESSAGES.limit * (framing + 16)
    token_ids = context * 5 + framing
    constraint = max(
        JSON_SCHEMA_BYTES.limit, REGEX_BYTES.limit, GRAMMAR_BYTES.limit, CHOICES.limit * (CHOICE_BYTES.limit + framing)
    )
    stops = STOP.limit * (STOP_BYTES.limit + framing) + STOP_TOKEN_IDS.limit * 6
    bias = LOGIT_BIAS.limit * 16
    scalars = 64 * 1024  # the request id and every number, generously
    total = max(text, token_ids) + constraint + stops + bias + scalars
    return max(1, math.ceil(total / MIB)) * MIB


# A string (to its closing quote, or the end: never a failed match, so the
# scan stays linear on any text) or a bracket.
_JSON_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"?|[\[\]{}]', re.DOTALL)


def json_depth(text: str, stop_above: int | None = None) -> int:
    """How deep objects and arrays nest in JSON ``text`` (strings skipped),
    without parsing it: a parser would recurse that deep. Stops counting
    once past ``stop_above``."""
    depth = deepest = 0
    for match in _JSON_TOKENS.finditer(text):
        token = match.group()
        if token in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if stop_above is not None and deepest > stop_above:
                    break
        elif token in "]}":
            depth -= 1
    return deepest


def check_json_schema_text(text: str, name: str = "json_schema", suggestion: str = "") -> None:
    """The schema's size, then its depth, before anything parses it."""
    JSON_SCHEMA_BYTES.check(utf8_len(text), name, suggestion)
    JSON_SCHEMA_DEPTH.check(json_depth(text, JSON_SCHEMA_DEPTH.limit), name, suggestion)


def check_stops(stops: list[str] | tuple[str, ...], name: str = "stop", suggestion: str = "") -> None:
    STOP.check(len(stops), name, suggestion)
    for i, s in enumerate(stops):
        STOP_BYTES.check(utf8_len(s), name, suggestion, index=i)
