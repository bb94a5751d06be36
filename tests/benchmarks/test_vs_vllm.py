"""The pure parts of benchmarks.vs_vllm: spreads over runs (some of which may have failed), ratios, the table."""

from __future__ import annotations

import pytest

from benchmarks.vs_vllm import ratio, spread, table


def test_spread_skips_runs_that_measured_nothing():
    assert spread([3.0, None, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "runs": [3.0, None, 1.0, 2.0]}
    assert spread([None])["median"] is None


def test_ratio():
    assert ratio(1.5, 3.0) == pytest.approx(0.5)
    assert ratio(None, 3.0) is None and ratio(1.0, None) is None and ratio(1.0, 0.0) is None


def _summary(ttft: float | None, tpot: float | None) -> dict:
    stats = lambda v: {"p50": v, "p90": v, "p99": v}  # noqa: E731
    return {"ttft": stats(ttft), "tpot": stats(tpot), "itl": stats(tpot), "output_throughput": 10.0}


def test_table_takes_medians_over_runs_and_batch1_rate_from_tpot():
    m = {"startup_s": 5.0,
         "rates": {"0.25": [_summary(1.0, 0.1), _summary(3.0, 0.3), _summary(2.0, 0.2)]},
         "b1": [_summary(0.1, 0.05), _summary(None, None)]}
    t = table(m, [0.25])
    assert t["0.25"]["ttft_p50"]["median"] == 2.0
    assert t["0.25"]["tpot_p90"]["min"] == 0.1 and t["0.25"]["tpot_p90"]["max"] == 0.3
    assert t["b1_tok_s"]["median"] == pytest.approx(20.0)  # 1 / 50 ms; the failed run counts for nothing
