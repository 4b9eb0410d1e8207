"""Steps for queen_inference.feature (S1), queen_workers.feature (S6.2) and
queen_lifecycle.feature (S8, the queen's part): real queen-rbee processes,
the keeper's console script, this machine as local nodes whose hives the
queen starts, the hub-like server (tests/hubserver.py) as the model hub and
the stand-in worker program spawned by the hives. Every check looks at what
the programs printed, what they answer, or which processes run."""

from __future__ import annotations

import json
import re
import time

import psutil
from pytest_bdd import given, parsers, scenarios, then, when

from features.steps.queen_support import quoted
from features.steps.queen_task_support import (  # noqa: F401 - session_loop and world are fixtures
    MODEL_REF, STANDIN_TEXT, TaskWorld, resume_process, session_loop, stop_process, world,
)

scenarios("queen_inference.feature", "queen_workers.feature", "queen_lifecycle.feature")

NARRATION = re.compile(r"^\[(?P<actor>[a-z-]+)\] \S+ .+$")




def _last(world: TaskWorld):
    assert world.last is not None, "no keeper command was run"
    return world.last


# -- the queen, the hub, the nodes -----------------------------------------------------------


@given("a running queen whose hives run the stand-in worker and download from the hub-like server")
def _queen(world):
    world.start_queen()


@given(parsers.parse('the hub-like server serves the model "{ref}"'))
def _hub_serves(world, ref):
    assert ref == MODEL_REF, f"the scenarios serve {MODEL_REF} only"
    world.serve_model()


@given(parsers.parse("a running queen whose hives run the stand-in worker and download from the hub-like server, "
                     'keeping its registry in "{name}"'))  # fmt: skip
def _queen_named(world, name):
    world.start_queen(name)


@given(parsers.parse("a running queen whose hives run the stand-in worker and download from the hub-like server, "
                     "dropping workers after {stale} without word from their hive"))  # fmt: skip
def _queen_stale(world, stale):
    world.start_queen(RBEE_QUEEN_WORKER_STALE_AFTER=stale)


@given(parsers.parse('this machine is registered as the local node "{name}"'))
def _local_node(world, name):
    world.add_local_nodes(name)


@given(parsers.parse('this machine is registered as the local nodes "{a}" and "{b}"'))
def _local_nodes(world, a, b):
    world.add_local_nodes(a, b)


@given(parsers.parse('this machine was registered as the local node "{name}" with a queen that has since stopped'))
def _registered_then_stopped(world, name):
    queen = world.start_queen("eph")
    world.add_local_nodes(name)
    assert world.run(queen.terminate()) == 0, queen.text()
    world.port = queen.port
    assert world.queen_pids(queen.port) == [] and world.hive_pids(name) == []


@given(parsers.parse('an infer on node "{name}" has cold-started a worker'))
def _cold_started(world, name):
    run = world.infer(name)
    assert run.code == 0 and run.out == STANDIN_TEXT + "\n", run
    assert "Cold start: worker" in run.err, run
    listed = world.until(lambda: world.cluster("--node", name))
    assert len(listed) == 1, listed
    world.worker = listed[0]
    world.downloads = len(world.hub.body_requests())
    assert world.downloads >= 1
    world.before[f"workers:{name}"] = world.worker_pids(name)
    world.before[f"hive:{name}"] = world.hive_pids(name)
    assert world.before[f"workers:{name}"] == [world.worker["pid"]], (world.before, world.worker)
    assert len(world.before[f"hive:{name}"]) == 1, world.before


# -- keeper commands ------------------------------------------------------------------------


@when(parsers.parse('I run infer on node "{name}" with the model "{ref}"'))
def _infer(world, name, ref):
    world.infer(name, ref)
    world.hives_after_infer[name] = world.hive_pids(name)


@when(parsers.parse('the hive of node "{name}" and its worker are killed'))
def _kill_hive(world, name):
    [hive] = world.hive_pids(name)
    for pid in [hive, *world.worker_pids(name)]:
        psutil.Process(pid).kill()
    assert world.until(lambda: not world.hive_pids(name) and not world.worker_pids(name), timeout=10)


@when("I list the workers through the queen as JSON")
def _list_json(world):
    world.keeper("workers", "list", "--json")


@when("I list the workers through the queen")
def _list_table(world):
    world.keeper("workers", "list")


@when("the queen is killed with SIGKILL")
def _queen_killed(world):
    queen = world.queen
    queen.proc.kill()
    world.run(queen.proc.wait())
    assert world.queen_pids(queen.port) == []


@when(parsers.parse('a new queen starts on the registry in "{name}"'))
def _queen_again(world, name):
    world.restart_queen(name)


@when("the queen is sent SIGTERM")
def _queen_sigterm(world):
    world.queen_exit = world.run(world.queen.terminate())


@when(parsers.parse('the hive of node "{name}" is stopped with SIGSTOP'))
def _sigstop(world, name):
    [pid] = world.hive_pids(name)
    stop_process(pid)
    world.stopped_at = time.monotonic()


@when(parsers.parse('the hive of node "{name}" is resumed with SIGCONT'))
def _sigcont(world, name):
    [pid] = world.hive_pids(name)
    resume_process(pid)


@when(parsers.parse('I run infer on node "{name}" with no queen answering at that queen\'s address'))
def _infer_ephemeral(world, name):
    address = f"127.0.0.1:{world.port}"
    world.keeper_without_queen(address, "infer", "--node", name, "--model", MODEL_REF, "--prompt", "hi", "--max-tokens", "3")


# -- outcomes -------------------------------------------------------------------------------


@then(parsers.parse("the keeper exits {code:d}"))
def _exits(world, code):
    run = _last(world)
    assert run.code == code, run
    assert "Traceback" not in run.err, run


@then("stdout is the worker's tokens and nothing else, ending with a newline")
def _tokens(world):
    run = _last(world)
    assert run.out == STANDIN_TEXT + "\n", run


@then(parsers.parse("stderr holds only narration lines, from the actors {actors}"))
def _narration_only(world, actors):
    run = _last(world)
    wanted = set(re.findall(r"[a-z]+(?:-[a-z]+)+", actors))
    seen = set()
    for line in run.err.splitlines():
        if not line.strip():
            continue
        match = NARRATION.match(line)
        assert match, f"not a narration line: {line!r}\n{run}"
        seen.add(match["actor"])
    assert seen == wanted, (seen, run)


@then(parsers.re(r"the narration showed, in order, (?P<items>.+)$"))
def _narrated_in_order(world, items):
    _last(world).narrated_in_order(*quoted(items))


@then(parsers.parse('the narration does not say "{text}"'))
def _does_not_say(world, text):
    run = _last(world)
    assert text not in run.err, run


@then("the download progress was narrated on stderr with percent, bytes and speed")
def _progress(world):
    run = _last(world)
    lines = [line for line in run.err.splitlines() if "⏬" in line]
    assert lines, run
    assert any(re.search(r"100\.0% \d+(\.\d+)? [kMG]?B / \d+(\.\d+)? [kMG]?B · \d+(\.\d+)? [kMG]?B/s", line) for line in lines), lines


@then("the hub-like server was asked for the model's files")
def _hub_asked(world):
    assert world.hub.body_requests("model.safetensors"), world.hub.records


@then("the hub-like server got no new download request")
def _no_new_download(world):
    assert len(world.hub.body_requests()) == world.downloads, world.hub.body_requests()


@then("the hub-like server got no request")
def _no_request(world):
    assert world.hub.records == [], world.hub.records


@then(parsers.parse('the hive of node "{name}" lists "{ref}" in its model catalog'))
def _catalog(world, name, ref):
    node = world.local(name)
    key = (node.home / "hive.key").read_text().strip()
    run = world.keeper_direct("models", "list", "--hive", f"127.0.0.1:{node.port}", "--api-key", key)
    assert run.code == 0, run
    assert any(line.split()[:1] == [ref] for line in run.out.splitlines()), run


@then(parsers.parse('one hive and one worker process run for node "{name}"'))
def _one_each(world, name):
    assert len(world.hive_pids(name)) == 1
    assert len(world.worker_pids(name)) == 1


@then("the narration says the warm start is on the worker the cold start spawned")
def _warm(world):
    run = _last(world)
    worker = world.worker
    assert f"Warm start: worker {worker['id']} at {worker['address']} already serves {MODEL_REF}" in run.err, run
    assert f"Warm start: worker {worker['id']} at {worker['address']} on {worker['node']} (queen: " in run.err, run


@then(parsers.parse('no new worker process was started for node "{name}"'))
def _no_new_worker(world, name):
    assert world.worker_pids(name) == world.before[f"workers:{name}"]
    assert [w["id"] for w in world.cluster("--node", name)] == [world.worker["id"]]


@then(parsers.re(r'the keeper refuses with (?P<code>[A-Z_]+) and the message "(?P<text>[^"]*)"$'))
def _refuses(world, code, text):
    run = _last(world)
    assert run.code == 1 and run.out == "", run
    assert "Traceback" not in run.err, run
    assert f"{code}: {text}" in run.err, run


@then(parsers.parse('the refusal suggests "{text}"'))
def _suggests(world, text):
    run = _last(world)
    assert any(text in s for s in run.suggestions()), run


@then("the worker it started is a new one, and the queen lists only that one")
def _new_worker(world):
    run = _last(world)
    old = world.worker
    match = re.search(r"Cold start: worker (\S+) at ", run.err)
    assert match and match[1] != old["id"], run
    listed = world.until(lambda: [w["id"] for w in world.cluster()] == [match[1]] or None)
    assert listed, world.cluster()
    [pid] = world.worker_pids(old["node"])
    assert pid != old["pid"]


@then("the model was not downloaded again: the catalog on the node's disk outlived its hive")
def _not_again(world):
    run = _last(world)
    assert len(world.hub.body_requests()) == world.downloads, world.hub.body_requests()
    assert "⏬" not in run.err, run


@then(parsers.parse('the narration says "{text}"'))
def _says(world, text):
    run = _last(world)
    assert text in run.err, run


@then(parsers.parse('stdout holds one JSON object: the worker the infer started, on node "{name}" with capability "{cap}", '
                    'idle, serving "{ref}", with its hive\'s address and the pid of a running process'))  # fmt: skip
def _json_worker(world, name, cap, ref):
    run = _last(world)
    [worker] = [json.loads(line) for line in run.out.splitlines()]
    node = world.local(name)
    assert worker["id"] == world.worker["id"] and worker["node"] == name and worker["capability"] == cap, worker
    assert worker["state"] == "idle" and worker["model_ref"] == ref and worker["backend"] == "cpu" and worker["device"] == 0, worker
    assert worker["hive"] == f"127.0.0.1:{node.port}", worker
    assert worker["slots_available"] == worker["slots_total"] > 0, worker
    assert world.worker_pids(name) == [worker["pid"]], worker


@then(parsers.re(r'listing with "(?P<args>[^"]+)" gives (?P<what>that worker only|no worker)$'))
def _filtered(world, args, what):
    ids = [w["id"] for w in world.cluster(*args.split())]
    assert ids == ([world.worker["id"]] if what == "that worker only" else []), (args, ids)


@then(parsers.parse('the table has the columns {columns}, and one row: the worker on "{name}", idle, cpu, {free} slots free'))
def _table(world, columns, name, free):
    run = _last(world)
    lines = [line for line in run.out.splitlines() if line.strip()]
    [header] = [line for line in lines if "NODE" in line]
    wanted = [c.strip() for c in re.split(r",| and ", columns) if c.strip()]
    positions = [header.find(c) for c in wanted]
    assert all(p >= 0 for p in positions) and positions == sorted(positions), (wanted, header)
    rows = [line for line in lines if world.worker["id"] in line]
    assert len(rows) == 1, run
    cells = rows[0].replace("│", " ").split()
    assert cells[:2] == [name, world.worker["id"]] and "idle" in cells and "cpu" in cells and free in cells, rows[0]
    assert MODEL_REF in cells and world.worker["address"] in cells, rows[0]


@then(parsers.parse('stdout is empty and the narration says "{text}" with the queen\'s address'))
def _nothing_listed(world, text):
    run = _last(world)
    assert run.out == "", run
    assert f"{text} {world.queen.address}" in run.err, run


@then(parsers.parse('the new queen lists the worker the infer started, on node "{name}", without any infer'))
def _rebuilt(world, name):
    listed = world.until(lambda: world.cluster())
    assert [(w["id"], w["node"]) for w in listed] == [(world.worker["id"], name)], listed
    assert [w["id"] for w in world.cluster("--node", name, "--capability", "cpu")] == [world.worker["id"]]


@then(parsers.re(r'the hive and the worker of node "(?P<name>[^"]+)" are the processes that ran before( the crash)?$'))
def _same_processes(world, name):
    assert world.hive_pids(name) == world.before[f"hive:{name}"]
    assert world.worker_pids(name) == world.before[f"workers:{name}"]


@then(parsers.parse("the queen lists no worker within {seconds:d} s, and not before the stale setting has passed"))
def _dropped(world, seconds):
    assert world.until(lambda: world.cluster() == [], timeout=seconds), world.cluster()
    took = time.monotonic() - world.stopped_at
    stale = float(world.queen_settings["RBEE_QUEEN_WORKER_STALE_AFTER"].rstrip("s"))
    # The hive was last heard at most one heartbeat (0.3 s) before it was stopped.
    assert took >= stale - 0.5, took


@then(parsers.parse('the queen\'s log says "{text}"'))
def _queen_log(world, text):
    assert text in world.queen.text(), world.queen.text()


@then(parsers.parse('the worker of node "{name}" still runs'))
def _worker_runs(world, name):
    assert world.worker_pids(name) == world.before[f"workers:{name}"]


@then(parsers.parse("the queen lists the worker the infer started again within {seconds:d} s"))
def _back(world, seconds):
    listed = world.until(lambda: world.cluster(), timeout=seconds)
    assert [w["id"] for w in listed] == [world.worker["id"]], listed


@then("the queen process still runs and answers")
def _queen_runs(world):
    queen = world.queen
    assert queen.proc.returncode is None and world.queen_pids(queen.port) == [queen.proc.pid]
    run = world.keeper("setup", "list-nodes", "--json")
    assert run.code == 0, run


@then(parsers.parse('the queen lists the worker on node "{name}" as idle'))
def _listed_idle(world, name):
    listed = world.until(lambda: [w for w in world.cluster("--node", name) if w["state"] == "idle"])
    assert len(listed) == 1, world.cluster()
    assert world.worker_pids(name) == [listed[0]["pid"]]


@then("no queen process runs for that address")
def _no_queen(world):
    assert world.queen_pids(world.port) == []


@then(parsers.parse('no hive and no worker process run for node "{name}"'))
def _nothing_left(world, name):
    assert world.hive_pids(name) == [] and world.worker_pids(name) == []
    assert world.processes_of(name) == []


@then(parsers.parse('the log of the queen started for the command says it stopped the hive it had started on "{name}"'))
def _ephemeral_log(world, name):
    log = world.queen.home / "logs" / "queen-ephemeral.log"
    text = log.read_text()
    assert re.search(rf"Stopping the hive this queen started on {name} \(pid \d+\)", text), text
    assert f"Hive on {name} stopped" in text and "queen-rbee stopped" in text, text


@then(parsers.parse("the queen exits {code:d}"))
def _queen_exits(world, code):
    assert world.queen_exit == code, world.queen.text()


@then(parsers.parse('the queen\'s log says it stopped the hive it started on "{mine}", and nothing about "{found}"'))
def _stopped_mine(world, mine, found):
    text = world.queen.text()
    [pid] = world.hives_after_infer[mine]
    assert f"Stopping the hive this queen started on {mine} (pid {pid})" in text and f"Hive on {mine} stopped" in text, text
    assert f"hive this queen started on {found}" not in text and f"Hive on {found}" not in text, text


@then(parsers.parse("the keeper took under {limit:d} s from its start to its exit"))
def _under(world, limit):
    run = _last(world)
    assert run.seconds < limit, run.seconds
