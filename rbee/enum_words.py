"""The contract's small enums and the lower-case words the programs use for them.

Inside Python, in logs, in `--json` output and on the queen's web page a level
is "warn", a stage "download", a deployment's state "complete"; on the wire
each is a proto enum (docs/architecture.md, "Contracts"). This module is the
one place that turns one into the other.

Reading is forgiving: proto3 keeps a number it does not know as a plain int
(a newer daemon's new value), so ``word`` reads that, like the UNSPECIFIED
default, as the table's default word instead of failing. Writing is strict:
a word the table does not have is a mistake in the calling code, except for
the tables of words read back from a catalog (``lenient``: written as
UNSPECIFIED). The default word itself is written as UNSPECIFIED when the enum
has no value of its own for it ("" for no stage, "unknown" for a format).
"""

from __future__ import annotations

from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper

from rbee.v1 import common_pb2, keys_pb2, nodes_pb2, preflight_pb2, provisioning_pb2, replicas_pb2


class EnumWords:
    """One proto enum: VALUE_NAME <-> "name" (the prefix dropped, lower case)."""

    def __init__(self, enum: EnumTypeWrapper, prefix: str, default: str, lenient: bool = False) -> None:
        self._to_number: dict[str, int] = {}
        self._to_word: dict[int, str] = {}
        for name, number in enum.items():
            if number == 0:
                continue
            word = name.removeprefix(prefix).lower()
            self._to_number[word] = number
            self._to_word[number] = word
        # The default is a word of the enum, or the word for UNSPECIFIED itself
        # ("unknown" for a model's format). ``lenient``: a word the enum lacks is
        # written as UNSPECIFIED too (a value read back from a database).
        self.default = default
        self._lenient = lenient

    @property
    def words(self) -> tuple[str, ...]:
        return tuple(self._to_number)

    def number(self, word: str) -> int:
        """The enum value for ``word``; ValueError for a word the contract lacks (0 when lenient)."""
        try:
            return self._to_number[word]
        except KeyError:
            if word == self.default or self._lenient:
                return 0
            raise ValueError(f"{word!r} is not one of {', '.join(self._to_number)}") from None

    def word(self, number: int) -> str:
        """The word for ``number``; the default for UNSPECIFIED and for a number this build does not know."""
        return self._to_word.get(int(number), self.default)


# NarrationEvent.severity: unspecified reads as "info".
LEVELS = EnumWords(common_pb2.NarrationEvent.Level, "LEVEL_", "info")
# ProgressEvent.current_stage: unspecified reads as "" (no stage named).
STAGES = EnumWords(common_pb2.ProgressEvent.Stage, "STAGE_", "")
# ProgressEvent.count_unit: unspecified reads as "" (a plain count).
UNITS = EnumWords(common_pb2.ProgressEvent.Unit, "UNIT_", "")
# Deployment.current_state: unspecified reads as "starting" (what the queen
# reports for a wish its reconcile loop has not looked at yet).
DEPLOYMENT_STATES = EnumWords(replicas_pb2.Deployment.State, "STATE_", "starting")
# Node.connection: unspecified reads as "ssh" (only the queen's own machine is local).
TRANSPORTS = EnumWords(nodes_pb2.Node.Transport, "TRANSPORT_", "ssh")
# AppKey.key_scope and CreateAppKeyRequest.key_scope: unspecified reads as
# "inference", the narrower scope (so a newer client's unknown scope opens less).
APP_KEY_SCOPES = EnumWords(keys_pb2.AppKeyScope, "APP_KEY_SCOPE_", "inference")
# ModelEntry.origin and ListModelsRequest.origin: unspecified reads as "" (none
# named); a catalog row's word the enum lacks is written as unspecified.
MODEL_PROVIDERS = EnumWords(provisioning_pb2.ModelEntry.Provider, "PROVIDER_", "", lenient=True)
# ModelEntry.weights_format: unspecified is "unknown" (files not recognised); a
# catalog row's word the enum lacks is written as unknown.
MODEL_FORMATS = EnumWords(provisioning_pb2.ModelEntry.Format, "FORMAT_", "unknown", lenient=True)
# ResourceCheck.resource: unspecified reads as "" (a check without a name).
RESOURCES = EnumWords(preflight_pb2.ResourceCheck.Resource, "RESOURCE_", "")
# GetHiveHealthResponse.hive_status: unspecified reads as "healthy" (the hive
# answered; a first-release hive's string "ok" arrives as unspecified).
HIVE_STATUSES = EnumWords(preflight_pb2.GetHiveHealthResponse.HiveStatus, "HIVE_STATUS_", "healthy")
