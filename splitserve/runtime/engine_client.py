"""What the HTTP frontend needs from whatever generates tokens (a local engine now, remote pools later).

Workers speak tokens; the frontend owns text (templating, detokenization, stop strings).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import AsyncIterator, Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from splitserve.core.request import SamplingParams
from splitserve.model.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass
class TokenLogprobs:
    """One sampled token's log-probability under the model (before temperature, top-k/p and any grammar
    mask, as vLLM reports it) and the `k` most likely tokens with theirs."""

    logprob: float
    top: list[tuple[int, float]]


@dataclass
class TokenOutput:
    """One increment of a request's output, as produced by the engine."""

    request_id: str
    new_token_ids: list[int]
    finished: bool = False
    # "stop" (EOS or a stop token id), "length", "abort", or "error".
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    # Set on the first output: seconds between arrival and first scheduling.
    queue_time: float | None = None
    # Set on the first output: seconds from first scheduling to this token (the prompt's steps, its chunks'
    # waits between them and the sampling), so a request's record can split TTFT into queue and prefill.
    prefill_time: float | None = None
    error: str | None = None
    # One entry per new token when the request asked for logprobs.
    logprobs: list[TokenLogprobs] | None = None


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_total_blocks: int
    prefix_cache_queries: int  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int  # of which found cached
    queued_prefill_tokens: int = 0  # prompt tokens admitted or waiting but not yet computed

    @property
    def kv_usage(self) -> float:
        return 1.0 - self.num_free_blocks / max(1, self.num_total_blocks)


class EngineOverloaded(Exception):
    """The waiting queue is full: the frontend answers 429 with Retry-After."""

    def __init__(self, retry_after: float, message: str = "server overloaded, retry later") -> None:
        super().__init__(message)
        self.retry_after = retry_after


class EngineUnavailable(Exception):
    """The engine is not serving (dead, draining or not ready): the frontend answers 503."""


class EngineClient(Protocol):
    model_name: str
    tokenizer: Tokenizer
    max_model_len: int

    def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[TokenOutput]:
        """Stream outputs until one with finished=True. Raises EngineOverloaded before the first output
        when the request cannot be queued. Closing the iterator early (client gone) aborts the request."""
        ...

    async def abort(self, request_id: str) -> None:
        """Stop a request and free its blocks; its stream ends with finish_reason "abort"."""
        ...

    def stats(self) -> EngineStats: ...

    def healthy(self) -> bool: ...


class EngineStatsCollector(Collector):
    def __init__(self, engine_stats: Callable[[], EngineStats]) -> None:
        self._engine_stats = engine_stats

    def collect(self) -> Iterator[Metric]:
        try:
            s = self._engine_stats()
        except Exception:  # a sick engine must not take the request metrics' scrape down with it
            log.exception("engine.stats() failed during a metrics scrape")
            return
        yield GaugeMetricFamily("splitserve_num_requests_running", "Requests in the running batch", value=s.num_running)
        yield GaugeMetricFamily("splitserve_num_requests_waiting", "Requests queued for admission", value=s.num_waiting)
        yield GaugeMetricFamily("splitserve_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use", value=s.kv_usage)
        yield CounterMetricFamily(
            "splitserve_prefix_cache_queried_tokens", "Prompt tokens looked up in the prefix cache",
            value=s.prefix_cache_queries,
        )
        yield CounterMetricFamily(
            "splitserve_prefix_cache_hit_tokens", "Prompt tokens found in the prefix cache", value=s.prefix_cache_hits
        )
