"""The contract's small enums (NarrationEvent.Level, ProgressEvent.Stage and
.Unit, Deployment.State) against the words the programs use: every word the
code sends has its value, what people and JSON see stays the plain word, and
a number this build does not know (a newer daemon's) reads as the default
through every reader instead of failing."""

from __future__ import annotations

import io

import pytest

from rbee.enum_words import APP_KEY_SCOPES, DEPLOYMENT_STATES, LEVELS, STAGES, UNITS
from rbee.narration import Narrator, event, level_of, progress_event, stage_of, unit_of
from rbee.v1 import common_pb2, replicas_pb2
from rbee_worker.engine import LoadProgress
from rbee_worker.loading_stages import STAGES as WORKER_STAGES
from tests.unit.hive.test_servicers import hive  # noqa: F401 - the fixture

# A value no build has: what a newer daemon might send.
UNKNOWN = 99


def _varint_field(number: int, value: int) -> bytes:
    """One varint field on the wire (field numbers < 16, values < 128)."""
    return bytes([number << 3, value])


def test_every_word_the_programs_send_has_its_value_and_back() -> None:
    sent_stages = {"starting", *WORKER_STAGES, "download", "verify"}
    assert sent_stages == set(STAGES.words)
    assert set(LEVELS.words) == {"info", "warn", "error"}
    assert set(UNITS.words) == {"bytes", "stages", LoadProgress("x", 0, 0).unit}
    assert set(DEPLOYMENT_STATES.words) == {"starting", "complete", "restarting", "waiting"}
    for table in (LEVELS, STAGES, UNITS, DEPLOYMENT_STATES):
        for word in table.words:
            assert word == word.lower() and table.word(table.number(word)) == word


def test_the_wire_carries_the_enum_and_readers_get_the_word() -> None:
    ev = event("rbee-hive", "⚠️", "careful", "warn")
    assert ev.severity == common_pb2.NarrationEvent.LEVEL_WARN and level_of(ev) == "warn"
    p = progress_event("download", 5, 10, unit="bytes", rate=2.0, message="f.gguf")
    assert (p.current_stage, p.count_unit) == (common_pb2.ProgressEvent.STAGE_DOWNLOAD, common_pb2.ProgressEvent.UNIT_BYTES)
    assert (stage_of(p), unit_of(p), p.done, p.total, p.rate, p.message) == ("download", "bytes", 5, 10, 2.0, "f.gguf")
    assert (stage_of(progress_event("", 0, 0)), unit_of(progress_event("", 0, 0))) == ("", "")


def test_unspecified_reads_as_the_default() -> None:
    assert level_of(common_pb2.NarrationEvent()) == "info"
    assert (stage_of(common_pb2.ProgressEvent()), unit_of(common_pb2.ProgressEvent())) == ("", "")
    assert DEPLOYMENT_STATES.word(replicas_pb2.Deployment().current_state) == "starting"


def test_a_number_this_build_does_not_know_reads_as_the_default() -> None:
    # proto3 keeps an unknown enum number as a plain int; parsing must not fail.
    ev = common_pb2.NarrationEvent.FromString(_varint_field(5, UNKNOWN))
    assert ev.severity == UNKNOWN and level_of(ev) == "info"
    p = common_pb2.ProgressEvent.FromString(_varint_field(1, UNKNOWN) + _varint_field(4, UNKNOWN))
    assert (p.current_stage, p.count_unit) == (UNKNOWN, UNKNOWN)
    assert (stage_of(p), unit_of(p)) == ("", "")
    d = replicas_pb2.Deployment.FromString(_varint_field(9, UNKNOWN))
    assert d.current_state == UNKNOWN and DEPLOYMENT_STATES.word(d.current_state) == "starting"


def test_a_word_the_contract_lacks_is_a_mistake_of_the_caller() -> None:
    with pytest.raises(ValueError, match="'warning' is not one of info, warn, error"):
        event("rbee-hive", "", "x", "warning")
    with pytest.raises(ValueError, match="'install' is not one of"):
        progress_event("install", 0, 0)
    with pytest.raises(ValueError, match="'layers' is not one of"):
        progress_event("download", 0, 0, unit="layers")


def _unknown_progress() -> common_pb2.ProgressEvent:
    p = common_pb2.ProgressEvent.FromString(_varint_field(1, UNKNOWN) + _varint_field(4, UNKNOWN))
    p.done, p.total, p.message = 3, 6, "something new"
    return p


def test_the_queen_activity_feed_shows_words_and_takes_unknown_numbers() -> None:
    from rbee_queen.activity import Activity

    activity = Activity()
    entry = activity.begin("download", "Download", "local", "hf:org/repo")
    activity.line(entry, event("rbee-hive", "⚠️", "careful", "warn"))
    activity.line(entry, common_pb2.NarrationEvent.FromString(_varint_field(5, UNKNOWN)))
    activity.progress(entry, progress_event("verify", 1, 2, unit="bytes"))
    assert [line["level"] for line in entry.lines] == ["warn", "info"]
    assert (entry.progress["stage"], entry.progress["unit"]) == ("verify", "bytes")
    activity.progress(entry, _unknown_progress())
    assert (entry.progress["stage"], entry.progress["unit"], entry.progress["done"]) == ("", "", 3)


def test_the_keeper_and_the_front_door_show_an_unknown_stage_as_no_stage() -> None:
    from rbee_keeper.render import LoadingView
    from rbee_queen.http.routing import ColdStart

    err = io.StringIO()
    view = LoadingView("w:1", Narrator("rbee-keeper", stream=err))
    view.update(_unknown_progress())
    view.update(progress_event("weights", 4, 6, unit="stages"))
    assert err.getvalue().splitlines() == [
        "[rbee-keeper] ⏳ w:1 loading: loading · something new · 3/6",
        "[rbee-keeper] ⏳ w:1 loading: weights · 4/6 stages",
    ]
    start = ColdStart("local", "hf:org/repo")
    assert start.progress_line(progress_event("download", 5, 10)) == "download 50%"
    assert start.progress_line(_unknown_progress()) == "50% something new"


def test_the_keeper_shows_a_deployment_state_as_its_word() -> None:
    from rbee_keeper.commands.deploy import deployment_dict, deployment_rows

    d = replicas_pb2.Deployment(model_ref="hf:org/repo", replicas=2, current_state=replicas_pb2.Deployment.STATE_RESTARTING,
                                state_detail="in 4s (attempt 3)", last_error="NO_CAPACITY")  # fmt: skip
    assert (deployment_dict(d)["current_state"], deployment_dict(d)["state_detail"]) == ("restarting", "in 4s (attempt 3)")
    assert deployment_rows([d])[0][-1] == "restarting in 4s (attempt 3) (NO_CAPACITY)"
    newer = replicas_pb2.Deployment.FromString(_varint_field(9, UNKNOWN))
    assert deployment_dict(newer)["current_state"] == "starting" and deployment_rows([newer])[0][-1] == "starting"


def test_the_keeper_shows_a_node_connection_as_its_word() -> None:
    from rbee.enum_words import TRANSPORTS
    from rbee.v1 import nodes_pb2
    from rbee_keeper.commands.setup import _host, _node_dict

    assert set(TRANSPORTS.words) == {"ssh", "local"}  # NodeRecord.transport's values
    local = nodes_pb2.Node(name="here", connection=nodes_pb2.Node.TRANSPORT_LOCAL)
    assert (_node_dict(local)["connection"], _host(local)) == ("local", "(this machine)")
    newer = nodes_pb2.Node.FromString(_varint_field(2, UNKNOWN))
    newer.ssh_user, newer.ssh_host, newer.ssh_port = "rbee", "192.0.2.10", 22
    assert (_node_dict(newer)["connection"], _host(newer)) == ("ssh", "rbee@192.0.2.10:22")


async def test_an_app_key_scope_crosses_as_the_enum_and_an_unknown_one_opens_the_least(tmp_path) -> None:
    from rbee.errors import RbeeError
    from rbee.v1 import keys_pb2
    from rbee_keeper.commands.keys import _key_dict, parse_scope
    from rbee_queen.appkeys import SCOPES, AppKeyStore
    from rbee_queen.servicers.keys import AppKeyServicer

    assert set(APP_KEY_SCOPES.words) == {str(s) for s in SCOPES}
    store = AppKeyStore(tmp_path / "beehives.db")
    servicer = AppKeyServicer(store, Narrator("queen-rbee", stream=io.StringIO()))
    try:
        admin = await servicer.CreateAppKey(keys_pb2.CreateAppKeyRequest(name="ops", key_scope=keys_pb2.APP_KEY_SCOPE_ADMIN), None)
        plain = await servicer.CreateAppKey(keys_pb2.CreateAppKeyRequest(name="webui"), None)
        newer = keys_pb2.CreateAppKeyRequest.FromString(_varint_field(2, UNKNOWN))
        newer.name = "newer"
        unknown = await servicer.CreateAppKey(newer, None)
        assert [r.key.key_scope for r in (admin, plain, unknown)] == [keys_pb2.APP_KEY_SCOPE_ADMIN] + [keys_pb2.APP_KEY_SCOPE_INFERENCE] * 2
        assert [store.verify(r.secret) for r in (admin, plain, unknown)] == ["admin", "inference", "inference"]
        listed = await servicer.ListAppKeys(keys_pb2.ListAppKeysRequest(), None)
        assert {_key_dict(k)["name"]: _key_dict(k)["key_scope"] for k in listed.keys} == {
            "ops": "admin", "webui": "inference", "newer": "inference"}
    finally:
        store.close()
    assert parse_scope("admin") == "admin"
    with pytest.raises(RbeeError) as info:
        parse_scope("root")
    assert info.value.code == "INVALID_ARGUMENT" and info.value.details["option"] == "--scope"


@pytest.mark.asyncio(loop_scope="session")
async def test_a_model_entry_carries_provider_and_format_as_enums(hive, tmp_path) -> None:
    from rbee.enum_words import MODEL_FORMATS, MODEL_PROVIDERS
    from rbee.errors import RbeeError
    from rbee.v1 import provisioning_pb2, provisioning_pb2_grpc
    from rbee_hive.catalog.models import ModelRecord
    from rbee_keeper.commands.models import model_dict
    from tests.unit.hive.test_servicers import call

    entry = provisioning_pb2.ModelEntry
    assert set(MODEL_PROVIDERS.words) == {"hf", "file"} and set(MODEL_FORMATS.words) == {"safetensors", "gguf", "pytorch"}
    ctx, channel = hive
    catalog = ctx.provisioning.models.catalog
    for provider, reference, fmt in (("hf", "acme/tiny", "safetensors"), ("file", str(tmp_path / "m.gguf"), "gguf"),
                                     ("hf", "acme/odd", "unknown"), ("hf", "acme/newer", "a format of a newer hive")):  # fmt: skip
        catalog.add(ModelRecord(provider=provider, reference=reference, local_path=str(tmp_path), size_bytes=1, format=fmt))
    stub = provisioning_pb2_grpc.ProvisioningServiceStub(channel)
    listed = {m.model_ref: m for m in (await call(stub.ListModels, provisioning_pb2.ListModelsRequest())).models}
    tiny = listed["hf:acme/tiny"]
    assert (tiny.origin, tiny.weights_format) == (entry.PROVIDER_HF, entry.FORMAT_SAFETENSORS)
    assert model_dict(tiny)["weights_format"] == "safetensors"
    assert [MODEL_FORMATS.word(listed[r].weights_format) for r in ("hf:acme/odd", "hf:acme/newer")] == ["unknown", "unknown"]
    files = await call(stub.ListModels, provisioning_pb2.ListModelsRequest(origin=entry.PROVIDER_FILE))
    assert [(MODEL_PROVIDERS.word(m.origin), MODEL_FORMATS.word(m.weights_format)) for m in files.models] == [("file", "gguf")]
    # A provider this hive does not know: refused, not read as "every model".
    newer = provisioning_pb2.ListModelsRequest.FromString(_varint_field(1, UNKNOWN))
    with pytest.raises(RbeeError) as info:
        await call(stub.ListModels, newer)
    assert info.value.code == "INVALID_ARGUMENT" and info.value.details["field"] == "origin"
    odd = entry.FromString(_varint_field(2, UNKNOWN) + _varint_field(7, UNKNOWN))
    assert (MODEL_PROVIDERS.word(odd.origin), model_dict(odd)["weights_format"]) == ("", "unknown")


def test_a_resource_check_names_its_resource_as_the_enum() -> None:
    from rbee.enum_words import RESOURCES
    from rbee.v1 import preflight_pb2

    assert set(RESOURCES.words) == {"backend", "device", "disk", "ram", "vram"}  # rbee_hive/preflight.py's checks
    newer = preflight_pb2.ResourceCheck.FromString(_varint_field(1, UNKNOWN))
    assert newer.resource == UNKNOWN and RESOURCES.word(newer.resource) == ""
