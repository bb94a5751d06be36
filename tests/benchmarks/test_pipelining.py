"""The pure parts of benchmarks.pipelining: metric deltas, per-case summaries and the headline figures."""

from __future__ import annotations

import pytest

from benchmarks.pipelining import headline, scrape, spread, summarize_case, transfer_delta

METRICS = """\
# HELP splitserve_kv_transfer_bytes_total KV bytes sent to decode workers
# TYPE splitserve_kv_transfer_bytes_total counter
splitserve_kv_transfer_bytes_total {bytes}
# HELP splitserve_kv_transfer_seconds Prefill start to last KV byte sent
# TYPE splitserve_kv_transfer_seconds histogram
splitserve_kv_transfer_seconds_bucket{{le="+Inf"}} {n}
splitserve_kv_transfer_seconds_count {n}
splitserve_kv_transfer_seconds_sum {transfer}
# HELP splitserve_kv_transfer_exposed_seconds Transfer time not hidden behind compute
# TYPE splitserve_kv_transfer_exposed_seconds histogram
splitserve_kv_transfer_exposed_seconds_bucket{{le="+Inf"}} {n}
splitserve_kv_transfer_exposed_seconds_count {n}
splitserve_kv_transfer_exposed_seconds_sum {exposed}
# HELP splitserve_kv_transfer_failures_total Failed KV transfers by cause
# TYPE splitserve_kv_transfer_failures_total counter
splitserve_kv_transfer_failures_total{{cause="timeout"}} {timeouts}
splitserve_kv_transfer_failures_total{{cause="connection"}} 1.0
"""


def metrics(n=0, transfer=0.0, exposed=0.0, bytes=0, timeouts=0):
    return scrape(METRICS.format(n=n, transfer=transfer, exposed=exposed, bytes=bytes, timeouts=timeouts))


def test_scrape_sums_label_sets():
    m = metrics(n=2, exposed=0.5, timeouts=3)
    assert m["splitserve_kv_transfer_exposed_seconds_sum"] == 0.5
    assert m["splitserve_kv_transfer_seconds_count"] == 2
    assert m["splitserve_kv_transfer_failures_total"] == 4  # timeout + connection


def test_delta_of_one_transfer():
    before = metrics(n=1, transfer=1.0, exposed=0.25, bytes=100)
    after = metrics(n=2, transfer=3.0, exposed=0.75, bytes=350)
    assert transfer_delta(before, after) == {"ok": True, "exposed_s": 0.5, "transfer_s": 2.0, "bytes": 250}


def test_delta_is_none_while_the_transfer_runs():
    m = metrics(n=1, transfer=1.0)
    assert transfer_delta(m, m) is None


def test_delta_of_a_failed_transfer():
    d = transfer_delta(metrics(timeouts=0), metrics(timeouts=1))
    assert d == {"ok": False, "exposed_s": None, "transfer_s": None, "bytes": None}


def test_spread_skips_missing_runs():
    assert spread([3.0, None, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "runs": [3.0, None, 1.0, 2.0]}
    assert spread([None])["median"] is None


def test_summary_adds_wire_times():
    samples = [{"ok": True, "bytes": 3000, "exposed_s": 0.01, "prefill_s": 1.0}, {"ok": False, "bytes": None}]
    s = summarize_case(samples, layers=30, link_bytes_per_s=1000.0)
    assert s["failures"] == 1
    assert s["wire_s"] == pytest.approx(3.0)
    assert s["one_layer_wire_s"] == pytest.approx(0.1)
    assert s["exposed_s"]["median"] == 0.01
    assert s["exposed_fraction"] == pytest.approx(0.01)


def test_headline_from_medians():
    def case(exposed, prefill, decode_view):
        return {"exposed_s": {"median": exposed}, "prefill_s": {"median": prefill},
                "kv_done_after_ttft_s": {"median": decode_view}}

    cases = {"1gbit/pipelined/2048": case(0.02, 5.0, 0.05), "1gbit/unpipelined/2048": case(0.6, 5.0, 0.8)}
    fraction, gain = headline(cases, "1gbit", 2048)
    assert fraction == pytest.approx(0.004)
    assert gain == pytest.approx(30.0)
    assert headline(cases, "1gbit", 2048, key="kv_done_after_ttft_s") == (pytest.approx(0.01), pytest.approx(16.0))
    assert headline(cases, "100mbit", 2048) == (None, None)


def test_no_gain_when_pipelined_hid_everything():
    cases = {"1gbit/pipelined/2048": {"exposed_s": {"median": 0.0}, "prefill_s": {"median": 5.0}}}
    assert headline(cases, "1gbit", 2048) == (0.0, None)
