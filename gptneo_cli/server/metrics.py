"""Prometheus metrics (prometheus-client), one registry per app so that several servers in
one process (tests) never share counters."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

#: Routes counted by name; anything else (404s, fuzzing) counts as "other".
ROUTES = (
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/models",
    "/v1/classify",
    "/tokenize",
    "/detokenize",
    "/health",
    "/metrics",
)

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class _Totals(Collector):
    """The scheduler's token totals as Prometheus counters (they only grow), read when
    scraped: gptneo_prompt_tokens_total, gptneo_generation_tokens_total, and speculative
    decoding's gptneo_draft_tokens_total and gptneo_draft_accepted_tokens_total."""

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler

    #: (metric name, help, the scheduler's total it reads)
    COUNTERS = (
        ("gptneo_prompt_tokens", "Prompt tokens prefilled since start.", "prompt_tokens_total"),
        ("gptneo_generation_tokens", "Tokens generated since start.", "generated_tokens_total"),
        (
            "gptneo_draft_tokens",
            "Speculative decoding: tokens drafted (prompt lookup) since start.",
            "drafted_tokens_total",
        ),
        (
            "gptneo_draft_accepted_tokens",
            "Speculative decoding: drafted tokens the model kept since start.",
            "accepted_tokens_total",
        ),
    )

    def collect(self) -> Iterator[CounterMetricFamily]:
        for name, text, total in self.COUNTERS:
            yield CounterMetricFamily(name, text, value=getattr(self.scheduler, total))


class Metrics:
    def __init__(self, scheduler: Any) -> None:
        self.registry = registry = CollectorRegistry()
        self.requests = Counter(
            "gptneo_requests", "HTTP requests answered.", ["route", "status"], registry=registry
        )
        running = Gauge(
            "gptneo_running_rows", "Rows in the decode batch or being prefilled.", registry=registry
        )
        running.set_function(lambda: scheduler.stats()["running"])
        waiting = Gauge("gptneo_waiting_requests", "Requests queued for a row.", registry=registry)
        waiting.set_function(lambda: scheduler.stats()["waiting"])
        registry.register(_Totals(scheduler))
        self.ttft = Histogram(
            "gptneo_time_to_first_token_seconds",
            "From the request's arrival to its first token.",
            buckets=_LATENCY,
            registry=registry,
        )
        self.inter_token = Histogram(
            "gptneo_inter_token_latency_seconds",
            "Between two tokens of one sequence.",
            buckets=_LATENCY,
            registry=registry,
        )

    def request(self, path: str, status: int) -> None:
        self.requests.labels(path if path in ROUTES else "other", str(status)).inc()

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
