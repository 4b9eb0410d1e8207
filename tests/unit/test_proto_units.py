"""The contracts' units rule (docs/architecture.md, "Contracts: units"), over
every message of rbee.v1: durations in milliseconds (`_ms`), timestamps as
int64 unix milliseconds (`_unix_ms`), sizes in bytes (`_bytes`, uint64).
Durations a user types ("5m") stay strings and carry no unit suffix."""

from __future__ import annotations

import importlib
import pkgutil

import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor

import rbee.v1

# Name endings that put a figure in another unit than the rule's.
FORBIDDEN = ("_s", "_secs", "_seconds", "_unix", "_mb", "_mib", "_gb", "_kb")
# A rate is not a duration: "tokens per second" is its unit.
RATE = "_per_s"

INTEGERS = {FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_UINT32}


def unit_problem(field: FieldDescriptor) -> str | None:
    """Why the field breaks the rule, or None."""
    name = field.name
    if name.endswith(FORBIDDEN) and not name.endswith(RATE):
        return "a duration in _ms, a timestamp in _unix_ms, a size in _bytes"
    if (name == "unix_ms" or name.endswith("_unix_ms")) and field.type != FieldDescriptor.TYPE_INT64:
        return "a timestamp is int64 unix milliseconds"
    if name.endswith("_ms") and field.type not in INTEGERS:
        return "milliseconds are a whole number"
    if name.endswith("_bytes") and field.type != FieldDescriptor.TYPE_UINT64:
        return "a size in bytes is uint64"
    return None


def _messages(message: Descriptor):
    yield message
    for nested in message.nested_types:
        yield from _messages(nested)


def all_fields() -> list[tuple[str, FieldDescriptor]]:
    fields = []
    for module_info in pkgutil.iter_modules(rbee.v1.__path__):
        if not module_info.name.endswith("_pb2"):
            continue
        module = importlib.import_module(f"rbee.v1.{module_info.name}")
        for top in module.DESCRIPTOR.message_types_by_name.values():
            for message in _messages(top):
                if message.GetOptions().map_entry:
                    continue
                fields.extend((message.full_name, f) for f in message.fields)
    return fields


def test_every_field_of_rbee_v1_follows_the_units_rule():
    fields = all_fields()
    # Every contract file is walked (a rename of the package would leave nothing to check).
    messages = {name.split(".")[2] for name, _ in fields}
    assert {"WorkerLoad", "ShutdownRequest", "AppKey", "Node", "ResourceCheck", "ModelEntry", "Deployment"} <= messages
    broken = [f"{message}.{f.name}: {why}" for message, f in fields if (why := unit_problem(f))]
    assert broken == [], "\n".join(broken)


@pytest.mark.parametrize(
    "name, type_",
    [
        ("timeout_s", FieldDescriptor.TYPE_UINT32),
        ("window_secs", FieldDescriptor.TYPE_UINT32),
        ("uptime_seconds", FieldDescriptor.TYPE_INT64),
        ("created_at_unix", FieldDescriptor.TYPE_INT64),
        ("free_mb", FieldDescriptor.TYPE_UINT64),
        ("vram_mib", FieldDescriptor.TYPE_UINT64),
        ("disk_gb", FieldDescriptor.TYPE_UINT64),
        ("buffer_kb", FieldDescriptor.TYPE_UINT64),
        ("created_at_unix_ms", FieldDescriptor.TYPE_UINT32),
        ("delay_ms", FieldDescriptor.TYPE_DOUBLE),
        ("size_bytes", FieldDescriptor.TYPE_UINT32),
    ],
)
def test_the_rule_refuses(name, type_):
    assert unit_problem(_Field(name, type_)) is not None


@pytest.mark.parametrize(
    "name, type_",
    [
        ("created_at_unix_ms", FieldDescriptor.TYPE_INT64),
        ("unix_ms", FieldDescriptor.TYPE_INT64),
        ("drain_timeout_ms", FieldDescriptor.TYPE_UINT64),
        ("window_ms", FieldDescriptor.TYPE_UINT32),
        ("required_bytes", FieldDescriptor.TYPE_UINT64),
        ("generation_tokens_per_s", FieldDescriptor.TYPE_DOUBLE),
        ("keep_alive", FieldDescriptor.TYPE_STRING),
        ("status", FieldDescriptor.TYPE_STRING),
    ],
)
def test_the_rule_accepts(name, type_):
    assert unit_problem(_Field(name, type_)) is None


class _Field:
    """The two attributes of a field the rule reads."""

    def __init__(self, name: str, type_: int) -> None:
        self.name = name
        self.type = type_
