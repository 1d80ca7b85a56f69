"""Prometheus metrics, served on the admin listener at ``/metrics``.

Label values come from closed sets (decision, reason, route id, upstream),
never from client input, so a hostile client cannot blow up cardinality.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from gateway.context import RequestContext

REGISTRY = CollectorRegistry(auto_describe=True)

REQUESTS = Counter(
    "fairgate_requests",
    "Requests by decision and reason.",
    ["decision", "reason", "route"],
    registry=REGISTRY,
)
LATENCY = Histogram(
    "fairgate_request_seconds",
    "Time from request to the end of the response.",
    ["decision"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
UPSTREAM_ERRORS = Counter(
    "fairgate_upstream_errors",
    "Upstream failures by upstream and kind.",
    ["upstream", "kind"],
    registry=REGISTRY,
)
AUDIT_QUEUE = Gauge(
    "fairgate_audit_queue_depth", "Audit records waiting to be written.", registry=REGISTRY
)
AUDIT_WRITTEN = Gauge(
    "fairgate_audit_records_written", "Audit records written by this process.", registry=REGISTRY
)
AUDIT_FAILURES = Gauge(
    "fairgate_audit_sink_failures", "Audit sink write failures.", registry=REGISTRY
)
AUDIT_HEALTHY = Gauge(
    "fairgate_audit_healthy", "1 while every audit sink accepts writes.", registry=REGISTRY
)
INFLIGHT = Gauge(
    "fairgate_inflight_keys", "Subjects and routes holding in-flight slots.", registry=REGISTRY
)
USAGE_COUNTERS = Gauge(
    "fairgate_usage_counter_keys",
    "Keys held by the in-process usage counters (live quota and bandwidth windows).",
    ["counter"],
    registry=REGISTRY,
)
USAGE_BUCKETS = Gauge(
    "fairgate_usage_bucket_keys",
    "Token buckets not full (held in the bucket table).",
    registry=REGISTRY,
)


# labels() costs a lock and a tuple hash per call: keep the children. The
# keys come from closed sets, so this stays small.
_requests: dict[tuple[str, str, str], Any] = {}
_latency: dict[str, Any] = {}


def observe(req: RequestContext, latency: float) -> None:
    if req.refusal is not None:
        decision, reason = "deny", req.refusal.reason
    elif req.shadow:
        decision, reason = "shadow_deny", req.shadow[0].partition(":")[0]
    else:
        decision, reason = "allow", ""
    key = (decision, reason, req.route.id if req.route else "")
    counter = _requests.get(key)
    if counter is None:
        counter = _requests[key] = REQUESTS.labels(*key)
    counter.inc()
    histogram = _latency.get(decision)
    if histogram is None:
        histogram = _latency[decision] = LATENCY.labels(decision)
    histogram.observe(latency)
    if req.refusal is not None and req.refusal.reason.startswith("upstream_") and req.route:
        UPSTREAM_ERRORS.labels(req.route.upstream, req.refusal.reason).inc()


def render() -> bytes:
    return generate_latest(REGISTRY)
