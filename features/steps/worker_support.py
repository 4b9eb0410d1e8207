"""Plain gRPC helpers the worker step modules share (blocking API: steps are
synchronous)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rbee.errors import RbeeError, from_rpc_error
from rbee.narration import stage_of
from rbee.v1 import common_pb2, inference_pb2, inference_pb2_grpc
from rbee_worker.loading_stages import STAGES
from tests.fixtures.common import STARTING_DAEMON_OPTIONS
from tests.fixtures.worker import WorkerProcess

WS = common_pb2.WorkerState
# The worker's first stage (before the engine reports any), then the engine's.
LOADING_STAGES = ("starting", *STAGES)
PROMPT = "Tell me about the life of a worker bee."
# Generous bounds for waits on a shared, busy machine; never asserted as speed.
SETTLE_S = 60.0


def scenario_state() -> Iterator[dict]:
    """The ``ctx`` fixture of each step module: a scenario's state; the requests
    it left streaming are closed at its end."""
    state: dict = {"streams": []}
    yield state
    for stream in state["streams"]:
        stream.close()


def the_shared_worker(real_worker: WorkerProcess) -> WorkerProcess:
    """Step 'a worker with the default model loaded' (registered in each step module)."""
    return real_worker


def stub(worker: WorkerProcess) -> tuple[grpc.Channel, inference_pb2_grpc.InferenceServiceStub]:
    channel = grpc.insecure_channel(worker.address, options=STARTING_DAEMON_OPTIONS)
    return channel, inference_pb2_grpc.InferenceServiceStub(channel)


def readiness(worker: WorkerProcess, metadata=None, wait_for_ready: bool = False) -> inference_pb2.GetReadinessResponse:
    channel, s = stub(worker)
    with channel:
        return s.GetReadiness(
            inference_pb2.GetReadinessRequest(),
            metadata=worker.metadata if metadata is None else metadata,
            timeout=SETTLE_S if wait_for_ready else 10,
            wait_for_ready=wait_for_ready,
        )


def health(worker: WorkerProcess, wait_for_ready: bool = False) -> int:
    with grpc.insecure_channel(worker.address, options=STARTING_DAEMON_OPTIONS) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=SETTLE_S if wait_for_ready else 10,
            wait_for_ready=wait_for_ready,
        )
    return reply.status


def rpc_error(call) -> RbeeError:
    """Run ``call()``, expecting it to fail; the RbeeError it failed with."""
    try:
        result = call()
        if hasattr(result, "__iter__"):
            list(result)
    except grpc.RpcError as err:
        return from_rpc_error(err)
    raise AssertionError("the call succeeded")


def generate_all(worker: WorkerProcess, **fields) -> list[inference_pb2.GenerateResponse]:
    channel, s = stub(worker)
    with channel:
        return list(s.Generate(inference_pb2.GenerateRequest(**fields), metadata=worker.metadata, timeout=300))


def request(max_tokens: int, **fields) -> inference_pb2.GenerateRequest:
    fields.setdefault("prompt", PROMPT)
    fields.setdefault("request_id", f"feature-{uuid.uuid4().hex[:10]}")
    return inference_pb2.GenerateRequest(max_tokens=max_tokens, **fields)


class Stream:
    """A request left streaming on its own channel; returns once the first
    tokens arrived."""

    def __init__(self, worker: WorkerProcess, max_tokens: int, ignore_eos: bool = True) -> None:
        self.worker = worker
        self.channel, s = stub(worker)
        self.request = request(max_tokens, temperature=0.0, ignore_eos=ignore_eos)
        self.request_id = self.request.request_id
        self.call = s.Generate(self.request, metadata=worker.metadata)
        self.messages = [next(self.call)]
        assert self.messages[0].HasField("delta")

    def rest(self) -> list[inference_pb2.GenerateResponse]:
        self.messages.extend(self.call)
        return self.messages

    @property
    def final(self) -> inference_pb2.GenerateFinal:
        last = self.messages[-1]
        assert last.HasField("final"), "the stream has not ended with a final event"
        return last.final

    def close(self) -> None:
        self.call.cancel()
        self.channel.close()


def track_stream(ctx: dict, worker: WorkerProcess, max_tokens: int) -> Stream:
    """A Stream the scenario's ``ctx`` fixture closes at the end."""
    stream = Stream(worker, max_tokens=max_tokens)
    ctx["streams"].append(stream)
    return stream


def run_keeper(ctx: dict, keeper, *args: str, env: dict[str, str] | None = None) -> None:
    """Run rbee-keeper to its end; the process and its exit code go into ``ctx``."""
    run = keeper(*args, env=env)
    ctx["keeper"] = run
    ctx["code"] = run.finish()


def keeper_exit_code(ctx: dict, code: int) -> None:
    """Step 'rbee-keeper exits with code N' (registered in each step module)."""
    assert ctx["code"] == code, ctx["keeper"].describe()


def wait_until(condition, what: str, timeout: float = SETTLE_S, every: float = 0.1) -> None:
    # The worker has no push API for its slot count; ask until it holds.
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(every)


def slots_free(worker: WorkerProcess) -> bool:
    return readiness(worker).slots_busy == 0


def loading_stage_problem(messages) -> str | None:
    """Why ``messages`` (a StreamLoadingProgress) do not show the loading's
    stages in order, or None. The stream must have been followed while the
    worker loaded: a single 'idle' message shows no stages at all."""
    progress = [m.progress for m in messages if m.HasField("progress") and stage_of(m.progress)]
    stages = list(dict.fromkeys(stage_of(p) for p in progress))
    if messages and messages[0].state != WS.WORKER_STATE_LOADING:
        return f"the stream began in state {WS.Name(messages[0].state)}, not while loading"
    if len(stages) < 2:
        return f"fewer than two loading stages: {stages}"
    unknown = [s for s in stages if s not in LOADING_STAGES]
    if unknown:
        return f"stages the worker does not have: {unknown} (known: {LOADING_STAGES})"
    order = [LOADING_STAGES.index(stage_of(p)) for p in progress]
    if order != sorted(order):
        return f"stages out of order: {[stage_of(p) for p in progress]}"
    done = [p.done for p in progress]
    if done != sorted(done):
        return f"done goes backwards: {done}"
    if not all(p.total > 0 and p.done <= p.total for p in progress):
        return f"done/total inconsistent: {[(p.done, p.total) for p in progress]}"
    return None
