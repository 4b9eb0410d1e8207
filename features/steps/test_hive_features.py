"""Steps for hive_preflight.feature, hive_workers.feature and hive_lifecycle.feature,
against real rbee-hive processes (the real worker where the engine matters, the
stand-in worker process where only the hive's behaviour is under test)."""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
from pathlib import Path

import grpc
import psutil
import pytest
from pytest_bdd import given, parsers, scenarios, then, when

from rbee.auth import auth_metadata
from rbee.backends import backend_enum
from rbee.enum_words import HIVE_STATUSES, RESOURCES
from rbee.channel import CHANNEL_OPTIONS
from rbee.errors import RbeeError, from_rpc_error
from rbee.narration import stage_of
from rbee.v1 import common_pb2, inference_pb2, inference_pb2_grpc, preflight_pb2
from features.steps.hive_support import IDLE, MB, Hive, gone, start_hive, tiny_model, write_figures
from tests.fixtures.common import VENV_BIN, proc_env
from tests.fixtures.hive import HIVE_KEY

scenarios("hive_preflight.feature", "hive_workers.feature", "hive_lifecycle.feature")

MODEL_MB = 1000


@pytest.fixture
def ctx(tmp_path: Path):
    state: dict = {"tmp": tmp_path, "hives": [], "sockets": []}
    yield state
    for sock in state["sockets"]:
        sock.close()
    for hive in state["hives"]:
        hive.close()


def _start(ctx: dict, binary: Path | None = None, **env: str) -> Hive:
    env.setdefault("STANDIN_CHILD", "1")  # stand-in workers get a child process, like an engine's
    hive = start_hive(ctx["tmp"] / f"home-{len(ctx['hives'])}", binary, env)
    ctx["hives"].append(hive)
    ctx["hive"] = hive
    return hive


def _figures(ctx: dict, **figures) -> Path:
    ctx["figures"] = figures
    return write_figures(ctx["tmp"] / "figures.json", **figures)


def _gpu(free: int) -> dict:
    return {"name": "Pinned GPU", "vram_total_bytes": 24000 * MB, "vram_available_bytes": free}


def _refusal(ctx: dict, call) -> None:
    try:
        ctx["result"] = call()
        ctx["error"] = None
    except RbeeError as err:
        ctx["error"] = err


# -- hives ----------------------------------------------------------------------


@given("a running hive")
def _hive(ctx):
    _start(ctx)


@given("a running hive with the stand-in worker program")
def _hive_standin(ctx, standin_program):
    _start(ctx, standin_program)


@given("a running hive with the real worker program")
def _hive_real(ctx):
    _start(ctx, VENV_BIN / "llm-worker-rbee")


@given("a running hive with a worker program that fails to load models")
def _hive_failing(ctx, standin_program):
    _start(ctx, standin_program, STANDIN_FAIL_LOAD="1")


@given("a running hive whose worker program is not installed")
def _hive_no_program(ctx):
    ctx["expected_program"] = ctx["tmp"] / "not-installed" / "llm-worker-rbee"
    _start(ctx, ctx["expected_program"])


@given(parsers.parse("a running hive whose {resource} figure is pinned to exactly what a 1000 MB model needs"))
def _hive_pinned(ctx, resource):
    need = math.ceil(MODEL_MB * MB * 1.2)
    figures = {"ram_available_bytes": 64000 * MB, "disk_available_bytes": 500000 * MB, "gpus": [_gpu(24000 * MB)]}
    if resource == "ram":
        figures["ram_available_bytes"] = need
    elif resource == "vram":
        figures["gpus"] = [_gpu(need)]
    else:
        figures["disk_available_bytes"] = MODEL_MB * MB
    ctx["resource"] = resource
    _start(ctx, RBEE_HIVE_RESOURCE_OVERRIDES=str(_figures(ctx, **figures)))


@given(parsers.parse("a running hive with {mb:d} MB of free disk"))
def _hive_disk(ctx, mb):
    _start(ctx, RBEE_HIVE_RESOURCE_OVERRIDES=str(_figures(ctx, disk_available_bytes=mb * MB)))


@given("a running hive without GPUs")
def _hive_no_gpu(ctx):
    _start(ctx, RBEE_HIVE_RESOURCE_OVERRIDES=str(_figures(ctx, gpus=[])))


@given("a running hive with two pinned GPUs")
def _hive_two_gpus(ctx):
    _start(ctx, RBEE_HIVE_RESOURCE_OVERRIDES=str(_figures(ctx, gpus=[_gpu(24000 * MB), _gpu(24000 * MB)])))


@given(parsers.parse("a running hive with {mb:d} MB of available RAM"))
def _hive_ram(ctx, mb, standin_program):
    _start(ctx, standin_program, RBEE_HIVE_RESOURCE_OVERRIDES=str(_figures(ctx, ram_available_bytes=mb * MB)))


@given(parsers.parse("a running hive checking health every {seconds} seconds"))
def _hive_health(ctx, seconds, standin_program):
    _start(ctx, standin_program, RBEE_HIVE_HEALTH_INTERVAL=seconds, RBEE_HIVE_HEALTH_TIMEOUT=seconds)


@given(parsers.parse("a running hive with an idle timeout of {seconds} seconds"))
def _hive_idle(ctx, seconds, standin_program):
    _start(ctx, standin_program, RBEE_HIVE_IDLE_TIMEOUT=seconds)


@given(parsers.parse("a running hive with a shutdown grace of {seconds} seconds"))
def _hive_grace(ctx, seconds, standin_program):
    _start(ctx, standin_program, RBEE_HIVE_SHUTDOWN_GRACE=seconds, STANDIN_IGNORE_SHUTDOWN_FOR="stubborn")


# -- health and detect ---------------------------------------------------------------


@when("I ask the hive for its health")
def _ask_health(ctx):
    hive = ctx["hive"]
    ctx["health"] = hive.call(hive.preflight.GetHiveHealth, preflight_pb2.GetHiveHealthRequest())


@then(parsers.parse('it answers status "{status}", version "{version}" and API version "{api}"'))
def _health_is(ctx, status, version, api):
    h = ctx["health"]
    assert (HIVE_STATUSES.word(h.hive_status), h.version, h.api_version) == (status, version, api)


@then("the same call without the API key is refused with MISSING_API_KEY")
def _health_needs_key(ctx):
    hive = ctx["hive"]
    with pytest.raises(Exception) as exc:
        hive.preflight.GetHiveHealth(preflight_pb2.GetHiveHealthRequest(), timeout=10)
    assert from_rpc_error(exc.value).code == "MISSING_API_KEY"


@when("I run rbee-hive detect with two pinned GPUs")
def _detect(ctx):
    (ctx["tmp"] / "c.toml").write_text("")
    figures = _figures(ctx, gpus=[_gpu(8 * MB), _gpu(8 * MB)])
    ctx["detect"] = subprocess.run(
        [str(VENV_BIN / "rbee-hive"), "detect"],
        capture_output=True,
        text=True,
        timeout=120,
        env=proc_env(RBEE_CONFIG=str(ctx["tmp"] / "c.toml"), RBEE_HIVE_RESOURCE_OVERRIDES=str(figures)),
    )
    assert ctx["detect"].returncode == 0, ctx["detect"].stderr


@then(parsers.re(r"it prints [\"'](?P<text>.+)[\"']$"))
def _detect_prints(ctx, text):
    assert any(line.startswith(text) for line in ctx["detect"].stdout.splitlines()), ctx["detect"].stdout


# -- resource checks ---------------------------------------------------------------


@when(parsers.parse("I check a 1000 MB model on {backend} device {device:d}"))
def _check(ctx, backend, device):
    hive = ctx["hive"]
    request = preflight_pb2.CheckWorkerResourcesRequest(
        model_size_bytes=MODEL_MB * MB, backend=backend_enum(backend), device=device, needs_download=True
    )
    _refusal(ctx, lambda: hive.call(hive.preflight.CheckWorkerResources, request))


@then(parsers.parse("the check passes with {resource} {required:d} MB needed and {available:d} MB available"))
def _check_passes(ctx, resource, required, available):
    assert ctx["error"] is None, ctx["error"]
    check = next(c for c in ctx["result"].checks if RESOURCES.word(c.resource) == resource)
    assert check.passed and (check.required_bytes, check.available_bytes) == (required * MB, available * MB)


@when(parsers.parse("the hive's {resource} figure drops by one byte"))
def _drop(ctx, resource):
    figures = dict(ctx["figures"])
    if resource == "ram":
        figures["ram_available_bytes"] -= 1
    elif resource == "vram":
        figures["gpus"] = [_gpu(figures["gpus"][0]["vram_available_bytes"] - 1)]
    else:
        figures["disk_available_bytes"] -= 1
    _figures(ctx, **figures)  # the hive re-reads the file on every query


@then(parsers.parse("it is refused with {code}"))
def _refused(ctx, code):
    assert ctx["error"] is not None, "expected a refusal"
    assert ctx["error"].code == code
    if code in ("INSUFFICIENT_RAM", "VRAM_EXHAUSTED", "INSUFFICIENT_DISK"):
        assert int(ctx["error"].details["available_mb"]) < int(ctx["error"].details["required_mb"])


@then(parsers.parse('the refusal says to free {mb:d} MB and suggests "{suggestion}"'))
def _free(ctx, mb, suggestion):
    assert ctx["error"].details["to_free_mb"] == str(mb)
    assert any(suggestion in s for s in ctx["error"].suggestions)


@then('the refusal says CUDA is not available and lists "cpu" as available')
def _no_cuda(ctx):
    err = ctx["error"]
    assert "CUDA" in err.message and "not available" in err.message
    assert err.details["available"] == "cpu"


@then(parsers.parse('the message is "{message}"'))
def _message(ctx, message):
    assert ctx["error"].message == message


# -- spawns ------------------------------------------------------------------------


@when(parsers.parse("I spawn a worker for a {mb:d} MB model on cpu device 0"))
def _spawn_sized(ctx, mb):
    model = tiny_model(ctx["tmp"] / "sized-model", mb * MB)
    _refusal(ctx, lambda: ctx["hive"].spawn(model_path=str(model), backend="cpu", device=0))


@then(parsers.parse("the spawn is refused with INSUFFICIENT_RAM, {mb:d} MB required"))
def _spawn_no_ram(ctx, mb):
    assert ctx["error"].code == "INSUFFICIENT_RAM" and ctx["error"].details["required_mb"] == str(mb)


@then("the hive has no child process and no worker")
def _no_child(ctx):
    hive = ctx["hive"]
    assert psutil.Process(hive.proc.pid).children(recursive=True) == []
    assert hive.list() == []


@then("the spawn is refused with WORKER_BINARY_NOT_FOUND naming the expected path")
def _no_binary(ctx):
    assert ctx["error"].code == "WORKER_BINARY_NOT_FOUND"
    assert ctx["error"].message == f"Worker binary not found: {ctx['expected_program']}"


@then("the refusal suggests installing the worker")
def _install_hint(ctx):
    assert any("install" in s for s in ctx["error"].suggestions)


@when("I spawn a worker for the default model on cpu device 0")
def _spawn_default(ctx, default_model):
    ctx["spawn"] = ctx["hive"].spawn(model_path=str(default_model), backend="cpu", device=0, model_ref="hf:HuggingFaceTB/SmolLM2-135M-Instruct")


@then("the spawn answers at once with the worker in state loading")
def _loading(ctx):
    assert ctx["spawn"].worker.state == common_pb2.WORKER_STATE_LOADING
    ctx["items"], ctx["follow_error"] = ctx["hive"].follow(ctx["spawn"].worker.id)
    assert ctx["follow_error"] is None, ctx["follow_error"]


@then("following it shows the worker's own narration and its loading stages")
def _narration(ctx):
    actors = {i.narration.actor for i in ctx["items"] if i.HasField("narration")}
    assert {"llm-worker-rbee", "model-loader", "rbee-hive"} <= actors
    assert [stage_of(i.progress) for i in ctx["items"] if i.HasField("progress")][-1] == "ready"


@then("the follow stream ends with the worker idle, registered by its callback")
def _idle(ctx):
    last = ctx["items"][-1]
    assert last.worker.state == IDLE
    assert any("called back" in i.narration.message for i in ctx["items"] if i.HasField("narration"))
    assert [w.id for w in ctx["hive"].list(state=IDLE)] == [last.worker.id]
    ctx["worker"] = last.worker


@then("the worker streams tokens for a prompt")
def _tokens(ctx):
    with grpc.insecure_channel(ctx["worker"].address, options=CHANNEL_OPTIONS) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        msgs = list(
            stub.Generate(
                inference_pb2.GenerateRequest(prompt="Say hello.", max_tokens=5, temperature=0),
                metadata=auth_metadata(ctx["spawn"].worker_api_key),
                timeout=120,
            )
        )
    assert msgs[-1].final.tokens_generated == 5 and any(m.delta.text for m in msgs[:-1])


@then("its log file is under RBEE_HOME/logs")
def _log_file(ctx):
    path = ctx["hive"].home / "logs" / f"{ctx['worker'].id}.log"
    assert path == Path(ctx["spawn"].log_path) and "[model-loader]" in path.read_text()


@given("something listens on the hive's first worker port")
def _occupy(ctx):
    sock = socket.socket()
    sock.bind(("127.0.0.1", ctx["hive"].worker_ports[0]))
    sock.listen()
    ctx["sockets"].append(sock)


@when("I spawn a worker for a tiny model on cpu device 0")
def _spawn_tiny(ctx):
    model = tiny_model(ctx["tmp"] / "tiny-model")
    ctx["spawn"] = ctx["hive"].spawn(model_path=str(model), backend="cpu", device=0)
    ctx["items"], ctx["follow_error"] = ctx["hive"].follow(ctx["spawn"].worker.id)


@then("the worker listens on the next port")
def _next_port(ctx):
    assert ctx["follow_error"] is None
    assert ctx["spawn"].worker.address == f"127.0.0.1:{ctx['hive'].worker_ports[0] + 1}"


@then("the hive narrated that the first port is in use")
def _port_narrated(ctx):
    first = ctx["hive"].worker_ports[0]
    line = f"Port {first} is in use, trying port {first + 1}"
    assert any(line in i.narration.message for i in ctx["items"] if i.HasField("narration"))


@then("following it ends with WORKER_STARTUP_FAILED")
def _startup_failed(ctx):
    assert ctx["follow_error"] is not None and ctx["follow_error"].code == "WORKER_STARTUP_FAILED"


@then("the error carries the last lines of the worker's log and where the log is")
def _failure_lines(ctx):
    err = ctx["follow_error"]
    assert "MODEL_LOAD_FAILED" in err.details["last_log_lines"]
    assert err.details["log_path"] == ctx["spawn"].log_path


@then("the hive has no worker")
def _no_worker(ctx):
    assert ctx["hive"].list() == []


@given(parsers.parse('two idle workers for models "{a}" and "{b}"'))
def _two_workers(ctx, a, b):
    model = tiny_model(ctx["tmp"] / "shared-model")
    ctx["by_ref"] = {}
    for ref in (a, b):
        reply = ctx["hive"].spawn(model_path=str(model), backend="cpu", device=0, model_ref=ref)
        items, error = ctx["hive"].follow(reply.worker.id)
        assert error is None and items[-1].worker.state == IDLE
        ctx["by_ref"][ref] = items[-1].worker


@then(parsers.parse('listing by model "{ref}" shows only that worker'))
def _list_model(ctx, ref):
    assert [w.id for w in ctx["hive"].list(model_ref=ref)] == [ctx["by_ref"][ref].id]


@then(parsers.parse("listing by state {state} shows both"))
def _list_state_both(ctx, state):
    wanted = common_pb2.WorkerState.Value(f"WORKER_STATE_{state.upper()}")
    assert sorted(w.id for w in ctx["hive"].list(state=wanted)) == sorted(w.id for w in ctx["by_ref"].values())


@then(parsers.parse("listing by state {state} shows none"))
def _list_state_none(ctx, state):
    assert ctx["hive"].list(state=common_pb2.WorkerState.Value(f"WORKER_STATE_{state.upper()}")) == []


@when(parsers.parse('I shut down the worker for "{ref}" by its id'))
def _shutdown_one(ctx, ref):
    out = subprocess.run(
        [str(VENV_BIN / "rbee-keeper"), "workers", "shutdown", "--hive", ctx["hive"].address, "--api-key", HIVE_KEY, "--id", ctx["by_ref"][ref].id],
        capture_output=True, text=True, timeout=120, env=proc_env(RBEE_CONFIG=str(ctx["hive"].home / "no-config.toml")),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    ctx["stopped"] = ctx["by_ref"][ref]
    ctx["keeper_stderr"] = out.stderr


@then("its process has exited with code 0")
def _exited_zero(ctx):
    assert f"{ctx['stopped'].id} stopped (exited with code 0)" in ctx["keeper_stderr"]
    assert gone(ctx["stopped"].pid)


@then(parsers.parse('only the worker for "{ref}" is listed'))
def _only(ctx, ref):
    assert [w.id for w in ctx["hive"].list()] == [ctx["by_ref"][ref].id]


# -- supervision ---------------------------------------------------------------------


def _idle_worker(ctx, folder: str) -> common_pb2.WorkerInfo:
    hive = ctx["hive"]
    model = tiny_model(ctx["tmp"] / folder)
    reply = hive.spawn(model_path=str(model), backend="cpu", device=0)
    items, error = hive.follow(reply.worker.id)
    assert error is None and items[-1].worker.state == IDLE
    worker = items[-1].worker
    tree = {worker.pid} | {p.pid for p in psutil.Process(worker.pid).children(recursive=True)}
    assert len(tree) == 2
    ctx.setdefault("trees", {})[worker.id] = tree
    ctx["worker"] = worker
    return worker


@given("an idle worker with a child process")
def _idle_with_child(ctx):
    _idle_worker(ctx, "polite-model")


@given("an idle worker that ignores shutdown, with a child process")
def _stubborn(ctx):
    ctx["stubborn"] = _idle_worker(ctx, "stubborn-model")


@when("the worker is stopped with SIGSTOP")
def _sigstop(ctx):
    os.kill(ctx["worker"].pid, signal.SIGSTOP)


@when("the worker is killed with SIGKILL")
def _sigkill(ctx):
    os.kill(ctx["worker"].pid, signal.SIGKILL)


@then(parsers.parse("the hive narrates {n:d} failed health checks of that worker"))
def _failed_checks(ctx, n):
    w = ctx["worker"]
    ctx["hive"].wait_for_line(f"{w.id} failed {n} health checks in a row")
    text = ctx["hive"].text()
    for i in range(1, n + 1):
        assert f"Health check of {w.id} at {w.address} failed ({i}/{n})" in text


@then("the worker is removed and its process tree is gone")
def _removed(ctx):
    hive, w = ctx["hive"], ctx["worker"]
    hive.wait_for_line((f"{w.id} terminated", f"{w.id} died"))
    assert w.id not in [x.id for x in hive.list()]
    assert all(gone(pid) for pid in ctx["trees"][w.id])


@then("the hive narrates that the worker has been idle and shuts it down")
def _idle_narrated(ctx):
    w = ctx["worker"]
    ctx["hive"].wait_for_line(f"{w.id} has been idle for")
    ctx["hive"].wait_for_line(f"{w.id} terminated (exited with code 0)")


@then("the hive still spawns a new worker")
def _still_up(ctx):
    again = _idle_worker(ctx, "another-model")
    assert [w.id for w in ctx["hive"].list()] == [again.id]


@then("the hive narrates that the worker died, killed by SIGKILL")
def _died(ctx):
    line = ctx["hive"].wait_for_line(f"{ctx['worker'].id} died")
    assert "killed by SIGKILL" in line


@when("the hive receives SIGTERM")
def _sigterm(ctx):
    ctx["exit_code"] = ctx["hive"].terminate()


@then(parsers.parse("the hive exits with code {code:d}"))
def _exit_code(ctx, code):
    assert ctx["exit_code"] == code


@then("it narrated shutting down 2 workers, waiting, force-killing one, and terminated")
def _cascade_narration(ctx):
    text = ctx["hive"].text()
    stubborn = ctx["stubborn"].id
    for phrase in (
        "Shutting down 2 worker(s)",
        "Waiting up to 2s for each worker to exit",
        f"{stubborn} did not exit within 2s; force-killing its process tree",
        f"{stubborn} terminated (killed by SIGKILL)",
        "All workers terminated (1 force-killed); registry cleared",
    ):
        assert phrase in text, phrase


@then("no process of either worker remains")
def _no_orphans(ctx):
    pids = set().union(*ctx["trees"].values())
    assert len(pids) == 4
    assert [pid for pid in pids if not gone(pid)] == []
    assert ctx["hive"].alive() == []
