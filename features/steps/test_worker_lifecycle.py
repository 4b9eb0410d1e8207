"""Steps for worker_lifecycle.feature.

One worker with a single slot is started for this module and followed
through its life in the order of the scenarios: loading, loaded, busy, and
last, draining (which ends it). Key and validation scenarios use the shared
real worker, or no worker at all.
"""

from __future__ import annotations

import threading
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2
from pytest_bdd import given, parsers, scenarios, then, when

from rbee.auth import auth_metadata
from rbee.errors import from_rpc_error
from rbee.narration import stage_of
from rbee.v1 import common_pb2, inference_pb2
from features.steps.worker_support import (
    PROMPT,
    SETTLE_S,
    health,
    keeper_exit_code,
    loading_stage_problem,
    readiness,
    request,
    rpc_error,
    run_keeper,
    scenario_state,
    stub,
    the_shared_worker,
    track_stream,
)
from tests.fixtures.worker import running_worker

pytestmark = pytest.mark.engine

scenarios("worker_lifecycle.feature")

WS = common_pb2.WorkerState


class LoadingFollower:
    """Follows a worker's StreamLoadingProgress from the moment its server is
    up, on a thread, recording every message: what 'following the loading'
    sees, whatever a scenario before it took, with no race against the load."""

    def __init__(self, worker) -> None:
        self.messages: list[inference_pb2.StreamLoadingProgressResponse] = []
        self.error: grpc.RpcError | None = None
        self._thread = threading.Thread(target=self._run, args=(worker,), name="loading-follower", daemon=True)
        self._thread.start()

    def _run(self, worker) -> None:
        channel, s = stub(worker)
        with channel:
            try:
                for msg in s.StreamLoadingProgress(
                    inference_pb2.StreamLoadingProgressRequest(), metadata=worker.metadata, timeout=600, wait_for_ready=True
                ):
                    self.messages.append(msg)
            except grpc.RpcError as err:
                self.error = err

    def result(self, timeout: float = 600) -> list[inference_pb2.StreamLoadingProgressResponse]:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the loading stream did not end"
        assert self.error is None, self.error
        return self.messages


@pytest.fixture(scope="module")
def young(default_model: Path, tmp_path_factory: pytest.TempPathFactory):
    """A worker started without waiting for the model, so the first scenarios
    see it load, and the follower of its loading, attached from the start."""
    with running_worker(default_model, tmp_path_factory.mktemp("lifecycle-worker"), slots=1, wait=False) as worker:
        yield worker, LoadingFollower(worker)


@pytest.fixture(scope="module")
def young_worker(young):
    return young[0]


ctx_fixture = pytest.fixture(scenario_state, name="ctx")


@given("a worker with one slot has just been started", target_fixture="worker")
def _young(young_worker):
    assert young_worker.alive(), young_worker.log_tail()
    return young_worker


given("a worker with the default model loaded", target_fixture="worker")(the_shared_worker)


@given("the worker is loaded")
def _loaded(worker):
    worker.wait_loaded()


# -- before and during loading -------------------------------------------------


@then('its readiness answers "loading" with the current loading stage')
def _answers_loading(worker):
    # The first answer comes as soon as the server is up; the engine takes far longer.
    ready = readiness(worker, wait_for_ready=True)
    assert ready.state == WS.WORKER_STATE_LOADING and not ready.model_loaded, ready
    assert stage_of(ready.progress) and ready.progress.total > 0
    assert ready.slots_total == 1


@then(parsers.re(r"its health check answers (?P<status>[A-Z_]+)$"))
def _health(worker, status):
    assert health(worker, wait_for_ready=True) == health_pb2.HealthCheckResponse.ServingStatus.Value(status)


@then("a request sent now is refused with MODEL_LOADING")
def _refused_loading(worker):
    channel, s = stub(worker)
    with channel:
        err = rpc_error(lambda: s.Generate(request(4), metadata=worker.metadata, timeout=30))
    assert err.code == "MODEL_LOADING", err


@when("I follow its loading progress")
def _follow(young, ctx):
    ctx["loading"] = young[1].result()


@then("I see loading stages in order, each with how many of how many are done")
def _stages(ctx):
    problem = loading_stage_problem(ctx["loading"])
    assert problem is None, problem


@then("the last message says the worker is idle")
def _last_idle(ctx):
    assert ctx["loading"][-1].state == WS.WORKER_STATE_IDLE


@then(parsers.parse('its readiness answers "idle" with the model loaded and {busy:d} of {total:d} slots busy'))
def _answers_idle(worker, busy, total):
    ready = readiness(worker)
    assert ready.state == WS.WORKER_STATE_IDLE and ready.model_loaded
    assert (ready.slots_busy, ready.slots_total) == (busy, total)
    assert ready.max_model_len > 0 and ready.engine_version


# -- busy ---------------------------------------------------------------------


@given("a long request is streaming on it", target_fixture="stream")
def _long_stream(worker, ctx):
    return track_stream(ctx, worker, 1500)


@when("another request is sent")
def _another(worker, ctx):
    channel, s = stub(worker)
    with channel:
        ctx["error"] = rpc_error(lambda: s.Generate(request(4), metadata=worker.metadata, timeout=30))


@then("it is refused with ALL_SLOTS_BUSY, 1 slot total and 1 busy")
def _busy(ctx):
    err = ctx["error"]
    assert err.code == "ALL_SLOTS_BUSY", err
    assert (err.details["slots_total"], err.details["slots_busy"]) == ("1", "1")


@when("I run rbee-keeper infer against that worker")
def _keeper_against(worker, keeper, ctx):
    run_keeper(ctx, keeper, "infer", "--worker", worker.address, "--prompt", PROMPT, "--max-tokens", "4",
               env={"RBEE_API_KEY": worker.api_key})


@then("rbee-keeper retries after 1, 2 and 4 seconds, saying how busy the worker is")
def _retries(ctx):
    lines = [l for l in ctx["keeper"].stderr.splitlines() if "is busy" in l]
    assert len(lines) == 3, ctx["keeper"].describe()
    for n, (line, delay) in enumerate(zip(lines, ("1s", "2s", "4s")), start=1):
        assert f"retry {n} of 3 in {delay}" in line and "1/1 slots busy" in line


@then("rbee-keeper exits with code 1, suggesting to wait, start another worker or raise the slots")
def _busy_exit(ctx):
    err = ctx["keeper"].stderr
    assert ctx["code"] == 1 and "❌ ALL_SLOTS_BUSY" in err
    assert "Wait for the running requests" in err and "another worker" in err and "--slots" in err


@then("rbee-keeper printed nothing on stdout")
def _nothing_printed(ctx):
    assert ctx["keeper"].stdout == ""


# -- keys ---------------------------------------------------------------------


@when(parsers.parse("a client calls GetReadiness {with_key}"))
def _readiness_with(worker, ctx, with_key):
    metadata = () if with_key == "without a key" else auth_metadata("wrong-" + worker.api_key)
    ctx["error"] = rpc_error(lambda: readiness(worker, metadata=metadata))


@then(parsers.parse("the call fails with {code}"))
def _fails_with(ctx, code):
    assert ctx["error"].code == code
    assert ctx["error"].details.get("grpc_status") is None  # our error, not a transport failure


@then("its health check answers SERVING to a client without a key")
def _health_open(worker):
    assert health(worker) == health_pb2.HealthCheckResponse.SERVING


@when("I run rbee-keeper infer against the worker with a wrong key in RBEE_API_KEY")
def _keeper_wrong_key(worker, keeper, ctx):
    run_keeper(ctx, keeper, "infer", "--worker", worker.address, "--prompt", PROMPT, env={"RBEE_API_KEY": "not-the-key"})


then(parsers.parse("rbee-keeper exits with code {code:d}"))(keeper_exit_code)


@then("the error names the worker's address and RBEE_API_KEY as the key's source")
def _names_host(worker, ctx):
    err = ctx["keeper"].stderr
    assert "❌ INVALID_API_KEY" in err and f"host: {worker.address}" in err and "key_from: RBEE_API_KEY" in err
    assert "not-the-key" not in err


# -- validation -----------------------------------------------------------------


@when(parsers.parse("I run rbee-keeper infer against a closed port with {option} {value}"))
def _keeper_bad_input(keeper, ctx, option, value):
    # Nothing listens on port 1 of loopback: a connection attempt would fail visibly.
    run_keeper(ctx, keeper, "infer", "--worker", "127.0.0.1:1", "--api-key", "k", "--prompt", "hi", option, value)


@then(parsers.parse("the error is {code} and names {option}"))
def _error_names(ctx, code, option):
    line = next(l for l in ctx["keeper"].stderr.splitlines() if "❌" in l)
    assert f"❌ {code}:" in line
    assert option in ctx["keeper"].stderr or option.lstrip("-") in line.lower()


@then("rbee-keeper did not try to connect")
def _no_connection(ctx):
    err = ctx["keeper"].stderr
    assert "Sending the request" not in err and "Cannot reach" not in err and "UNREACHABLE" not in err


# -- draining -------------------------------------------------------------------


@given(parsers.parse("a request of {n:d} tokens is streaming on it"), target_fixture="stream")
def _short_stream(worker, ctx, n):
    return track_stream(ctx, worker, n)


@when("the worker is told to shut down")
def _shutdown(worker, ctx):
    import psutil

    ctx["engine_procs"] = psutil.Process(worker.pid).children(recursive=True)
    assert ctx["engine_procs"], "vLLM runs its engine in child processes"
    channel, s = stub(worker)
    with channel:
        # The drain bound is not under test: long enough for 60 tokens on a loaded machine.
        ctx["shutdown"] = s.Shutdown(inference_pb2.ShutdownRequest(drain_timeout_ms=600_000), metadata=worker.metadata,
                                     timeout=10)
    assert ctx["shutdown"].in_flight == 1


@then('its readiness answers "draining"')
def _answers_draining(worker):
    assert readiness(worker).state == WS.WORKER_STATE_DRAINING


@then("a new request is refused with WORKER_DRAINING as busy")
def _refused_draining(worker):
    channel, s = stub(worker)
    with channel:
        try:
            list(s.Generate(request(4), metadata=worker.metadata, timeout=30))
        except grpc.RpcError as exc:
            status, err = exc.code(), from_rpc_error(exc)
        else:
            raise AssertionError("a draining worker accepted a request")
    assert err.code == "WORKER_DRAINING" and status == grpc.StatusCode.RESOURCE_EXHAUSTED


@then(parsers.parse('the streaming request still finishes with finish reason "{reason}"'))
def _still_finishes(stream, reason):
    stream.rest()
    assert stream.final.reason == inference_pb2.FinishReason.Value(f"FINISH_REASON_{reason.upper()}")
    assert stream.final.tokens_generated == stream.request.max_tokens


@then(parsers.parse("the worker process exits with code {code:d}"))
def _exits(worker, code):
    assert worker.proc.wait(timeout=SETTLE_S * 2) == code, worker.log_tail()


@then("its engine processes are gone and its log tells a clean stop")
def _clean_stop(worker, ctx):
    import psutil

    _gone, alive = psutil.wait_procs(ctx["engine_procs"], timeout=30)
    assert not alive, f"engine processes left behind: {alive}"
    log = worker.log_text()
    assert "Unloading model" in log and "stopped (exit 0)" in log, worker.log_tail()
    assert "Traceback" not in log and "EngineDeadError" not in log, "a clean shutdown logs no traceback"
    assert worker.api_key not in log
