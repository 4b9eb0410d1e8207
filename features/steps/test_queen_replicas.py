"""Steps for queen_replicas.feature (docs/queen.md, "Replicas"): real
queen-rbee processes, the keeper's console script, this machine as two local
nodes whose hives the queen starts, the hub-like server as the model hub and
the stand-in worker program. Every wait polls what the keeper lists, with a
generous deadline."""

from __future__ import annotations

import json
import os
import signal

from pytest_bdd import given, parsers, scenarios, then, when

from features.steps.queen_task_support import MODEL_REF, TaskWorld, session_loop, world  # noqa: F401 - fixtures

scenarios("queen_replicas.feature")

# Short windows, so a scenario does not wait out production figures.
REPLICA_ENV = {"RBEE_QUEEN_REPLICA_INTERVAL": "0.5s", "RBEE_QUEEN_REPLICA_BACKOFF_BASE": "0.5s",
               "RBEE_QUEEN_REPLICA_BACKOFF_MAX": "2s"}  # fmt: skip




def _live(world: TaskWorld, ref: str) -> list[dict]:
    run = world.keeper("workers", "list", "--json")
    if run.code != 0:
        return []
    found = [json.loads(line) for line in run.out.splitlines()]
    return [w for w in found if w["model_ref"] == ref and w["state"] in ("loading", "idle", "busy")]


def _ready(world: TaskWorld, ref: str, n: int, nodes: list[str], timeout: float) -> list[dict]:
    def probe():
        found = _live(world, ref)
        if len(found) != n or any(w["state"] == "loading" for w in found):
            return None
        return found if sorted(w["node"] for w in found) == sorted(nodes) else None

    found = world.until(probe, timeout)
    assert found, f"not {n} ready workers of {ref} on {nodes}: {_live(world, ref)}\n{world.queen.text()[-3000:]}"
    return found


def _deployed(world: TaskWorld) -> list[dict]:
    run = world.keeper("models", "list", "--deployed", "--json")
    assert run.code == 0, run
    return [json.loads(line) for line in run.out.splitlines()]


# -- given ------------------------------------------------------------------------------------


@given(parsers.parse('the hub-like server serves the model "{ref}"'))
def _hub_serves(world, ref):
    assert ref == MODEL_REF, f"the scenarios serve {MODEL_REF} only"
    world.serve_model()


@given("a running queen that keeps deployments, with restarts after 0.5s")
def _queen(world):
    world.start_queen(**REPLICA_ENV)


@given(parsers.parse('this machine is registered as the local nodes "{a}" and "{b}"'))
def _local_nodes(world, a, b):
    world.add_local_nodes(a, b)


# -- when -------------------------------------------------------------------------------------


@when(parsers.parse('I deploy "{ref}" with {n:d} replicas'))
def _deploy(world, ref, n):
    world.keeper("models", "deploy", ref, "--replicas", str(n))


@when(parsers.parse('the worker of the deployment on "{node}" is killed with SIGKILL'))
def _kill(world, node):
    [victim] = [w for w in _live(world, MODEL_REF) if w["node"] == node]
    world.worker = victim
    os.kill(victim["pid"], signal.SIGKILL)


@when(parsers.parse('I undeploy "{ref}"'))
def _undeploy(world, ref):
    world.keeper("models", "undeploy", ref)


# -- then -------------------------------------------------------------------------------------


@then(parsers.parse("the keeper exits {code:d}"))
def _exits(world, code):
    assert world.last is not None and world.last.code == code, world.last


@then(parsers.parse('two workers of "{ref}" are ready within {timeout:d} s, one on "{a}" and one on "{b}"'))
def _two_ready(world, ref, timeout, a, b):
    _ready(world, ref, 2, [a, b], timeout)


@then(parsers.parse('two workers of "{ref}" are ready again within {timeout:d} s, the killed one not among them'))
def _two_again(world, ref, timeout):
    def probe():
        found = _live(world, ref)
        ok = len(found) == 2 and all(w["state"] != "loading" for w in found) and world.worker["id"] not in {w["id"] for w in found}
        return found if ok else None

    assert world.until(probe, timeout), f"{_live(world, ref)}\n{world.queen.text()[-3000:]}"


@then("the queen's log says the killed worker is gone and that another starts after a backoff")
def _log_says(world):
    log = world.queen.text()
    assert f"Replica {world.worker['id']} of {MODEL_REF} on {world.worker['node']} is gone" in log, log[-3000:]
    assert f"{MODEL_REF}: 1/2 replicas running; starting another in 0.5s (attempt 1)" in log, log[-3000:]


@then(parsers.parse('the deployments list shows "{ref}" with 2/2 ready on any node, complete'))
def _list_two(world, ref):
    [d] = _deployed(world)
    assert (d["model_ref"], d["replicas"], d["ready"], d["nodes"], d["current_state"]) == (ref, 2, 2, [], "complete"), d
    run = world.keeper("models", "list", "--deployed")
    assert run.code == 0, run
    header, row = run.out.splitlines()
    assert header.split() == ["DEPLOYED", "MODEL", "READY", "NODES", "CREATED", "STATE"]
    assert row.split()[:3] == [ref, "2/2", "any"] and row.split()[-1] == "complete", row


@then(parsers.parse('no worker of "{ref}" runs within {timeout:d} s'))
def _none(world, ref, timeout):
    assert world.until(lambda: not _live(world, ref), timeout), _live(world, ref)


@then("the deployments list says no model is deployed")
def _none_deployed(world):
    assert _deployed(world) == []
    run = world.keeper("models", "list", "--deployed")
    assert run.code == 0 and run.out == "" and "No model is deployed" in run.err, run


@then(parsers.parse('the keeper exits 1 with {code} and a suggestion naming "{command}"'))
def _refused(world, code, command):
    run = world.last
    assert run.code == 1 and f"❌ {code}:" in run.err, run
    assert any(command in s for s in run.suggestions()), run
