"""Prometheus metrics of the HTTP frontend: per-request latencies and token counts, and engine state.

Each FrontendMetrics owns its registry, so several apps (tests, several models) can live in one process.
Engine state (queue lengths, KV usage, prefix-cache totals) is read from engine.stats() at scrape time,
so it is never stale and costs nothing between scrapes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

from splitserve.runtime.engine_client import EngineStats, EngineStatsCollector, TokenOutput

log = logging.getLogger(__name__)

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.001, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
_REQUEST_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 300.0, 600.0)


class FrontendMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, engine_stats: Callable[[], EngineStats]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram(
            "splitserve_time_to_first_token_seconds", "Arrival to first output token", buckets=_TTFT_BUCKETS, registry=r
        )
        self.itl = Histogram(
            "splitserve_inter_token_latency_seconds", "Time between output tokens", buckets=_ITL_BUCKETS, registry=r
        )
        self.e2e = Histogram(
            "splitserve_e2e_request_latency_seconds", "Arrival to last output", buckets=_REQUEST_BUCKETS, registry=r
        )
        self.queue_time = Histogram(
            "splitserve_request_queue_time_seconds", "Arrival to first scheduling, as the engine measured it",
            buckets=_REQUEST_BUCKETS, registry=r,
        )
        self.requests = Counter(
            "splitserve_requests", "Requests by how they ended (stop, length, abort, error, rejected)",
            ["finish_reason"], registry=r,
        )
        self.prompt_tokens = Counter("splitserve_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("splitserve_generation_tokens", "Output tokens of finished requests", registry=r)
        r.register(EngineStatsCollector(engine_stats))

    def track(self, arrival: float) -> RequestMetrics:
        return RequestMetrics(self, arrival)

    def record_rejected(self) -> None:
        """A request the engine refused (overloaded or unavailable): it has no latencies to record."""
        self.requests.labels("rejected").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestMetrics:
    """One request's timeline; times are time.monotonic() seconds."""

    def __init__(self, metrics: FrontendMetrics, arrival: float) -> None:
        self._m = metrics
        self._arrival = arrival
        self._last_token: float | None = None

    def on_output(self, out: TokenOutput, now: float) -> None:
        if out.queue_time is not None:
            self._m.queue_time.observe(out.queue_time)
        if not out.new_token_ids:
            return
        if self._last_token is None:
            self._m.ttft.observe(now - self._arrival)
        else:
            # Several tokens in one output arrived together: spread the wait over them.
            gap = (now - self._last_token) / len(out.new_token_ids)
            for _ in out.new_token_ids:
                self._m.itl.observe(gap)
        self._last_token = now

    def on_finish(self, finish_reason: str, num_prompt_tokens: int, num_generation_tokens: int, now: float) -> None:
        self._m.requests.labels(finish_reason).inc()
        self._m.e2e.observe(now - self._arrival)
        self._m.prompt_tokens.inc(num_prompt_tokens)
        self._m.generation_tokens.inc(num_generation_tokens)
