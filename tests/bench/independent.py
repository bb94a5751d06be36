"""A second, deliberately separate computation of a run's summary from raw records, to check metrics.py.

Plain Python: sorted lists and the textbook linear-interpolation percentile, no numpy.
"""

from __future__ import annotations

import math

from splitserve.workload.record import RequestRecord


def percentile(values: list[float], p: float) -> float:
    v = sorted(values)
    k = (len(v) - 1) * p / 100
    lo = math.floor(k)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def describe(values: list[float]) -> dict[str, float]:
    return {
        "count": len(values),
        "mean": sum(values) / len(values),
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
    }


def succeeded(r: RequestRecord) -> bool:
    return r.status == 200 and r.error_kind is None


def latencies(records: list[RequestRecord]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"ttft": [], "tpot": [], "itl": [], "e2e": []}
    for r in records:
        if not succeeded(r):
            continue
        out["ttft"].append(r.first_token_s - r.sent_s)
        out["e2e"].append(r.end_s - r.sent_s)
        if r.completion_tokens > 1:
            out["tpot"].append((r.end_s - r.first_token_s) / (r.completion_tokens - 1))
        out["itl"] += [b - a for a, b in zip(r.token_times_s, r.token_times_s[1:])]
    return out


def attainment(records: list[RequestRecord], slo_ttft: float | None, slo_tpot: float | None) -> float:
    met = 0
    for r in records:
        if not succeeded(r):
            continue
        if slo_ttft is not None and r.first_token_s - r.sent_s > slo_ttft:
            continue
        if slo_tpot is not None and r.completion_tokens > 1:
            if (r.end_s - r.first_token_s) / (r.completion_tokens - 1) > slo_tpot:
                continue
        met += 1
    return met / len(records)


def assert_summary_matches(summary, records: list[RequestRecord], slo_ttft=None, slo_tpot=None) -> None:
    """summary (metrics.Summary) agrees with the independent computation to 1e-9 relative."""
    lat = latencies(records)
    for key, values in lat.items():
        got = getattr(summary, key)
        if not values:
            assert got.count == 0
            continue
        want = describe(values)
        assert got.count == want["count"], key
        for q in ("mean", "p50", "p90", "p99"):
            assert math.isclose(getattr(got, q), want[q], rel_tol=1e-9, abs_tol=1e-12), (key, q)
    ok = [r for r in records if succeeded(r)]
    assert summary.num_ok == len(ok)
    failures: dict[str, int] = {}
    for r in records:
        if not succeeded(r):
            label = f"HTTP {r.status}" if r.error_kind == "http" else r.error_kind
            failures[label] = failures.get(label, 0) + 1
    assert summary.errors == failures
    assert summary.short_outputs == sum(r.completion_tokens < r.output_len for r in ok)
    duration = max(r.end_s for r in records if r.end_s is not None) - min(r.sent_s for r in records if r.sent_s is not None)
    assert math.isclose(summary.duration_s, duration)
    assert math.isclose(summary.request_throughput, len(ok) / duration)
    assert math.isclose(summary.output_throughput, sum(r.completion_tokens for r in ok) / duration)
    if slo_ttft is not None or slo_tpot is not None:
        assert math.isclose(summary.attainment, attainment(records, slo_ttft, slo_tpot))
