"""Pure functions from request records to a run's summary: latency percentiles, throughput, SLO attainment.

Definitions (seconds): TTFT = first token - send; E2E = end - send; TPOT = (E2E - TTFT) / (completion
tokens - 1), defined for requests with at least 2 output tokens; ITL = gaps between consecutive output
chunks, pooled over requests. Latencies count successful requests only. Percentiles are numpy's linear ones.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from splitserve.workload.record import RequestRecord


@dataclass(frozen=True)
class SLO:
    ttft_s: float | None = None
    tpot_s: float | None = None
    # The longest gap between two consecutive output chunks of a request (its worst stall): a mean TPOT
    # hides a decode stalled for seconds by another request's prefill, the thing disaggregation protects.
    max_gap_s: float | None = None

    @property
    def set(self) -> bool:
        return self.ttft_s is not None or self.tpot_s is not None or self.max_gap_s is not None


@dataclass(frozen=True)
class Stats:
    count: int
    mean: float | None
    p50: float | None
    p90: float | None
    p99: float | None


@dataclass(frozen=True)
class Summary:
    num_requests: int
    num_ok: int
    errors: dict[str, int]  # failures per "HTTP <status>" or failure kind
    duration_s: float  # first send to last end
    request_throughput: float  # successful requests per second
    output_throughput: float  # output tokens of successful requests per second
    total_token_throughput: float  # prompt + output tokens of successful requests per second
    prompt_tokens: int
    cached_tokens: int  # as the server reported them (0 where it did not)
    # Successful requests that ended before max_tokens: the server ignored ignore_eos, or hit its context limit.
    short_outputs: int
    ttft: Stats
    tpot: Stats
    itl: Stats
    e2e: Stats
    slo_ttft_s: float | None
    slo_tpot_s: float | None
    attainment: float | None  # fraction of all requests that succeeded within every SLO; None without an SLO
    slo_max_gap_s: float | None = None

    @property
    def cache_hit_rate(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


def stats(values: Sequence[float]) -> Stats:
    if len(values) == 0:
        return Stats(0, None, None, None, None)
    a = np.asarray(values, dtype=float)
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return Stats(len(a), float(a.mean()), float(p50), float(p90), float(p99))


def ttft(r: RequestRecord) -> float | None:
    return r.first_token_s - r.sent_s if r.ok and r.first_token_s is not None else None


def e2e(r: RequestRecord) -> float | None:
    return r.end_s - r.sent_s if r.ok and r.end_s is not None else None


def tpot(r: RequestRecord) -> float | None:
    first, total = ttft(r), e2e(r)
    if first is None or total is None or r.completion_tokens < 2:
        return None
    return (total - first) / (r.completion_tokens - 1)


def itls(r: RequestRecord) -> list[float]:
    return np.diff(r.token_times_s).tolist() if r.ok else []


def worst_gap(r: RequestRecord) -> float | None:
    """The longest gap between consecutive output chunks (None with fewer than two)."""
    gaps = itls(r)
    return max(gaps) if gaps else None


def meets_slo(r: RequestRecord, slo: SLO) -> bool:
    """Succeeded, and within every target set. A one-token reply has no TPOT and no gap, so it cannot miss those."""
    if not r.ok:
        return False
    if slo.ttft_s is not None and not ttft(r) <= slo.ttft_s:
        return False
    if slo.max_gap_s is not None and (gap := worst_gap(r)) is not None and not gap <= slo.max_gap_s:
        return False
    per_token = tpot(r)
    return slo.tpot_s is None or per_token is None or per_token <= slo.tpot_s


def misses_allowed(requests: int, target: float) -> int:
    """How many of `requests` may miss the SLO with the attainment still at `target` or above: one more miss
    and the verdict is a fail, whatever the rest do."""
    return math.floor((1 - target) * requests + 1e-9)


def certain_miss(r: RequestRecord, slo: SLO, now: float) -> bool:
    """Whether request `r`, as observed by `now` (the run's clock), can no longer meet `slo`, however the rest
    of it goes: it ended outside the SLO, or its first token is later than the TTFT target allows, or a gap
    (the one still open included) is past the stall bound, or the time since its first token already spreads
    over more than the TPOT target for every token it asked for (fewer tokens would only raise its TPOT)."""
    if r.end_s is not None or r.error_kind is not None:
        return not meets_slo(r, slo)
    if r.sent_s is None:
        return False
    if slo.ttft_s is not None and (r.first_token_s if r.first_token_s is not None else now) - r.sent_s > slo.ttft_s:
        return True
    if r.first_token_s is None:
        return False
    if slo.max_gap_s is not None and max(np.diff([*r.token_times_s, now])) > slo.max_gap_s:
        return True
    return slo.tpot_s is not None and r.output_len >= 2 and (now - r.first_token_s) / (r.output_len - 1) > slo.tpot_s


def attainment(records: Sequence[RequestRecord], slo: SLO) -> float:
    return sum(meets_slo(r, slo) for r in records) / len(records) if records else 0.0


def summarize(records: Sequence[RequestRecord], slo: SLO = SLO()) -> Summary:
    ok = [r for r in records if r.ok]
    sent = [r.sent_s for r in records if r.sent_s is not None]
    ended = [r.end_s for r in records if r.end_s is not None]
    duration = max(ended) - min(sent) if sent and ended else 0.0
    out_tokens = sum(r.completion_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens if r.prompt_tokens is not None else r.input_len for r in ok)

    def rate(x: float) -> float:
        return x / duration if duration > 0 else 0.0

    return Summary(
        num_requests=len(records),
        num_ok=len(ok),
        errors=dict(sorted(Counter(r.error_label for r in records if not r.ok).items())),
        duration_s=duration,
        request_throughput=rate(len(ok)),
        output_throughput=rate(out_tokens),
        total_token_throughput=rate(in_tokens + out_tokens),
        prompt_tokens=in_tokens,
        cached_tokens=sum(r.cached_tokens or 0 for r in ok),
        short_outputs=sum(r.completion_tokens < r.output_len for r in ok),
        ttft=stats(_defined(ttft, ok)),
        tpot=stats(_defined(tpot, ok)),
        itl=stats([g for r in ok for g in itls(r)]),
        e2e=stats(_defined(e2e, ok)),
        slo_ttft_s=slo.ttft_s,
        slo_tpot_s=slo.tpot_s,
        attainment=attainment(records, slo) if slo.set else None,
        slo_max_gap_s=slo.max_gap_s,
    )


def _defined(metric, records: Sequence[RequestRecord]) -> list[float]:
    return [v for v in map(metric, records) if v is not None]
