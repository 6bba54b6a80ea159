"""Prometheus metrics of one service instance (its own registry, so several can live in a process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.0, 2.0, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServeMetrics:
    """Requests and errors by call and code, latency, queue depth, batch size, queue wait, model time,
    open HTTP connections and those the server closed (deadlines, limit)."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "mmformer_requests",
            "Requests answered, by call, transport and status code",
            ["call", "transport", "code"],
            registry=r,
        )
        self.errors = Counter(
            "mmformer_errors",
            "Requests answered with an error, by call, transport and code",
            ["call", "transport", "code"],
            registry=r,
        )
        self.latency = Histogram(
            "mmformer_request_latency_seconds",
            "Time from a request's arrival to its answer",
            ["call", "transport"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge("mmformer_queue_depth", "Inputs waiting in the batcher queue", ["kind"], registry=r)
        self.batch_size = Histogram(
            "mmformer_batch_size", "Inputs per model call", ["kind"], buckets=BATCH_BUCKETS, registry=r
        )
        self.queue_wait = Histogram(
            "mmformer_queue_wait_seconds",
            "Time an input waited in the queue",
            ["kind"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.model_time = Histogram(
            "mmformer_model_seconds", "Time of one batched model call", ["kind"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.refused = Counter("mmformer_refused", "Inputs refused because the queue was full", ["kind"], registry=r)
        self.dropped = Counter(
            "mmformer_dropped",
            "Inputs dropped before inference (deadline passed or cancelled)",
            ["kind", "reason"],
            registry=r,
        )
        self.http_connections = Gauge("mmformer_http_connections", "Open HTTP connections", registry=r)
        self.http_connections_closed = Counter(
            "mmformer_http_connections_closed",
            "HTTP connections closed by the server: header_timeout, body_timeout, connection_limit",
            ["reason"],
            registry=r,
        )

    def observe_request(self, call: str, transport: str, code: str, seconds: float) -> None:
        self.requests.labels(call, transport, code).inc()
        if code != "OK":
            self.errors.labels(call, transport, code).inc()
        self.latency.labels(call, transport).observe(seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
