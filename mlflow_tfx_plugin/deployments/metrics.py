"""Prometheus metrics of one deployment server (``GET /metrics``)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from mlflow_tfx_plugin.deployments.payloads import ROUTES

disable_created_metrics()  # the *_created series only add noise to scrapes

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)

#: The generation engine's own counters (attributes of the continuous-batching engine),
#: exported as ``tfx_engine_<name>_total``.
ENGINE_COUNTERS = {
    "loop_restarts": "Restarts of the continuous-batching loop after it died.",
}


class ServerMetrics:
    """Counters and histograms, in a registry of their own (one per app)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "tfx_requests",
            "HTTP requests answered, by route and status code (499: the client closed the "
            "connection before its request was read).",
            ["route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "tfx_request_latency_seconds",
            "Time from request to complete response, by route.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.time_to_first_token = Histogram(
            "tfx_time_to_first_token_seconds",
            "Time from request to the first streamed token.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "tfx_prompt_tokens", "Prompt tokens processed.", registry=self.registry
        )
        self.completion_tokens = Counter(
            "tfx_completion_tokens", "Tokens generated.", registry=self.registry
        )
        self.batch_size = Histogram(
            "tfx_batch_size",
            "Sequences per model step (continuous batching) or per batch (micro-batching).",
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "tfx_requests_in_flight",
            "Requests admitted and not yet answered.",
            registry=self.registry,
        )
        self._queue_gauge = Gauge(
            "tfx_queue_depth", "Requests waiting for the model.", registry=self.registry
        )

    def watch_queue(self, queue_depth: Callable[[], float]) -> None:
        """Report ``queue_depth()`` at each scrape (0 until this is called)."""
        self._queue_gauge.set_function(queue_depth)

    def watch_engine(self, engine: Callable[[], object | None]) -> None:
        """Report the counters of ``engine()`` (see :data:`ENGINE_COUNTERS`) at each scrape;
        an engine without them (micro-batching) reports none."""
        self.registry.register(_EngineCounters(engine))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCounters(Collector):
    """Reads the engine's counters when scraped, so the engine keeps plain integers."""

    def __init__(self, engine: Callable[[], object | None]) -> None:
        self._engine = engine

    def collect(self) -> Iterator[CounterMetricFamily]:
        engine = self._engine()
        for name, documentation in ENGINE_COUNTERS.items():
            family = CounterMetricFamily(f"tfx_engine_{name}", documentation)
            value = getattr(engine, name, None)
            if isinstance(value, int):
                family.add_metric([], value)
            yield family


class MetricsMiddleware:
    """Counts requests by route and status, and times them (a pure ASGI middleware, so
    streaming responses and client disconnects pass through untouched)."""

    def __init__(self, app: Any, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = _route_path(scope)
        route = path if path in ROUTES else "other"
        started, status = time.perf_counter(), 500

        async def send_and_record(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)


def _route_path(scope: Any) -> str:
    """The request path below the app's mount point (Ray Serve mounts it at ``/NAME``)."""
    path: str = scope["path"]
    root = scope.get("root_path") or ""
    return path[len(root) :] if root and path.startswith(root) else path
