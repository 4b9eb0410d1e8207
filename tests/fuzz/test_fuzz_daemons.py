"""Fuzzing the hive and the queen as real processes (docs/security.md): every
RPC of every service they serve, with a valid key, gets hostile messages and
raw bytes (tests/fuzz/wire.py). After each one the daemon is alive and its
health answers; every reply is a success or a typed rbee error."""

from __future__ import annotations

from collections import Counter

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rbee.scopes import SERVICES
from rbee.v1 import common_pb2
from tests.fuzz.conftest import Daemon, examples
from tests.fuzz.wire import CLIENT_OPTIONS, Request, all_methods, call, edge_messages, message, raw_payload

METHODS = all_methods()
HIVE = sorted(m for m in METHODS if SERVICES.get(m.split("/")[1]) == "hive")
QUEEN = sorted(m for m in METHODS if SERVICES.get(m.split("/")[1]) == "queen")
LOOPBACK = ["127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.1:22", ""]
# The backends a hive builds environments for: ProvisionWorker never gets one.
BUILDABLE = (common_pb2.BACKEND_CPU, common_pb2.BACKEND_CUDA, common_pb2.BACKEND_METAL)


def pin_hive(method: str, msg) -> None:
    """What must not happen on the test machine: building a real worker
    environment (pip) for a valid backend."""
    if method.endswith("/ProvisionWorker") and msg.backend in BUILDABLE:
        msg.backend = 99  # a number no backend has: refused before any build


def pin_queen(method: str, msg) -> None:
    """The queen reaches nodes over SSH: only ever to 127.0.0.1, never a local
    node (its install and hive would be real), never a real repository."""
    if method.endswith("/AddNode") or method.endswith("/UpdateNode"):
        if not method.endswith("/UpdateNode") or msg.HasField("ssh_host"):
            msg.ssh_host = LOOPBACK[hash(msg.ssh_host) % len(LOOPBACK)] if msg.ssh_host else "127.0.0.1"
        if not method.endswith("/UpdateNode") or msg.HasField("git_repo_url"):
            msg.git_repo_url = "" if not msg.git_repo_url else "/nonexistent/rbee.git"
        if method.endswith("/AddNode"):
            msg.local = False


@st.composite
def hive_request(draw, daemon: Daemon):
    method = draw(st.sampled_from(HIVE))
    desc = METHODS[method]
    msg = draw(message(desc.input_type))
    # Now and then the values that reach deeper: a model the hive may load.
    tiny = daemon.extra_models / "tiny"  # type: ignore[attr-defined]
    for name in ("model_path", "model_ref", "source"):
        if name in desc.input_type.fields_by_name and draw(st.integers(0, 3)) == 0:
            setattr(msg, name, draw(st.sampled_from([str(tiny), f"file://{tiny}", str(tiny.parent)])))
    if "backend" in desc.input_type.fields_by_name and draw(st.booleans()):
        msg.backend = common_pb2.BACKEND_CPU
    pin_hive(method, msg)
    return Request(method, msg.SerializeToString())


@st.composite
def queen_request(draw):
    method = draw(st.sampled_from(QUEEN))
    desc = METHODS[method]
    msg = draw(message(desc.input_type))
    for name in ("name", "node"):
        if name in desc.input_type.fields_by_name and draw(st.booleans()):
            setattr(msg, name, "box")
    if "model_ref" in desc.input_type.fields_by_name and draw(st.booleans()):
        msg.model_ref = draw(st.sampled_from(["hf:ORG/REPO", "hf:ORG/REPO/model.gguf", "file:///tmp/none"]))
    if method.endswith("/RemoveNode") and msg.name == "box":
        msg.name = "box2"  # the node the other RPCs reach stays registered
    pin_queen(method, msg)
    return Request(method, msg.SerializeToString())


@st.composite
def raw_request(draw, methods: list[str]):
    method = draw(st.sampled_from(methods))
    return Request(method, draw(raw_payload(METHODS[method].input_type)))


def fuzz(daemon: Daemon, channel: grpc.Channel, seen: Counter, method: str, payload: bytes) -> None:
    outcome = call(channel, method, METHODS[method], payload, daemon.key, timeout=60)
    seen[(method.rsplit("/", 1)[1], outcome.rbee_code or outcome.code.name)] += 1
    daemon.assert_serving(channel)


@pytest.fixture(scope="module")
def hive_channel(fuzz_hive):
    with grpc.insecure_channel(fuzz_hive.address, options=CLIENT_OPTIONS) as channel:
        yield channel


@pytest.fixture(scope="module")
def queen_channel(fuzz_queen):
    with grpc.insecure_channel(fuzz_queen.address, options=CLIENT_OPTIONS) as channel:
        yield channel


def report(seen: Counter) -> None:
    """How the RPCs answered (shown with -s): what the examples reached."""
    for (method, outcome), n in sorted(seen.items()):
        print(f"  {method:28} {outcome:28} {n}")


def sweep(daemon: Daemon, channel: grpc.Channel, methods: list[str], pin) -> Counter:
    """Every RPC, deterministically: the empty request and the extremes of every field."""
    seen: Counter = Counter()
    for method in methods:
        for msg in edge_messages(METHODS[method].input_type):
            pin(method, msg)
            fuzz(daemon, channel, seen, method, msg.SerializeToString())
    assert {m for m, _ in seen} == {m.rsplit("/", 1)[1] for m in methods}
    report(seen)
    return seen


def test_every_hive_rpc_survives_extreme_values(fuzz_hive, hive_channel):
    sweep(fuzz_hive, hive_channel, HIVE, pin_hive)


def test_every_queen_rpc_survives_extreme_values(fuzz_queen, queen_channel):
    sweep(fuzz_queen, queen_channel, QUEEN, pin_queen)


def test_hive_survives_hostile_messages(fuzz_hive, hive_channel):
    seen: Counter = Counter()

    @settings(max_examples=examples(120))
    @given(request=hive_request(fuzz_hive))
    def run(request):
        fuzz(fuzz_hive, hive_channel, seen, *request)

    run()
    report(seen)


def test_hive_survives_raw_bytes(fuzz_hive, hive_channel):
    seen: Counter = Counter()

    @settings(max_examples=examples(60))
    @given(request=raw_request(HIVE))
    def run(request):
        fuzz(fuzz_hive, hive_channel, seen, *request)

    run()
    report(seen)


def test_queen_survives_hostile_messages(fuzz_queen, queen_channel):
    seen: Counter = Counter()

    @settings(max_examples=examples(80))
    @given(request=queen_request())
    def run(request):
        fuzz(fuzz_queen, queen_channel, seen, *request)

    run()
    report(seen)


def test_queen_survives_raw_bytes(fuzz_queen, queen_channel):
    seen: Counter = Counter()

    @settings(max_examples=examples(40))
    @given(request=raw_request(QUEEN))
    def run(request):
        fuzz(fuzz_queen, queen_channel, seen, *request)

    run()
    report(seen)
