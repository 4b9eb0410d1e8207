"""The front door's metrics (rbee_queen/http/metrics.py) read back through
Prometheus' own text parser: one registry per queen, request figures as a
request goes, bounded labels, and the cluster's workers and nodes read from
a real worker registry fed the hive's change messages at scrape time."""

from __future__ import annotations

import prometheus_client
import pytest

from rbee.v1 import common_pb2, registry_pb2
from rbee_queen.http.metrics import NO_NODE, UNRESOLVED, ClusterCollector, QueenMetrics
from rbee_queen.workers import ClusterWorkers
from tests.fixtures.metrics import Samples, parse_metrics, sample

State = common_pb2.WorkerState
REF = "hf:HuggingFaceTB/SmolLM2-135M-Instruct"


def samples(metrics: QueenMetrics) -> Samples:
    return parse_metrics(metrics.exposition().decode())


def value(metrics: QueenMetrics, name: str, **labels: str) -> float:
    return sample(samples(metrics), name, **labels)


def names(metrics: QueenMetrics) -> set[str]:
    return {name for name, _ in samples(metrics)}


ROUTE = "/v1/chat/completions"


def test_n_requests_are_counted_n_times_with_their_latencies_and_tokens() -> None:
    m = QueenMetrics()
    o = m.proxy_observer()
    n = 5
    for _ in range(n):
        o.request_started(ROUTE, REF, "box")
        o.first_token(ROUTE, REF, "box", 0.2)
        o.tokens(ROUTE, REF, "box", 3, 0.03)  # three tokens 30 ms after the first: 10 ms each
        o.tokens(ROUTE, REF, "box", 2, 0.04)
        o.request_finished(ROUTE, REF, "box", 200, 1.5, 7, 6)
    assert value(m, "rbee_requests_total", model=REF, node="box", status="200") == n
    assert value(m, "rbee_time_to_first_token_seconds_count", model=REF) == n
    assert value(m, "rbee_time_to_first_token_seconds_bucket", model=REF, le="0.25") == n
    assert value(m, "rbee_time_to_first_token_seconds_bucket", model=REF, le="0.1") == 0
    assert value(m, "rbee_inter_token_latency_seconds_count", model=REF) == n * 5  # per token after the first
    assert value(m, "rbee_inter_token_latency_seconds_sum", model=REF) == pytest.approx(n * 0.07)
    assert value(m, "rbee_e2e_request_latency_seconds_count", model=REF) == n
    assert value(m, "rbee_e2e_request_latency_seconds_bucket", model=REF, le="+Inf") == n
    assert value(m, "rbee_prompt_tokens_total", model=REF) == 7 * n
    assert value(m, "rbee_generation_tokens_total", model=REF) == 6 * n


def test_a_client_that_went_away_and_an_error_are_statuses_of_their_own() -> None:
    m = QueenMetrics()
    o = m.proxy_observer()
    o.request_finished(ROUTE, REF, "box", 499, 0.5, 3, 1)
    o.request_finished(ROUTE, REF, "box", 503, 300.0, 0, 0)
    assert value(m, "rbee_requests_total", model=REF, node="box", status="499") == 1
    assert value(m, "rbee_requests_total", model=REF, node="box", status="503") == 1
    assert value(m, "rbee_time_to_first_token_seconds_count", model=REF) == 0
    assert value(m, "rbee_generation_tokens_total", model=REF) == 1


def test_unknown_models_never_become_labels() -> None:
    m = QueenMetrics()
    o = m.proxy_observer()
    for _ in ("made-up-1", "made-up-2", "../../etc"):
        o.request_refused(ROUTE, 404)  # refused before its model resolved: the name is not passed on
    o.request_refused(ROUTE, 401)
    assert value(m, "rbee_requests_total", model=UNRESOLVED, node=NO_NODE, status="404") == 3
    assert value(m, "rbee_requests_total", model=UNRESOLVED, node=NO_NODE, status="401") == 1
    text = m.exposition().decode()
    assert "made-up" not in text and "etc" not in text


def test_a_well_formed_reference_nobody_has_is_no_label_either() -> None:
    # Any well-formed reference routes to a cold start (a download): until the
    # cluster serves it, it is not a label, or names would mint series.
    live = {"hf:org/loaded"}
    m = QueenMetrics(loaded=lambda: live)
    o = m.proxy_observer()
    for i in range(3):
        o.request_finished(ROUTE, f"hf:nobody/thing-{i}", "box", 404, 0.1, 0, 0)
        m.observer()("cold_start_done", model=f"hf:nobody/thing-{i}", node="box", seconds=1.0, outcome="failed")
    o.request_finished(ROUTE, "hf:org/loaded", "box", 429, 0.01, 0, 0)  # busy, but its worker is live
    assert value(m, "rbee_requests_total", model=UNRESOLVED, node="box", status="404") == 3
    assert value(m, "rbee_cold_starts_total", model=UNRESOLVED, node="box", outcome="failed") == 3
    assert value(m, "rbee_requests_total", model="hf:org/loaded", node="box", status="429") == 1
    assert "nobody" not in m.exposition().decode()
    # Once served (a cold start that got its worker), the reference is a label for good.
    m.observer()("cold_start_done", model="hf:nobody/thing-0", node="box", seconds=9.0, outcome="ready")
    o.request_finished(ROUTE, "hf:nobody/thing-0", "box", 503, 0.1, 0, 0)
    assert value(m, "rbee_requests_total", model="hf:nobody/thing-0", node="box", status="503") == 1


def test_cold_starts_and_their_duration_by_outcome() -> None:
    m = QueenMetrics()
    observe = m.observer()
    observe("cold_start_done", model=REF, node="box", seconds=12.5, outcome="ready")
    observe("cold_start_done", model=REF, node="box", seconds=3.0, outcome="failed")
    observe("warm", model=REF, node="box")  # not a metric of its own
    assert value(m, "rbee_cold_starts_total", model=REF, node="box", outcome="ready") == 1
    assert value(m, "rbee_cold_starts_total", model=REF, node="box", outcome="failed") == 1
    assert value(m, "rbee_cold_start_duration_seconds_sum", model=REF, node="box", outcome="ready") == 12.5
    assert value(m, "rbee_cold_start_duration_seconds_bucket", model=REF, node="box", outcome="ready", le="10.0") == 0
    assert value(m, "rbee_cold_start_duration_seconds_bucket", model=REF, node="box", outcome="ready", le="20.0") == 1


def test_each_queen_has_its_own_registry_and_the_global_one_is_untouched() -> None:
    a, b = QueenMetrics(), QueenMetrics()
    a.proxy_observer().request_refused(ROUTE, 200)
    assert value(a, "rbee_requests_total", model=UNRESOLVED, node=NO_NODE, status="200") == 1
    assert value(b, "rbee_requests_total", model=UNRESOLVED, node=NO_NODE, status="200") == 0
    assert "rbee_requests" not in prometheus_client.generate_latest(prometheus_client.REGISTRY).decode()
    assert all(name.startswith("rbee_") for name in names(a))


def worker(wid: str, state: int, total: int, available: int) -> common_pb2.WorkerInfo:
    return common_pb2.WorkerInfo(id=wid, model_ref=REF, state=state, slots_total=total, slots_available=available, backend=common_pb2.BACKEND_CPU)


def test_workers_and_nodes_are_read_from_the_registry_at_each_scrape() -> None:
    registry = ClusterWorkers(stale_after_s=120)
    nodes = ["box", "far"]
    load = ({REF: 2}, {"hf:org/cold": 1})
    m = QueenMetrics(ClusterCollector(registry.list, lambda: nodes, registry.heard_from, lambda: load))
    assert value(m, "rbee_requests_running", model=REF) == 2
    assert value(m, "rbee_requests_queued", model="hf:org/cold") == 1
    assert value(m, "rbee_node_up", node="box") == 0  # nothing heard yet
    registry.apply("box", "127.0.0.1:7900", registry_pb2.WatchWorkersResponse(
        hive_instance="h1", seq=1, snapshot=True,
        workers=[worker("w1", State.WORKER_STATE_BUSY, 4, 1), worker("w2", State.WORKER_STATE_IDLE, 2, 2)],
    ))  # fmt: skip
    labels = dict(node="box", worker="w1", model=REF)
    assert value(m, "rbee_worker_slots_busy", **labels) == 3
    assert value(m, "rbee_worker_slots_total", **labels) == 4
    assert value(m, "rbee_worker_state", **labels, state="busy") == 1
    assert value(m, "rbee_worker_state", **labels, state="idle") == 0
    assert value(m, "rbee_worker_state", node="box", worker="w2", model=REF, state="idle") == 1
    assert value(m, "rbee_node_up", node="box") == 1
    assert value(m, "rbee_node_up", node="far") == 0

    # A change: w1 leaves; the next scrape has no series of it.
    registry.apply("box", "127.0.0.1:7900", registry_pb2.WatchWorkersResponse(hive_instance="h1", seq=2, removed_id="w1"))
    assert ("rbee_worker_slots_total", tuple(sorted(labels.items()))) not in samples(m)
    # The stream breaks: the node is down at once; stale, too.
    registry.stream_lost("box")
    assert value(m, "rbee_node_up", node="box") == 0
    registry.apply("box", "127.0.0.1:7900", registry_pb2.WatchWorkersResponse(hive_instance="h1", seq=2, heartbeat=True))
    assert value(m, "rbee_node_up", node="box") == 1
    assert not registry.heard_from("box", now=10**9)
