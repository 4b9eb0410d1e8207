"""Key scopes (S13): the one table in rbee/scopes.py names every RPC of every
service (walked from the generated descriptors, so a new RPC cannot be left
out), and the real servers (in-process, the real servicers and interceptor
wiring) refuse every method with no key, a wrong key and each key of
another scope they know."""

from __future__ import annotations

import importlib
import io
import os
import pkgutil

import grpc
import pytest

import rbee.v1
from rbee.auth import auth_metadata, authorize, static_ring
from rbee.channel import open_channel
from rbee.errors import from_rpc_error
from rbee.narration import Narrator
from rbee.scopes import METHOD_SCOPES, SERVICES, Scope, is_open, methods_of, required_scope

ASYNC = pytest.mark.asyncio(loop_scope="session")

HIVE_KEY = "hive-admin-key"
QUEEN_KEY = "queen-admin-key"
W_INFERENCE, W_ADMIN, W_CALLBACK = "worker-inference-key", "worker-admin-key", "worker-callback-key"


def declared_methods() -> dict[str, object]:
    """Every RPC of every service in the generated rbee.v1 modules."""
    found = {}
    for info in pkgutil.iter_modules(rbee.v1.__path__):
        if not info.name.endswith("_pb2"):
            continue
        module = importlib.import_module(f"rbee.v1.{info.name}")
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                found[f"/{service.full_name}/{method.name}"] = method
    return found


METHODS = declared_methods()


def test_every_rpc_of_every_service_has_a_scope() -> None:
    assert METHODS, "no services found in rbee.v1"
    # Open services (the queen's enrolment, on a port of its own) need no key.
    keyed = [m for m in METHODS if not is_open(m)]
    missing = sorted(m for m in keyed if m not in METHOD_SCOPES)
    assert not missing, f"RPCs without a key scope in rbee/scopes.py: {missing}"
    for method in keyed:
        service = method.split("/")[1]
        assert service in SERVICES, f"{service} is served by no program in rbee/scopes.py SERVICES"
    for method, scope in METHOD_SCOPES.items():
        assert scope in (Scope.ADMIN, Scope.INFERENCE, Scope.CALLBACK), method


def test_least_privilege_where_it_matters() -> None:
    # The keeper's worker key cannot stop the worker; the callback key opens only the callback.
    assert required_scope("/rbee.v1.InferenceService/Shutdown") == Scope.ADMIN
    assert required_scope("/rbee.v1.InferenceService/Generate") == Scope.INFERENCE
    assert [m for m, s in METHOD_SCOPES.items() if s == Scope.CALLBACK] == ["/rbee.v1.WorkerCallbackService/ReportWorker"]
    for daemon in ("hive", "queen"):
        assert all(METHOD_SCOPES[m] != Scope.INFERENCE for m in methods_of(daemon)), daemon


def test_the_right_key_opens_and_only_it() -> None:
    keys = {Scope.ADMIN: "key-admin-1", Scope.INFERENCE: "key-inference-2", Scope.CALLBACK: "key-callback-3"}
    ring = static_ring(*keys.items(), (Scope.OTHER_ADMIN, "key-other-4"))
    for method, scope in METHOD_SCOPES.items():
        assert authorize(auth_metadata(keys[scope]), method, ring) is None, method
        for other, key in {**keys, Scope.OTHER_ADMIN: "key-other-4"}.items():
            if other != scope:
                err = authorize(auth_metadata(key), method, ring)
                assert err is not None and err.code == "WRONG_KEY_SCOPE", (method, other)
                assert key not in err.message and key not in str(err.details)
        assert authorize(auth_metadata("nope"), method, ring).code == "INVALID_API_KEY"
        assert authorize((), method, ring).code == "MISSING_API_KEY"
        assert authorize((("authorization", "Basic key-admin-1"),), method, ring).code == "INVALID_API_KEY"


def test_a_method_missing_from_the_table_is_refused_whatever_the_key() -> None:
    ring = static_ring((Scope.ADMIN, "a"))
    err = authorize(auth_metadata("a"), "/rbee.v1.HiveWorkerService/SomethingNew", ring)
    assert err is not None and err.code == "WRONG_KEY_SCOPE"


# -- against the real servers -------------------------------------------------


async def refusal(channel: grpc.aio.Channel, method: str, key: str | None) -> tuple[grpc.StatusCode, str]:
    """Call ``method`` with an empty request (raw bytes: no stub needed) and
    return how it was refused."""
    desc = METHODS[method]
    assert not desc.client_streaming, f"{method}: client streams are not handled here"
    md = auth_metadata(key)
    try:
        if desc.server_streaming:
            call = channel.unary_stream(method)(b"", metadata=md, timeout=10)
            async for _ in call:
                pass
        else:
            await channel.unary_unary(method)(b"", metadata=md, timeout=10)
    except grpc.aio.AioRpcError as exc:
        return exc.code(), from_rpc_error(exc).code
    raise AssertionError(f"{method} answered without the right key ({key!r})")


async def walk(channel: grpc.aio.Channel, daemon: str, other_scope_keys: dict[Scope, list[str]]) -> int:
    calls = 0
    methods = [m for m in METHODS if not is_open(m) and SERVICES[m.split("/")[1]] == daemon]
    # Shutdown-like calls last would not matter: none of these may run.
    for method in methods:
        assert await refusal(channel, method, None) == (grpc.StatusCode.UNAUTHENTICATED, "MISSING_API_KEY"), method
        assert await refusal(channel, method, "not-a-key") == (grpc.StatusCode.UNAUTHENTICATED, "INVALID_API_KEY"), method
        calls += 2
        needed = METHOD_SCOPES[method]
        for scope, keys in other_scope_keys.items():
            if scope == needed:
                continue
            for key in keys:
                got = await refusal(channel, method, key)
                assert got == (grpc.StatusCode.PERMISSION_DENIED, "WRONG_KEY_SCOPE"), (method, scope, got)
                calls += 1
    return calls


@ASYNC
async def test_the_hive_refuses_every_method_without_a_key_of_its_scope(tmp_path) -> None:
    from rbee_hive.context import build_context
    from rbee_hive.server import HiveServer
    from rbee_hive.settings import HiveSettings
    from rbee_hive.workers.events import EventLog
    from rbee_hive.workers.registry import WorkerRecord

    settings = HiveSettings(port=0, api_key=HIVE_KEY, home=tmp_path, worker_binary=tmp_path / "none")
    ctx = build_context(settings, narrator=Narrator("rbee-hive", stream=io.StringIO()))
    server = HiveServer(ctx)
    port = await server.start()
    worker = WorkerRecord(
        id="worker-scopes", host="127.0.0.1", port=1, model_ref="file:///m", model_path="/m", backend="cpu",
        device=0, api_key=W_INFERENCE, callback_key=W_CALLBACK, admin_key=W_ADMIN, log_path=tmp_path / "w.log",
        events=EventLog(),
    )  # fmt: skip
    ctx.manager._pending[worker.id] = worker
    channel = open_channel(f"127.0.0.1:{port}")
    try:
        calls = await walk(
            channel,
            "hive",
            {
                Scope.ADMIN: [HIVE_KEY],
                Scope.INFERENCE: [W_INFERENCE],
                Scope.CALLBACK: [W_CALLBACK],
                Scope.OTHER_ADMIN: [W_ADMIN],
            },
        )
        assert calls >= 5 * len(list(methods_of("hive")))
        assert ctx.registry.get(worker.id) is None, "a refused report must not register the worker"
    finally:
        ctx.manager._pending.clear()
        await channel.close()
        await server.stop()


@ASYNC
async def test_the_queen_refuses_every_method_without_its_key(tmp_path) -> None:
    from rbee_queen.nodes.store import NodeRecord
    from rbee_queen.server import QueenServer
    from rbee_queen.settings import QueenSettings

    settings = QueenSettings(port=0, http_port=0, api_key=QUEEN_KEY, home=tmp_path)
    server = QueenServer(settings, Narrator("queen-rbee", stream=io.StringIO()))
    # A node whose hive key the queen keeps: presented to the queen it is
    # another daemon's admin key. Its hive is never reachable (port 1).
    server.store.add(NodeRecord(
        name="box", transport="local", install_path="/opt/rbee", hive_key=HIVE_KEY, hive_port=1,
    ))  # fmt: skip
    port = await server.start()
    channel = open_channel(f"127.0.0.1:{port}")
    try:
        await walk(channel, "queen", {Scope.ADMIN: [QUEEN_KEY], Scope.OTHER_ADMIN: [HIVE_KEY]})
    finally:
        await channel.close()
        await server.stop()


@ASYNC
async def test_the_worker_refuses_every_method_without_a_key_of_its_scope() -> None:
    from rbee_worker.grpc_server import create_server
    from rbee_worker.servicer import InferenceServicer
    from rbee_worker.status import Identity, WorkerStatus
    from tests.unit.worker.fakes import FakeEngine

    status = WorkerStatus()
    identity = Identity("w-scopes", "test-model", "/models/test", "cpu", 0, "127.0.0.1", 0, os.getpid())
    shutdowns: list[float] = []
    servicer = InferenceServicer(
        FakeEngine(), status, identity, 2, Narrator("llm-worker-rbee", stream=io.StringIO()), on_shutdown=shutdowns.append
    )
    ws = await create_server(servicer, status, W_INFERENCE, admin_key=W_ADMIN, callback_key=W_CALLBACK)
    channel = open_channel(f"127.0.0.1:{ws.port}")
    try:
        await walk(
            channel, "worker", {Scope.INFERENCE: [W_INFERENCE], Scope.ADMIN: [W_ADMIN], Scope.CALLBACK: [W_CALLBACK]}
        )
        assert shutdowns == [], "a refused Shutdown must not reach the servicer"
        # The hive's admin key stops it; the keeper's inference key did not.
        await channel.unary_unary("/rbee.v1.InferenceService/Shutdown")(b"", metadata=auth_metadata(W_ADMIN), timeout=10)
        assert len(shutdowns) == 1
    finally:
        await channel.close()
        await ws.server.stop(None)
