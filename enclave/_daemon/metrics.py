"""Prometheus metrics of the enclave daemon, on their own registry and HTTP port."""

from __future__ import annotations

import threading
from collections.abc import Callable
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

OUTCOMES = (
    "served",
    "refused_quota",
    "refused_suspended",
    "refused_offline",
    "refused_busy",
    "invalid_input",
    "error",
)
ZEROIZE_REASONS = ("suspended", "offline")
FINISH_REASONS = ("stop", "length", "quota", "cancelled")
_TOKEN_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class DaemonMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.inferences = Counter(
            "custos_enclave_inferences",
            "Inference calls by outcome.",
            ["outcome"],
            registry=self.registry,
        )
        for outcome in OUTCOMES:
            self.inferences.labels(outcome=outcome)
        self.latency = Histogram(
            "custos_enclave_inference_seconds",
            "Time to serve one inference (validation, quota, model run).",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.lease_limit = Gauge(
            "custos_enclave_lease_limit", "Units the current lease allows.", registry=self.registry
        )
        self.lease_used = Gauge(
            "custos_enclave_lease_used", "Units committed under the current lease.", registry=self.registry
        )
        self.custodian_connected = Gauge(
            "custos_enclave_custodian_connected",
            "1 while the control stream to the custodian is open.",
            registry=self.registry,
        )
        self.failovers = Counter(
            "custos_enclave_custodian_failovers",
            "Times the link moved to another of the custodian's replicas (--custodian lists several).",
            registry=self.registry,
        )
        self.zeroizations = Counter(
            "custos_enclave_zeroizations",
            "Times the model and the keys were dropped, by reason (suspended, offline).",
            ["reason"],
            registry=self.registry,
        )
        for reason in ZEROIZE_REASONS:
            self.zeroizations.labels(reason=reason)
        self.model_loaded = Gauge(
            "custos_enclave_model_loaded", "1 once the model is loaded.", registry=self.registry
        )
        self.tokens = Counter(
            "custos_enclave_tokens",
            "Language model tokens charged, by kind (prompt, completion).",
            ["kind"],
            registry=self.registry,
        )
        for kind in ("prompt", "completion"):
            self.tokens.labels(kind=kind)
        self.generations = Counter(
            "custos_enclave_generations",
            "Generations that ran, by finish reason (stop, length, quota, cancelled).",
            ["finish_reason"],
            registry=self.registry,
        )
        for reason in FINISH_REASONS:
            self.generations.labels(finish_reason=reason)
        self.time_to_first_token = Histogram(
            "custos_enclave_time_to_first_token_seconds",
            "From a generation's arrival to its first token (queue, quota, prompt).",
            buckets=_TOKEN_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.time_per_output_token = Histogram(
            "custos_enclave_time_per_output_token_seconds",
            "A generation's mean time per token after the first.",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.active_streams = Gauge(
            "custos_enclave_active_streams",
            "Generations running now (not those queued).",
            registry=self.registry,
        )
        self.queued_streams = Gauge(
            "custos_enclave_queued_streams", "Generations waiting for a slot.", registry=self.registry
        )

    def track_lease(self, limit: Callable[[], float], used: Callable[[], float]) -> None:
        """Read the lease gauges from the lease itself at scrape time."""
        self.lease_limit.set_function(limit)
        self.lease_used.set_function(used)

    def track_streams(self, active: Callable[[], float], queued: Callable[[], float]) -> None:
        """Read the stream gauges from the generation slots at scrape time."""
        self.active_streams.set_function(active)
        self.queued_streams.set_function(queued)

    def count(self, outcome: str) -> None:
        self.inferences.labels(outcome=outcome).inc()


class MetricsServer:
    """The metrics HTTP endpoint (a thread of prometheus_client's own server)."""

    def __init__(self, metrics: DaemonMetrics, host: str, port: int) -> None:
        self._server: WSGIServer
        self._thread: threading.Thread
        self._server, self._thread = start_http_server(port, addr=host.strip("[]"), registry=metrics.registry)

    @property
    def port(self) -> int:
        return int(self._server.server_port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
