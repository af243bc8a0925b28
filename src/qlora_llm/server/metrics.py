"""Prometheus metrics of one server: requests by outcome, tokens in and out, time to first token, latency.

Each app gets its own registry (no module globals), so several apps (tests) never share counters.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "qlora_llm_requests", "HTTP requests by route and outcome", ["route", "outcome"], registry=r
        )
        self.prompt_tokens = Counter(
            "qlora_llm_prompt_tokens", "Prompt tokens of finished generations", registry=r
        )
        self.generated_tokens = Counter("qlora_llm_generated_tokens", "Tokens generated", registry=r)
        self.generations = Counter(
            "qlora_llm_generations", "Finished generations by finish reason", ["finish_reason"], registry=r
        )
        self.ttft = Histogram(
            "qlora_llm_time_to_first_token_seconds",
            "From arrival to the first token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.latency = Histogram(
            "qlora_llm_generation_latency_seconds",
            "From arrival to the last token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "qlora_llm_batch_size",
            "Requests decoded together, per decoding step",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32),
            registry=r,
        )
        self.in_flight = Gauge("qlora_llm_requests_in_flight", "Requests running or waiting", registry=r)

    def observe_generation(self, result: dict[str, Any]) -> None:
        self.prompt_tokens.inc(result["prompt_tokens"])
        self.generated_tokens.inc(result["completion_tokens"])
        self.generations.labels(result["finish_reason"]).inc()
        if result["time_to_first_token_s"] is not None:
            self.ttft.observe(result["time_to_first_token_s"])
        self.latency.observe(result["latency_s"])

    def render(self) -> bytes:
        return generate_latest(self.registry)
