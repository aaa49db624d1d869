"""`GET /metrics`: what a running server has done and holds, in Prometheus' text format
(prometheus-client), on the same app and behind the same access rules as the API (the owner-only
Unix socket; the bearer token over TCP).

Every metric is defined here, in one `CollectorRegistry` per server (never the library's global
default registry: two servers in one process, as in tests, count apart), named `memcli_…`:

    memcli_requests_total{endpoint,status}           requests answered, by route template and HTTP status
                                                     (a stream's status is its first line's: an error
                                                     after it started is its last line, status 200)
    memcli_time_to_first_token_seconds{endpoint}     histogram of answers' `seconds_to_first_token`
    memcli_decode_tokens_per_second{endpoint}        histogram of answers' `decode_tokens_per_second`
                                                     (/api/ask and /v1/chat/completions; an answer of one
                                                     token has no decode rate and is not counted)
    memcli_injects_total{outcome}                    injects that ended with a report (done, interrupted)
    memcli_inject_chunks_total, memcli_inject_tokens_total
                                                     chunks and tokens those injects committed
    memcli_inject_tokens_per_second                  histogram of each inject's tokens / its seconds
    memcli_device_queue_wait_seconds                 histogram: how long each turn on the device was
                                                     waited for (a request's first, and each one after it
                                                     gave the device to another between two slices)
    memcli_model_load_seconds                        histogram: weights loaded for a request, how long
    computed at each scrape from the server's state:
    memcli_device_queue_depth                        requests waiting for a turn on the device
    memcli_loaded_models                             models whose weights are loaded
    memcli_model_weights_bytes{model}                each one's weights' bytes (as `ps` names the model)
    memcli_pool_states                               pool states kept loaded (one per pool at most)
    memcli_pool_state_bytes{pool}                    each one's bytes (rows + memory K/V)
    memcli_pool_state_version{pool}                  the pool version each one holds
    memcli_pool_memory_budget_bytes                  the budget pool states are kept within
    memcli_process_…                                 this process's CPU time, memory, open files (Linux)

Labels stay few: `endpoint` is the route's template (`/api/pools/{name:path}`, "other" for no route,
never the path a client sent); pool names label only the pool-state gauges (one series per pool
state held, gone when it is evicted) and model names the weights gauge (one per model loaded).

The server calls the helpers (`answered`, `injected`) and installs `queue_waited` and `model_loaded`
as the device queue's and the resident's hooks; `instrument` wraps the ASGI app to count requests.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match

# the endpoints whose answers carry timings (the native ask and the OpenAI chat)
ANSWERING = ("/api/ask", "/v1/chat/completions")

_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_RATES = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
_INJECT_RATES = (10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 25000, 50000)
_WAITS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
_LOADS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class Metrics:
    """One server's metrics: its registry, the metrics it counts, and the collector that reads the
    resident's state (`memcli.server.resident.Resident`) at each scrape."""

    def __init__(self, resident: Any):
        self.resident = resident
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("memcli_requests", "HTTP requests answered, by route template and status",
                                ["endpoint", "status"], registry=r)
        self.first_token = Histogram("memcli_time_to_first_token_seconds", "Seconds from a question to its first "
                                     "token (prompt fitting and prefill)", ["endpoint"], buckets=_SECONDS, registry=r)
        self.decode_rate = Histogram("memcli_decode_tokens_per_second", "An answer's decode rate (tokens after "
                                     "the first per second)", ["endpoint"], buckets=_RATES, registry=r)
        self.injects = Counter("memcli_injects", "Injects that ended with a report", ["outcome"], registry=r)
        self.inject_chunks = Counter("memcli_inject_chunks", "Chunks committed by injects", registry=r)
        self.inject_tokens = Counter("memcli_inject_tokens", "Tokens committed by injects", registry=r)
        self.inject_rate = Histogram("memcli_inject_tokens_per_second", "An inject's tokens per second",
                                     buckets=_INJECT_RATES, registry=r)
        self.queue_wait = Histogram("memcli_device_queue_wait_seconds", "Seconds a turn on the device was "
                                    "waited for", buckets=_WAITS, registry=r)
        self.model_load = Histogram("memcli_model_load_seconds", "Seconds a model's weights took to load",
                                    buckets=_LOADS, registry=r)
        r.register(_ResidentCollector(resident))
        ProcessCollector(namespace="memcli", registry=r)  # reads /proc/self: nothing on other systems

    # ------------------------------------------------------------------ what the server tells
    def answered(self, endpoint: str, answer) -> None:
        """An answer (`wire.Answer`) decoded for `endpoint` (one of `ANSWERING`)."""
        self.first_token.labels(endpoint).observe(answer.seconds_to_first_token)
        if answer.decode_tokens_per_second is not None:
            self.decode_rate.labels(endpoint).observe(answer.decode_tokens_per_second)

    def injected(self, report) -> None:
        """An inject's report (`wire.InjectReport`), interrupted or not: what it committed."""
        self.injects.labels("interrupted" if report.interrupted else "done").inc()
        self.inject_chunks.inc(report.chunks)
        self.inject_tokens.inc(report.tokens)
        if report.tokens and report.seconds > 0:
            self.inject_rate.observe(report.tokens / report.seconds)

    def queue_waited(self, seconds: float) -> None:
        """`DeviceQueue.on_wait`: a turn on the device was granted after `seconds`."""
        self.queue_wait.observe(seconds)

    def model_loaded(self, seconds: float) -> None:
        """`Resident.on_model_loaded`: a model's weights loaded in `seconds`."""
        self.model_load.observe(seconds)

    # ------------------------------------------------------------------ HTTP
    async def endpoint(self, request: Request) -> Response:
        """GET /metrics: the text format (OpenMetrics when the scraper asks for it)."""
        encode, content_type = choose_encoder(request.headers.get("accept"))
        return Response(encode(self.registry), media_type=None, headers={"content-type": content_type})

    def instrument(self, app, routes: list) -> "Counting":
        """`app` (ASGI) counting its HTTP requests by route template and status; `routes`: the
        Starlette routes whose templates name the endpoints."""
        return Counting(app, routes, self.requests)


def endpoint_of(routes: list, scope: dict) -> str:
    """The template of the route `scope` goes to (a wrong method still names it: a 405), or "other"."""
    for route in routes:
        match, _ = route.matches(scope)
        if match != Match.NONE:
            return route.path
    return "other"


class Counting:
    """ASGI wrapper: each HTTP response's status, counted under its endpoint when it starts."""

    def __init__(self, app, routes: list, requests: Counter):
        self.app, self.routes, self.requests = app, routes, requests

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = endpoint_of(self.routes, scope)

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.requests.labels(endpoint, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)


class _ResidentCollector:
    """The gauges read from the resident's state at each scrape (`Resident.snapshot`, its queue)."""

    def __init__(self, resident: Any):
        self.resident = resident

    def collect(self):
        resident = self.resident
        snapshot = resident.snapshot()
        models = snapshot["models"]
        states = [state for model in models for state in model["pools"]]
        yield GaugeMetricFamily("memcli_device_queue_depth", "Requests waiting for a turn on the device",
                                value=resident.device.waiting())
        yield GaugeMetricFamily("memcli_loaded_models", "Models whose weights are loaded", value=len(models))
        weights = GaugeMetricFamily("memcli_model_weights_bytes", "Bytes of a loaded model's weights",
                                    labels=["model"])
        for model in models:
            weights.add_metric([model["model"]], model["weights_bytes"])
        yield weights
        yield GaugeMetricFamily("memcli_pool_states", "Pool states kept loaded", value=len(states))
        by_bytes = GaugeMetricFamily("memcli_pool_state_bytes", "Bytes of a pool state kept loaded (rows and "
                                     "memory keys/values)", labels=["pool"])
        by_version = GaugeMetricFamily("memcli_pool_state_version", "The pool version a loaded state holds",
                                       labels=["pool"])
        for state in states:
            by_bytes.add_metric([state["pool"]], state["bytes"])
            by_version.add_metric([state["pool"]], state["version"])
        yield by_bytes
        yield by_version
        yield GaugeMetricFamily("memcli_pool_memory_budget_bytes", "The memory budget pool states are kept within",
                                value=snapshot["memory_budget_bytes"])
