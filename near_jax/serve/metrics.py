"""Prometheus metrics of the server (GET /metrics), in a registry of its own per server.

Counters: requests by endpoint and HTTP status, prompt and completion tokens. Histograms:
time to first token (from arrival: queueing and prefill included), time per output token
(after the first), and whole-request latency. Gauges read the engine when scraped: waiting
requests (queue depth), busy slots and their share of all slots (batch occupancy).
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_PER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServerMetrics:
    """The server's metrics; `stats` returns the engine's numbers when /metrics is scraped."""

    def __init__(self, stats: Callable[[], dict]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "near_jax_requests", "Requests answered.", ["endpoint", "status"], registry=r
        )
        self.prompt_tokens = Counter(
            "near_jax_prompt_tokens", "Prompt tokens of answered requests.", registry=r
        )
        self.completion_tokens = Counter(
            "near_jax_completion_tokens", "Tokens generated.", registry=r
        )
        self.time_to_first_token = Histogram(
            "near_jax_time_to_first_token_seconds",
            "From a request's arrival to its first token.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.time_per_output_token = Histogram(
            "near_jax_time_per_output_token_seconds",
            "Mean time between a request's tokens after the first.",
            buckets=_PER_TOKEN_BUCKETS,
            registry=r,
        )
        self.latency = Histogram(
            "near_jax_request_seconds",
            "From a request's arrival to its last byte.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self._stats = stats
        self._cached: dict = {}
        for name, doc, key in (
            ("near_jax_queue_depth", "Requests waiting for a slot.", "queue_depth"),
            ("near_jax_active_slots", "Slots holding a request.", "active_slots"),
            ("near_jax_slots", "Slots of the running batch.", "slots"),
        ):
            Gauge(name, doc, registry=r).set_function(lambda key=key: self._read(key))
        Gauge(
            "near_jax_batch_occupancy", "Busy slots over all slots (0 to 1).", registry=r
        ).set_function(lambda: self._read("active_slots") / max(self._read("slots"), 1))

    def _read(self, key: str) -> float:
        return float(self._cached.get(key, 0))

    def observe_request(
        self,
        endpoint: str,
        status: int,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        seconds: float | None = None,
    ) -> None:
        """Counts one answered request (any status)."""
        self.requests.labels(endpoint, str(status)).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.completion_tokens.inc(completion_tokens)
        if seconds is not None:
            self.latency.observe(seconds)

    def observe_tokens(self, first_token_seconds: float, per_token_seconds: float | None) -> None:
        """Times of one finished sequence: to its first token, then per further token."""
        self.time_to_first_token.observe(first_token_seconds)
        if per_token_seconds is not None:
            self.time_per_output_token.observe(per_token_seconds)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric, engine gauges read now."""
        self._cached = dict(self._stats())
        return generate_latest(self.registry)
