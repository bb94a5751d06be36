"""The dashboard against a live 1P1D deployment (tiny random model): `/debug/trace` holds every real
request's phases on the workers that ran them; `/debug/dashboard` shows both pools; and the `/dashboard`
page, in headless Chromium (Debian's `chromium` package) under load, renders, updates its charts and logs
no console error. Set SPLITSERVE_DASHBOARD_SCREENSHOT=docs/dashboard.png to refresh the README's picture."""

from __future__ import annotations

import asyncio
import os
import random
import threading
from pathlib import Path

import httpx
import pytest

from tests.frontend.headless import Chromium, chromium_path
from tests.runtime.deployment import Deployment, loaded_bound
from tests.tiny_models import make_tiny_checkpoint


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    checkpoint = make_tiny_checkpoint(tmp_path_factory.mktemp("dash"), layers=3, seed=5)
    with Deployment(checkpoint, "--prefill", "1", "--decode", "1", "--no-conditional", "--block-size", "16",
                    "--num-blocks", "256") as dep:
        yield dep


def prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 380) for _ in range(rng.randint(8, 90))] for _ in range(n)]


async def complete_all(url: str, ps: list[list[int]]) -> None:
    async with httpx.AsyncClient(timeout=120) as client:
        async def one(p: list[int]) -> None:
            r = await client.post(url + "/v1/completions", json={"prompt": p, "max_tokens": 6, "temperature": 0, "ignore_eos": True})
            assert r.status_code == 200, r.text
        await asyncio.gather(*(one(p) for p in ps))


def test_trace_holds_each_request_on_the_workers_that_ran_it(deployment):
    asyncio.run(complete_all(deployment.url, prompts(6, seed=1)))
    records = deployment.requests()[-6:]
    trace = deployment.operator.get(deployment.url + "/debug/trace", timeout=10).json()
    events = trace["traceEvents"]
    procs = {e["pid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "process_name"}
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    spans = [e for e in events if e["ph"] == "X"]
    assert all(e["dur"] >= 0 for e in spans)
    for rec in records:
        assert rec["path"] == "split", rec["events"]
        mine = [e for e in spans if threads[(e["pid"], e["tid"])] == rec["request_id"]]
        where = {e["name"]: procs[e["pid"]] for e in mine}
        assert where == {
            "request": "frontend", "reserve": "frontend", "queue": f"prefill {rec['prefill_worker']}",
            "prefill": f"prefill {rec['prefill_worker']}", "transfer": "kv link",
            "wait-for-KV": f"decode {rec['decode_worker']}", "decode": f"decode {rec['decode_worker']}",
        }, rec
        by = {e["name"]: e for e in mine}
        assert by["request"]["dur"] == pytest.approx(rec["e2e_s"] * 1e6, abs=1)
        assert by["request"]["args"]["output_tokens"] == 6
        start, end = by["request"]["ts"], by["request"]["ts"] + by["request"]["dur"]
        # Phases measured on the frontend's clock lie inside the request and follow each other.
        for name in ("reserve", "queue", "prefill", "decode"):
            assert start <= by[name]["ts"] and by[name]["ts"] + by[name]["dur"] <= end + 1, name
        assert by["queue"]["ts"] + by["queue"]["dur"] == pytest.approx(by["prefill"]["ts"], abs=1)
        assert by["prefill"]["dur"] == pytest.approx(rec["prefill_s"] * 1e6, abs=1)


def test_data_shows_both_pools_and_the_latencies(deployment):
    deployment.operator.get(deployment.url + "/debug/dashboard", timeout=10).raise_for_status()  # opens the window
    asyncio.run(complete_all(deployment.url, prompts(4, seed=2)))
    data = deployment.operator.get(deployment.url + "/debug/dashboard?timeline=4", timeout=10).json()
    workers = {w["role"]: w for w in data["workers"]}
    assert set(workers) == {"prefill", "decode"} and all(w["status"] == "ok" for w in workers.values())
    for w in workers.values():
        assert 0.0 <= w["kv_usage"] <= 1.0 and w["compute_util"] > 0 and w["bandwidth_util"] > 0, w
    assert workers["prefill"]["transfers"] >= 4 and workers["prefill"]["transfer_bytes"] > 0
    assert workers["decode"]["kv_wait_p90_s"] is not None
    assert data["window_s"] > 0
    assert data["requests"]["finished"] == 4  # what finished since the first read: these four

    assert data["latency"]["ttft"]["p90"] > 0 and data["latency"]["itl"]["p50"] > 0
    assert [r["id"] for r in data["timeline"]] == [r["request_id"] for r in deployment.requests()[-4:]]
    assert all(r["spans"] and all(s["end"] <= 0 for s in r["spans"]) for r in data["timeline"])  # before "now"


@pytest.mark.skipif(chromium_path() is None, reason="no chromium: apt-get install chromium (Debian's package)")
def test_page_renders_and_updates_under_load_in_headless_chromium(deployment, tmp_path):
    stop = threading.Event()

    def load(seed: int) -> None:
        with httpx.Client(timeout=120) as client:
            for p in prompts(10_000, seed):
                if stop.is_set():
                    return
                try:
                    client.post(deployment.url + "/v1/completions",
                                json={"prompt": p, "max_tokens": 12, "temperature": 0, "ignore_eos": True})
                except httpx.HTTPError:  # the load is the background; what the page shows is under test
                    pass

    loaders = [threading.Thread(target=load, args=(seed,)) for seed in (10, 11, 12)]
    for t in loaders:
        t.start()
    try:
        with Chromium(startup_timeout=loaded_bound(60), call_timeout=loaded_bound(30)) as browser:
            page = browser.page()
            page.send("Page.navigate", {"url": deployment.url + "/dashboard?interval=500"})
            page.wait_for("document.readyState === 'complete' && !document.getElementById('login').hidden", loaded_bound(30))
            page.evaluate(f"document.getElementById('token').value = {deployment.admin_token!r};"
                          "document.getElementById('login').requestSubmit(); true")
            rows = "Array.from(document.querySelectorAll('#workers tbody tr')).map(r => r.cells[1].textContent + ' ' + r.cells[2].textContent)"
            # Both workers listed and healthy (a scrape that times out on a loaded machine shows one as
            # unreachable for a poll: wait for a poll that reached both).
            page.wait_for(f"!document.getElementById('main').hidden && {rows}.sort().join() === 'decode ok,prefill ok'",
                          loaded_bound(30))
            first = page.evaluate("charts['chart-ttft'].data[0].length")
            # The charts update: more points, and the TTFT percentiles of the requests being served.
            page.wait_for(f"charts['chart-ttft'].data[0].length >= {first} + 4", loaded_bound(30))
            page.wait_for("charts['chart-ttft'].data[1].some(v => v > 0) && charts['chart-util'].data.length === 5", loaded_bound(30))
            page.wait_for("document.getElementById('timeline').height > 60", loaded_bound(30))  # request rows drawn
            assert page.evaluate("sessionStorage.getItem('splitserve-operator-token')") == deployment.admin_token
            shot = Path(os.environ.get("SPLITSERVE_DASHBOARD_SCREENSHOT") or tmp_path / "dashboard.png")
            page.screenshot(shot)
            assert shot.stat().st_size > 10_000
            assert page.problems() == []
            page.close()
    finally:
        stop.set()
        for t in loaders:
            t.join()
    assert all(free == total for free, total in deployment.wait_all_free().values())


def test_page_is_open_and_its_data_takes_the_operator_token(deployment):
    assert httpx.get(deployment.url + "/dashboard", timeout=10).status_code == 200
    for path in ("/debug/dashboard", "/debug/trace"):
        assert httpx.get(deployment.url + path, timeout=10).status_code == 401
        assert httpx.get(deployment.url + path, headers={"authorization": "Bearer guess"}, timeout=10).status_code == 403
