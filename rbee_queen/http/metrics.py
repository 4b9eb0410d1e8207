"""Prometheus metrics of the queen's front door: ``GET /metrics`` in
Prometheus' text format (docs/openai-api.md, metrics).

The queen keeps its own ``CollectorRegistry``, so nothing else imported into
the process (vLLM's client libraries, say) ends up in its page, and tests can
build as many queens as they like in one process.

Two kinds of figures:

- What the proxy tells its observer of each request (``MetricsObserver``,
  rbee_queen/http/observe.py) and the router of each cold start, recorded
  as it happens: requests by model, node and status; time to first token,
  inter-token latency and end-to-end latency; prompt and generated tokens;
  cold starts and their duration.
- What is true now, read at scrape time (``ClusterCollector``): from the
  queen's global worker registry, each worker's busy and total slots and its
  state, and whether each registered node's hive is followed; from the
  router, the requests running on a worker and those waiting on a cold
  start. Nothing is kept between scrapes: a worker that is gone has no
  series any more, and no gauge can drift from a missed decrement.

Labels are bounded: ``model`` is a model reference only once the cluster
served that model (a worker answered for it, or a cold start of it got a
worker) or a worker of it is live; anything else, a made-up name or a
well-formed reference whose download fails, is ``unresolved``. So a client
cannot mint series by sending names. ``node`` is a registered node or
``none``; ``status`` is the HTTP status of the reply (``499`` when the client
went away first).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from rbee.v1 import common_pb2

from rbee_queen.http.auth import inference_key
from rbee_queen.http.observe import ProxyObserver

UNRESOLVED = "unresolved"
NO_NODE = "none"
CLIENT_GONE = 499

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
COLD_BUCKETS = (1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)

_STATES = {
    value: name.removeprefix("WORKER_STATE_").lower()
    for name, value in common_pb2.WorkerState.items()
    if value != common_pb2.WORKER_STATE_UNSPECIFIED
}


class ClusterCollector(Collector):
    """Read at each scrape: per worker, slots busy and total and its state
    (``workers()``: the global worker registry's listing); per registered node
    (``nodes()``), whether its hive is followed now (``heard(node)``); and
    the front door's requests running on a worker and waiting on a cold start,
    per model (``load()``: the router's two counts); and the requests waiting
    in the admission queue for a busy model's slot (``queue()``: its depths)."""

    def __init__(self, workers: Callable[[], Iterable[Any]], nodes: Callable[[], Iterable[str]],
                 heard: Callable[[str], bool],
                 load: Callable[[], tuple[Mapping[str, int], Mapping[str, int]]] | None = None,
                 queue: Callable[[], Mapping[str, int]] | None = None) -> None:  # fmt: skip
        self._workers = workers
        self._queue = queue
        self._nodes = nodes
        self._heard = heard
        self._load = load

    def describe(self) -> Iterable[Any]:
        return []  # names only at scrape time; registering never reads the registry

    def collect(self) -> Iterable[Any]:
        labels = ["node", "worker", "model"]
        busy = GaugeMetricFamily("rbee_worker_slots_busy", "Request slots of a worker serving a request now.", labels=labels)
        total = GaugeMetricFamily("rbee_worker_slots_total", "Request slots of a worker.", labels=labels)
        state = GaugeMetricFamily(
            "rbee_worker_state", "1 for the state a worker is in, 0 for the others.", labels=[*labels, "state"]
        )
        for cw in self._workers():
            w = cw.worker
            values = [cw.node, w.id, w.model_ref]
            busy.add_metric(values, max(0, w.slots_total - w.slots_available))
            total.add_metric(values, w.slots_total)
            for number, name in _STATES.items():
                state.add_metric([*values, name], 1.0 if w.state == number else 0.0)
        up = GaugeMetricFamily("rbee_node_up", "1 when the queen follows the node's hive now, else 0.", labels=["node"])
        for name in self._nodes():
            up.add_metric([name], 1.0 if self._heard(name) else 0.0)
        families = [busy, total, state, up]
        if self._load is not None:
            running, queued = self._load()
            for name, help_text, counts in (
                ("rbee_requests_running", "HTTP requests streaming from a worker now.", running),
                ("rbee_requests_queued", "HTTP requests waiting for a worker (a cold start) now.", queued),
            ):
                family = GaugeMetricFamily(name, help_text, labels=["model"])
                for model, count in sorted(counts.items()):
                    family.add_metric([model], count)
                families.append(family)
        if self._queue is not None:
            depth = GaugeMetricFamily("rbee_queue_depth", "Requests waiting in the admission queue for a slot of a busy "
                                      "model now (task API and HTTP).", labels=["model"])  # fmt: skip
            for model, count in sorted(self._queue().items()):
                depth.add_metric([model], count)
            families.append(depth)
        return families


class QueenMetrics:
    def __init__(self, collector: Collector | None = None, loaded: Callable[[], Iterable[str]] | None = None) -> None:
        """``loaded()``: the references of the models with a live worker now."""
        self._loaded = loaded
        # References the cluster served: real models, so bounded by what the nodes can hold.
        self._served: set[str] = set()
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("rbee_requests", "HTTP inference requests by model, node and reply status.",
                                ["model", "node", "status"], registry=r)  # fmt: skip
        self.ttft = Histogram("rbee_time_to_first_token_seconds", "From a request's arrival to its first token.",
                              ["model"], buckets=TTFT_BUCKETS, registry=r)  # fmt: skip
        self.itl = Histogram("rbee_inter_token_latency_seconds", "Between one generated token and the next, per token.",
                             ["model"], buckets=ITL_BUCKETS, registry=r)  # fmt: skip
        self.e2e = Histogram("rbee_e2e_request_latency_seconds", "From a request's arrival to its reply's end.",
                             ["model"], buckets=E2E_BUCKETS, registry=r)  # fmt: skip
        self.prompt_tokens = Counter("rbee_prompt_tokens", "Prompt tokens of finished requests.", ["model"], registry=r)
        self.generation_tokens = Counter("rbee_generation_tokens", "Tokens generated for finished requests.", ["model"], registry=r)
        self.cold_starts = Counter("rbee_cold_starts", "Cold starts the front door began, by model, node and outcome.",
                                   ["model", "node", "outcome"], registry=r)  # fmt: skip
        self.cold_start_duration = Histogram("rbee_cold_start_duration_seconds",
                                             "From a cold start's beginning to its worker ready, or its failure.",
                                             ["model", "node", "outcome"], buckets=COLD_BUCKETS, registry=r)  # fmt: skip
        # Not registered: it reads the loop's live state, so it runs on the loop (see scrape()).
        self.cluster = collector

    def proxy_observer(self) -> MetricsObserver:
        """For ``app.state.observer``: what the proxy reports of each request."""
        return MetricsObserver(self)

    def model_label(self, ref: str, served: bool = False) -> str:
        """``ref`` when the cluster served it (now, with ``served``) or has a
        live worker of it, else ``unresolved``."""
        if served:
            self._served.add(ref)
        if ref in self._served:
            return ref
        if self._loaded is not None and ref in set(self._loaded()):
            return ref
        return UNRESOLVED

    def cold_start_done(self, model: str, node: str, seconds: float, outcome: str) -> None:
        """``outcome``: ready, failed, or cancelled (the queen stopped)."""
        model = self.model_label(model, served=outcome == "ready")
        self.cold_starts.labels(model, node or NO_NODE, outcome).inc()
        self.cold_start_duration.labels(model, node or NO_NODE, outcome).observe(max(0.0, seconds))

    def observer(self) -> Callable[..., None]:
        """For ``Router.observers``: the routing decisions that are metrics."""

        def observe(event: str, **labels: Any) -> None:
            if event == "cold_start_done":
                self.cold_start_done(labels["model"], labels["node"], labels["seconds"], labels["outcome"])

        return observe

    def _cluster_now(self) -> list[Any]:
        return list(self.cluster.collect()) if self.cluster is not None else []

    def exposition(self) -> bytes:
        return generate_latest(_Page(self.registry, self._cluster_now()))  # type: ignore[arg-type]

    async def scrape(self) -> bytes:
        """The page: the cluster's figures read on the event loop (the registry
        and router change there), the text written in a thread, so a large
        page does not hold the token streams up for its whole formatting."""
        return await asyncio.to_thread(generate_latest, _Page(self.registry, self._cluster_now()))  # type: ignore[arg-type]


class _Page:
    """What one scrape shows: the registry's own metrics (their locks make
    them safe to read from a thread) and the cluster's, read before."""

    def __init__(self, registry: CollectorRegistry, cluster: list[Any]) -> None:
        self._registry = registry
        self._cluster = cluster

    def collect(self) -> Iterable[Any]:
        yield from self._registry.collect()
        yield from self._cluster


class MetricsObserver(ProxyObserver):
    """What the proxy tells observers (rbee_queen/http/observe.py), recorded."""

    def __init__(self, metrics: QueenMetrics) -> None:
        self._m = metrics

    def request_refused(self, route: str, status: int) -> None:
        self._m.requests.labels(UNRESOLVED, NO_NODE, str(status)).inc()

    def first_token(self, route: str, model: str, node: str, seconds: float) -> None:
        self._m.ttft.labels(self._m.model_label(model, served=True)).observe(max(0.0, seconds))

    def tokens(self, route: str, model: str, node: str, count: int, seconds_since_last: float) -> None:
        """The gap since the previous message spread over the tokens this one
        carries (the worker sends what was ready together): one observation per token."""
        if count <= 0:
            return
        gap = max(0.0, seconds_since_last) / count
        itl = self._m.itl.labels(self._m.model_label(model, served=True))
        for _ in range(count):
            itl.observe(gap)

    def request_finished(self, route: str, model: str, node: str, status: int, seconds: float,
                         prompt_tokens: int, completion_tokens: int) -> None:  # fmt: skip
        m = self._m
        model = m.model_label(model, served=200 <= status < 300 or completion_tokens > 0)
        m.requests.labels(model, node or NO_NODE, str(status)).inc()
        m.e2e.labels(model).observe(max(0.0, seconds))
        if prompt_tokens > 0:
            m.prompt_tokens.labels(model).inc(prompt_tokens)
        if completion_tokens > 0:
            m.generation_tokens.labels(model).inc(completion_tokens)


def metrics_router(metrics: QueenMetrics, public: bool) -> APIRouter:
    """``GET /metrics``: any key of the queen (an inference key too: nothing on
    the page says more than ``/v1/models`` does), or none with ``public``."""
    router = APIRouter()
    dependencies = [] if public else [Depends(inference_key)]

    @router.get("/metrics", dependencies=dependencies, include_in_schema=False)
    async def scrape(request: Request) -> Response:
        return Response(await metrics.scrape(), media_type=CONTENT_TYPE_LATEST)

    return router
