"""Prometheus metrics: what an operator needs to see a pod's streams, upstreams and MongoDB.

Every label has a small, fixed set of values (transport, outcome, reason, model name from the
catalogue, provider, error code, store operation): never a user, chat or message id. Nothing is
recorded per chunk; a turn updates a few counters when it starts, at its first token and when it
ends, so the per-chunk path stays free of metrics work.

The metrics live in one process-wide registry (as prometheus-client intends): several apps in one
process (the tests) share them, which is why tests compare before/after values.
"""

from __future__ import annotations

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)

# No `*_created` series: they double the output and nothing here reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]

REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)  # RSS, CPU seconds, open fds: per live stream cost at a glance
PlatformCollector(registry=REGISTRY)

TRANSPORTS = ("sse", "ws", "openai", "anthropic")

ACTIVE_STREAMS = Gauge(
    "gateway_active_streams",
    "Turns streaming on this process now.",
    ["transport"],
    registry=REGISTRY,
)
TURNS = Counter(
    "gateway_turns",
    "Turns that ended, by outcome (completed, cancelled, failed, interrupted) and reason;"
    " interrupted: its process died, counted by the replica that settled it.",
    ["transport", "outcome", "reason"],
    registry=REGISTRY,
)
TTFT = Histogram(
    "gateway_time_to_first_token_seconds",
    "From the request to the first token from the upstream.",
    ["model"],
    buckets=(0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 8, 13, 20, 30, 60),
    registry=REGISTRY,
)
DURATION = Histogram(
    "gateway_stream_duration_seconds",
    "From the request to the end of the turn.",
    ["transport", "outcome"],
    buckets=(0.1, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 900),
    registry=REGISTRY,
)
TOKENS = Counter(
    "gateway_tokens",
    "Tokens billed by model, kind (prompt, completion) and source (upstream, tokenizer, estimate).",
    ["model", "kind", "source"],
    registry=REGISTRY,
)
COST = Counter(
    "gateway_cost",
    "What turns cost, by model, in units of CURRENCY (never per user: /api/admin/usage has that).",
    ["model"],
    registry=REGISTRY,
)
UPSTREAM_ERRORS = Counter(
    "gateway_upstream_errors",
    "Upstream failures by provider and code. stage: retried (an attempt before the stream that "
    "was tried again), connect (a turn failed before its stream began), stream (a turn failed "
    "after it began), list (a model list could not be read).",
    ["provider", "code", "stage"],
    registry=REGISTRY,
)
REJECTIONS = Counter(
    "gateway_turn_rejections",
    "Turns refused before they started by a rule: rate_limited, budget_exceeded, budget_held, "
    "shutting_down, model_not_allowed (an API key used outside its models).",
    ["reason"],
    registry=REGISTRY,
)
MONGODB_SECONDS = Histogram(
    "gateway_mongodb_operation_seconds",
    "Latency of each store operation (one or more MongoDB round trips), by operation and result.",
    ["operation", "result"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
    registry=REGISTRY,
)

DETACHED = Counter(
    "gateway_turns_detached",
    "Turns whose last follower left while they ran, and which went on to their natural end "
    "(resumable; billed exactly).",
    ["transport"],
    registry=REGISTRY,
)
FOLLOWERS = Gauge(
    "gateway_followers",
    "Clients following a turn's answer on this process now, by transport (sse, ws, openai).",
    ["transport"],
    registry=REGISTRY,
)
RESUMES = Counter(
    "gateway_resumes",
    "Resumes of an answer by where its text came from: memory (this process runs the turn), "
    "replica (another process runs it: followed through MongoDB), stored (it had ended).",
    ["source"],
    registry=REGISTRY,
)
RESUME_SOURCES = ("memory", "replica", "stored")

for _transport in TRANSPORTS:
    ACTIVE_STREAMS.labels(_transport)  # present at 0 from the start, so dashboards show a line
    FOLLOWERS.labels(_transport)
for _source in RESUME_SOURCES:
    RESUMES.labels(_source)


METRICS_PATH = "/metrics"


async def metrics(request: web.Request) -> web.Response:
    """``GET /metrics``: the Prometheus text format. Not routed by the HTTPRoute or Ingress,
    which keep it off the public route by its path as sent; aiohttp routes by the decoded path,
    so ``/%6detrics`` would reach this handler past a proxy that matches before decoding. Only
    the exact path as sent is answered (a query aside); any other spelling is the router's 404."""
    if request.raw_path.partition("?")[0] != METRICS_PATH:
        raise web.HTTPNotFound()
    body = generate_latest(REGISTRY)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def setup(app: web.Application) -> None:
    app.router.add_get(METRICS_PATH, metrics)
