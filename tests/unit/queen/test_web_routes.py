"""The web page's routes (rbee_queen/http/web.py) on the real app with a real
node store, worker registry and activity record: keys and scopes (a missing
or wrong key 401, an inference key reads but every action is 403), the
static files and nothing beside them, the event stream's snapshot and its
live changes. The page itself is tested in a browser
(tests/integration/test_web_page.py)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from rbee.errors import RbeeError
from rbee.v1 import common_pb2, registry_pb2
from rbee_queen.activity import Activity, Tracked
from rbee_queen.http import events
from rbee_queen.http.asgi import create_app
from rbee_queen.http.auth import Authenticator
from rbee_queen.nodes.store import NodeStore
from rbee_queen.workers import ClusterWorkers

ADMIN = "admin-key-for-tests"
APP = "inference-key-for-tests"


@pytest.fixture
def queen(tmp_path: Path):
    store = NodeStore(tmp_path / "beehives.db")
    q = SimpleNamespace(
        store=store, nodes=SimpleNamespace(started_hives={}), registry=ClusterWorkers(120.0),
        tasks=SimpleNamespace(activity=Activity()), narrate=lambda *a, **k: None,
    )  # fmt: skip
    yield q
    store.close()


@pytest.fixture
def app(queen):
    return create_app(Authenticator(ADMIN, lambda token: "inference" if token == APP else None), None, queen)


@pytest.fixture
def client(app):
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://queen")


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_the_page_and_its_files_are_served_and_nothing_else(client) -> None:
    page = await client.get("/")
    assert page.status_code == 200 and 'src="/ui/app.js"' in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    for name in ("app.js", "api.js", "views.js", "logs.js", "playground.js", "format.js", "style.css"):
        reply = await client.get(f"/ui/{name}")
        assert reply.status_code == 200, name
    assert (await client.get("/ui/app.js")).headers["content-type"].startswith("text/javascript")
    for bad in ("..%2Fweb.py", "web.py", "nothere.js", ".hidden.js", "%2Fetc%2Fpasswd"):
        assert (await client.get(f"/ui/{bad}")).status_code == 404, bad


async def test_keys_and_scopes(client, app) -> None:
    assert (await client.get("/api/web/me")).status_code == 401
    assert (await client.get("/api/web/me", headers=bearer("wrong"))).status_code == 401
    assert (await client.get("/api/web/events", headers=bearer("wrong"))).status_code == 401
    assert (await client.get("/api/web/me", headers=bearer(APP))).json() == {"scope": "inference", "can_act": False}
    assert (await client.get("/api/web/me", headers=bearer(ADMIN))).json() == {"scope": "admin", "can_act": True}
    app.state.web_streams = 64  # every stream slot taken
    crowded = await client.get("/api/web/events", headers=bearer(ADMIN))
    assert crowded.status_code == 429 and crowded.headers["retry-after"] == "5"
    app.state.web_streams = 0
    stop = {"node": "n", "worker_id": "w"}
    download = {"node": "n", "model": "hf:org/repo"}
    for path, body in (("/api/web/workers/stop", stop), ("/api/web/models/download", download)):
        assert (await client.post(path, json=body)).status_code == 401
        denied = await client.post(path, json=body, headers=bearer(APP))
        assert denied.status_code == 403 and denied.json()["error"]["type"] == "permission_error"


async def test_admin_actions_name_what_is_wrong(client) -> None:
    missing = await client.post("/api/web/workers/stop", json={"node": "nowhere", "worker_id": "w-1"}, headers=bearer(ADMIN))
    assert missing.status_code == 404
    assert missing.json()["error"]["rbee"]["code"] == "NODE_NOT_FOUND"
    assert any("add-node" in s for s in missing.json()["error"]["rbee"]["suggestions"])
    bad = await client.post("/api/web/models/download", json={"node": "nowhere", "model": "x"}, headers=bearer(ADMIN))
    assert bad.status_code == 404
    extra = await client.post("/api/web/workers/stop", json={"node": "n", "worker_id": "w", "force": 1}, headers=bearer(ADMIN))
    assert extra.status_code == 400
    logs = await client.get("/api/web/logs", params={"node": "nowhere"}, headers=bearer(ADMIN))
    assert logs.status_code == 404 and logs.json()["error"]["rbee"]["code"] == "NODE_NOT_FOUND"
    tail = await client.get("/api/web/logs", params={"node": "n", "tail": 0}, headers=bearer(ADMIN))
    assert tail.status_code == 400


def parse(chunk: bytes) -> list[tuple[str, object]]:
    out = []
    for block in chunk.decode().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if not line.startswith(":"))
        if lines:
            out.append((lines["event"], json.loads(lines["data"])))
    return out


async def test_the_event_stream_sends_a_snapshot_then_changes(queen) -> None:
    activity: Activity = queen.tasks.activity
    stream = events.cluster_events(queen)
    [(kind, snapshot)] = parse(await anext(stream))
    assert kind == "snapshot" and snapshot == {"activity": [], "workers": [], "nodes": [], "models": {}}

    worker = common_pb2.WorkerInfo(id="w-1", address="127.0.0.1:7910", model_ref="hf:org/m", backend=common_pb2.BACKEND_CPU,
                                   state=common_pb2.WORKER_STATE_IDLE, slots_total=4, slots_available=3,
                                   started_unix_ms=1_700_000_000_000)  # fmt: skip
    queen.registry.apply("here", "127.0.0.1:7900", registry_pb2.WatchWorkersResponse(hive_instance="i", seq=1, snapshot=True, workers=[worker]))
    [(kind, workers)] = parse(await asyncio.wait_for(anext(stream), 5))
    assert kind == "workers"
    assert workers[0] | {"now_unix_ms": 0} == workers[0] | {
        "id": "w-1", "node": "here", "model": "hf:org/m", "state": "idle", "slots_busy": 1, "slots_total": 4,
        "started_unix_ms": 1_700_000_000_000, "now_unix_ms": 0}  # fmt: skip

    # A task's lines go to its own client unchanged and to the stream.
    seen = []
    relay = SimpleNamespace(narrate=lambda *a: seen.append(a), relay=lambda ev: seen.append(ev), check=lambda *a, **k: seen.append(a))
    entry = activity.begin("task", "Task hf:org/m on here", "here", "hf:org/m")
    Tracked(relay, activity, entry).narrate("🧊", "Cold start: no worker serves hf:org/m on here yet")

    async def fail() -> None:
        raise RbeeError("INSUFFICIENT_RAM", "Not enough RAM", {"required_mb": "9000"}, ["Free memory"])

    with pytest.raises(RbeeError):
        await activity.run(entry, fail())
    got: list = []
    while len(got) < 3:
        got += parse(await asyncio.wait_for(anext(stream), 5))
    assert [k for k, _ in got] == ["entry", "line", "entry"]
    assert got[1][1]["line"]["text"] == "[queen-rbee] 🧊 Cold start: no worker serves hf:org/m on here yet"
    assert got[2][1]["state"] == "failed" and got[2][1]["error"]["code"] == "INSUFFICIENT_RAM"
    assert got[2][1]["error"]["suggestions"] == ["Free memory"]
    assert len(seen) == 1
    await stream.aclose()
