"""The dashboard's parts without a deployment: quantiles as Prometheus computes them, the sliding window,
the phase layout and its trace export, the routes and who may read them, the page's script."""

from __future__ import annotations

import json
import math
import shutil
import subprocess

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram

from splitserve.runtime.auth import Guard, Rule
from splitserve.runtime.frontend.app import create_app
from splitserve.runtime.frontend.dashboard import ASSETS, STATIC
from splitserve.runtime.frontend.metric_window import Window, flatten, histogram_quantile
from splitserve.runtime.frontend.phases import PhaseRecord
from splitserve.runtime.frontend.timeline import chrome_trace, exposed_transfer_s, phase_spans

BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0)


def observed(values: list[float]) -> dict:
    r = CollectorRegistry()
    h = Histogram("lat_seconds", "x", buckets=BUCKETS, registry=r)
    for v in values:
        h.observe(v)
    return flatten(r.collect())


def test_quantile_interpolates_inside_its_bucket_as_prometheus_does():
    # 10 observations: 4 in (0, 0.01], 4 in (0.05, 0.1], 2 in (1, 5]. p50 is rank 5: the first of the 4 in
    # (0.05, 0.1] -> 0.05 + 0.05 * 1/4. p99 (rank 9.9) falls in (1, 5]: 1 + 4 * 1.9/2.
    s = observed([0.005] * 4 + [0.07] * 4 + [2.0] * 2)
    assert histogram_quantile(0.5, s, "lat_seconds") == pytest.approx(0.0625)
    assert histogram_quantile(0.99, s, "lat_seconds") == pytest.approx(4.8)
    assert histogram_quantile(0.2, s, "lat_seconds") == pytest.approx(0.005)  # first bucket starts at 0
    assert histogram_quantile(0.9, observed([9.0] * 3), "lat_seconds") == 5.0  # +Inf: the highest finite bound
    assert histogram_quantile(0.5, observed([]), "lat_seconds") is None


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0.0, 8.0), min_size=1, max_size=60), st.sampled_from([0.5, 0.9, 0.99]))
def test_quantile_lands_in_the_bucket_of_the_true_quantile(values, q):
    est = histogram_quantile(q, observed(values), "lat_seconds")
    # The observation of rank ceil(q*n) is the one Prometheus' rank q*n points into: same bucket.
    true = sorted(values)[max(0, math.ceil(q * len(values)) - 1)]
    bounds = (0.0, *BUCKETS, math.inf)
    i = next(k for k in range(1, len(bounds)) if true <= bounds[k])
    lo, hi = bounds[i - 1], bounds[i]
    top = hi if math.isfinite(hi) else BUCKETS[-1]
    assert lo - 1e-9 <= est <= top + 1e-9, (est, true)  # interpolation may land a rounding error past the bound


def test_window_counts_what_grew_within_it_and_survives_a_restart():
    w = Window(window_s=10.0)
    key = ("c_total", ())
    assert w.increase() == ({}, 0.0)
    w.add(0.0, {key: 5.0})
    assert w.increase() == ({key: 5.0}, 0.0)  # one read: totals since the source started
    for t, v in ((5.0, 8.0), (10.0, 12.0), (15.0, 20.0)):
        w.add(t, {key: v})
    assert w.increase() == ({key: 12.0}, 10.0)  # 20 - 8, from the read at the window's start
    w.add(16.0, {key: 3.0})  # the process restarted: its counter began again at 0
    assert w.increase()[0][key] == 3.0
    assert w.latest() == {key: 3.0}


def split_record() -> PhaseRecord:
    return PhaseRecord("r1", arrival=100.0, path="split", prefill_worker="P", decode_worker="D", prompt_tokens=40,
                       output_tokens=5, reserve_s=0.01, queue_s=0.02, prefill_s=0.1, ttft_s=0.15, kv_wait_s=0.14,
                       decode_s=0.25, e2e_s=0.4, finish_reason="length")


def test_split_phases_follow_each_other_on_their_workers():
    spans = {(s.track, s.name): (round(s.start - 100.0, 6), round(s.end - 100.0, 6)) for s in phase_spans(split_record())}
    assert spans == {
        ("frontend", "request"): (0.0, 0.4),
        ("frontend", "reserve"): (0.0, 0.01),
        ("P", "queue"): (0.01, 0.03),
        ("P", "prefill"): (0.03, 0.13),
        ("kv link", "transfer"): (0.03, 0.15),  # layer by layer: overlaps the prefill
        ("D", "wait-for-KV"): (0.01, 0.15),
        ("D", "decode"): (0.15, 0.4),
    }
    assert exposed_transfer_s(split_record()) == pytest.approx(0.02)  # KV complete 20 ms after the last layer


def test_a_late_kv_estimate_never_runs_past_the_request():
    # D's wait-for-KV (its own clock, from its reservation) plus the frontend's later view of that reservation
    # can add up past the end: phases stay inside the request, and decode still shows.
    rec = split_record()
    rec.kv_wait_s = 0.45
    spans = {s.name: s for s in phase_spans(rec)}
    assert all(s.end <= 100.4 + 1e-9 for s in spans.values())
    assert spans["decode"].start == pytest.approx(100.15) and spans["wait-for-KV"].end == pytest.approx(100.4)


def test_local_and_recompute_paths_show_where_they_ran():
    local = PhaseRecord("r2", 5.0, path="local", decode_worker="D", queue_s=0.1, ttft_s=0.3, e2e_s=1.0)
    assert [(s.track, s.name) for s in phase_spans(local)] == [
        ("frontend", "request"), ("D", "queue"), ("D", "prefill"), ("D", "decode")]
    failed = PhaseRecord("r3", 5.0, path="recompute", prefill_worker="P", decode_worker="D", reserve_s=0.01,
                         ttft_s=0.5, e2e_s=2.0, events=["prefill worker P lost"])
    names = [(s.track, s.name) for s in phase_spans(failed)]
    assert ("D", "recompute") in names and ("P", "prefill") not in names
    assert all(s.end > s.start for s in phase_spans(failed))


def test_trace_names_each_process_and_thread_once():
    recs = [split_record(), PhaseRecord("r2", 101.0, path="colocated", decode_worker="C", queue_s=0.1, ttft_s=0.3, e2e_s=1.0)]
    trace = json.loads(json.dumps(chrome_trace(recs)))  # plain JSON
    meta = [e for e in trace["traceEvents"] if e["ph"] == "M"]
    procs = {e["args"]["name"]: e["pid"] for e in meta if e["name"] == "process_name"}
    assert set(procs) == {"frontend", "prefill P", "kv link", "decode D", "colocated C"}
    threads = [(e["pid"], e["tid"]) for e in meta if e["name"] == "thread_name"]
    assert len(threads) == len(set(threads))
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert len(spans) == len(phase_spans(recs[0])) + len(phase_spans(recs[1]))
    first = next(e for e in spans if e["name"] == "request" and e["tid"] == 1)
    assert (first["ts"], first["dur"]) == (100e6, pytest.approx(0.4e6)) and first["args"]["finish_reason"] == "length"



@pytest.mark.anyio
async def test_page_and_assets_are_served_with_a_strict_policy(client):
    r = await client.get("/dashboard")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in r.headers["content-security-policy"]
    for name, mime in ASSETS.items():
        a = await client.get(f"/dashboard/{name}")
        assert a.status_code == 200 and a.headers["content-type"].startswith(mime), name
        assert f"/dashboard/{name}" in r.text, name  # the page uses every file it is served with
    assert (await client.get("/dashboard/dashboard.py")).status_code == 404
    assert (await client.get("/dashboard/%2e%2e/app.py")).status_code == 404


@pytest.mark.anyio
async def test_in_process_data_after_a_request(client):
    assert (await client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 3})).status_code == 200
    data = (await client.get("/debug/dashboard")).json()
    assert data["latency"]["ttft"]["count"] == 1 and data["latency"]["ttft"]["p50"] is not None
    assert data["requests"]["finished"] == 1
    assert [w["url"] for w in data["workers"]] == ["in-process"]
    assert data["timeline"] == []  # an in-process engine keeps no phase records
    assert (await client.get("/debug/trace")).json() == {"traceEvents": [], "displayTimeUnit": "ms"}
    bad = await client.get("/debug/trace?limit=0")
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "limit"


@pytest.mark.anyio
async def test_data_needs_the_operator_token_and_the_page_does_not(engine):
    app = create_app(engine)
    app.add_middleware(Guard, rules=[Rule("/debug/", tokens=("op-token",))])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test") as c:
        assert (await c.get("/dashboard")).status_code == 200
        assert (await c.get("/dashboard/dashboard.js")).status_code == 200
        for path in ("/debug/dashboard", "/debug/trace"):
            assert (await c.get(path)).status_code == 401
            assert (await c.get(path, headers={"authorization": "Bearer wrong"})).status_code == 403
            assert (await c.get(path, headers={"authorization": "Bearer op-token"})).status_code == 200


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_page_script_parses():
    subprocess.run(["node", "--check", str(STATIC / "dashboard.js")], check=True)


def test_page_writes_received_text_as_text():
    # What the server sends (request ids, URLs, error messages) must never become markup.
    script = (STATIC / "dashboard.js").read_text()
    assert "innerHTML" not in script and "insertAdjacentHTML" not in script and "eval(" not in script
