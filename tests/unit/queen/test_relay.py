"""NodeEventRelay: one node operation's events reach the client in the order
they happened, then the node; an error ends the stream after the events
before it; a client that goes away cancels the operation."""

from __future__ import annotations

import asyncio
import io

import pytest

from rbee.errors import RbeeError
from rbee.narration import Narrator, event
from rbee.v1 import common_pb2, nodes_pb2
from rbee_queen.nodes.relay import ACTOR, NodeEventRelay

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest.fixture
def log() -> io.StringIO:
    return io.StringIO()


@pytest.fixture
def relay(log: io.StringIO) -> NodeEventRelay:
    return NodeEventRelay(Narrator(ACTOR, stream=log))


def describe(item: nodes_pb2.NodeEvent) -> str:
    kind = item.WhichOneof("kind")
    if kind == "event":
        return f"event:{item.event.narration.message}"
    if kind == "check":
        return f"check:{item.check.name}:{item.check.passed}"
    return f"node:{item.node.name}"


async def drain(stream) -> list[str]:
    return [describe(item) async for item in stream]


async def test_events_arrive_in_order_then_the_node(relay: NodeEventRelay) -> None:
    async def work() -> nodes_pb2.Node:
        relay.narrate("🔌", "one")
        await asyncio.sleep(0)
        relay.check("reachable", True, "two")
        relay.relay(common_pb2.Event(narration=event("rbee-hive", "🐝", "three")))
        await asyncio.sleep(0.01)
        relay.check("latency", True, "four", warning=True)
        # Produced right before the operation returns: must not be lost.
        relay.narrate("✅", "five")
        return nodes_pb2.Node(name="box")

    assert await drain(relay.run(work())) == [
        "event:one", "check:reachable:True", "event:three", "check:latency:True", "event:five", "node:box",
    ]  # fmt: skip


async def test_an_error_ends_the_stream_after_the_events_before_it(relay: NodeEventRelay) -> None:
    failure = RbeeError("SSH_CONNECTION_FAILED", "failed after 3 attempts")

    async def work() -> nodes_pb2.Node:
        relay.narrate("🔌", "attempt 1/3")
        await asyncio.sleep(0)
        relay.check("reachable", False, "failed after 3 attempts")
        raise failure

    seen: list[str] = []
    with pytest.raises(RbeeError) as caught:
        async for item in relay.run(work()):
            seen.append(describe(item))
    assert caught.value is failure
    assert seen == ["event:attempt 1/3", "check:reachable:False"]


async def test_a_client_that_goes_away_cancels_the_operation(relay: NodeEventRelay) -> None:
    cancelled = asyncio.Event()

    async def work() -> nodes_pb2.Node:
        relay.narrate("📦", "installing")
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return nodes_pb2.Node(name="never")

    stream = relay.run(work())
    assert describe(await stream.__anext__()) == "event:installing"
    await stream.aclose()
    assert cancelled.is_set()


async def test_checks_carry_their_figures_and_every_line_reaches_the_queen_log(relay: NodeEventRelay, log: io.StringIO) -> None:
    async def work() -> nodes_pb2.Node:
        relay.narrate("🔌", "Testing the connection to box")
        relay.check("latency", True, "SSH latency: 150ms", warning=True, latency_ms=150)
        relay.check("hive_program", False, "rbee-hive not found")
        relay.relay(common_pb2.Event(narration=event("rbee-hive", "🐝", "from the hive")))
        return nodes_pb2.Node(name="box")

    items = [item async for item in relay.run(work())]
    latency = items[1].check
    assert latency.warning and latency.passed and dict(latency.details) == {"latency_ms": "150"}
    assert not items[2].check.passed
    assert items[3].event.narration.actor == "rbee-hive"
    lines = log.getvalue().splitlines()
    assert lines == [
        f"[{ACTOR}] 🔌 Testing the connection to box",
        f"[{ACTOR}] ⚠️ SSH latency: 150ms",
        f"[{ACTOR}] ❌ rbee-hive not found",
        "[rbee-hive] 🐝 from the hive",
    ]
