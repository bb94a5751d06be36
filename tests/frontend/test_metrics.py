"""/metrics: request latencies and token counts observed per request, engine state read at scrape time."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from splitserve.runtime.frontend.app import create_app

pytestmark = pytest.mark.anyio


async def scrape(client) -> dict[tuple[str, tuple], float]:
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


async def test_a_request_is_observed_in_every_histogram_and_counter(client, engine, tokenizer):
    engine.reply = tokenizer.encode("one two three four", add_special_tokens=False)
    engine.num_cached_tokens = 4
    engine.queue_time = 0.02
    engine.token_delay = 0.002
    before = await scrape(client)
    assert before[("splitserve_time_to_first_token_seconds_count", ())] == 0
    assert (await client.post("/v1/completions", json={"prompt": "Hello there", "max_tokens": 20})).status_code == 200
    m = await scrape(client)

    n = len(engine.reply)
    assert m[("splitserve_time_to_first_token_seconds_count", ())] == 1
    assert m[("splitserve_inter_token_latency_seconds_count", ())] == n - 1
    assert m[("splitserve_inter_token_latency_seconds_sum", ())] >= (n - 1) * 0.002
    assert m[("splitserve_e2e_request_latency_seconds_count", ())] == 1
    assert m[("splitserve_e2e_request_latency_seconds_sum", ())] >= (n - 1) * 0.002
    assert m[("splitserve_request_queue_time_seconds_count", ())] == 1
    assert m[("splitserve_request_queue_time_seconds_sum", ())] == pytest.approx(0.02)
    # The queue time landed in the right bucket.
    assert m[("splitserve_request_queue_time_seconds_bucket", (("le", "0.01"),))] == 0
    assert m[("splitserve_request_queue_time_seconds_bucket", (("le", "0.05"),))] == 1
    assert m[("splitserve_requests_total", (("finish_reason", "length"),))] == 1
    assert m[("splitserve_prompt_tokens_total", ())] == len(tokenizer.encode("Hello there"))
    assert m[("splitserve_generation_tokens_total", ())] == n


async def test_engine_state_is_read_at_scrape_time(client, engine):
    assert (await client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 3})).status_code == 200
    engine.num_cached_tokens = 2
    assert (await client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 3})).status_code == 200
    m = await scrape(client)
    # From FakeEngine.stats(): nothing running now, 3 waiting, 75 of 100 blocks free.
    assert m[("splitserve_num_requests_running", ())] == 0
    assert m[("splitserve_num_requests_waiting", ())] == 3
    assert m[("splitserve_kv_cache_usage_ratio", ())] == pytest.approx(0.25)
    assert m[("splitserve_prefix_cache_queried_tokens_total", ())] == engine.prefix_queries > 0
    assert m[("splitserve_prefix_cache_hit_tokens_total", ())] == 2


async def test_aborts_rejections_and_stop_strings_are_counted_by_reason(client, engine, tokenizer):
    engine.reply = tokenizer.encode("a b c", add_special_tokens=False)
    engine.endless = True
    await client.post("/v1/completions", json={"prompt": "x", "stop": "c"})
    engine.overloaded_retry_after = 1
    await client.post("/v1/completions", json={"prompt": "x"})
    m = await scrape(client)
    assert m[("splitserve_requests_total", (("finish_reason", "stop"),))] == 1
    assert m[("splitserve_requests_total", (("finish_reason", "rejected"),))] == 1
    assert m[("splitserve_time_to_first_token_seconds_count", ())] == 1


async def test_a_failing_engine_does_not_break_the_scrape(engine):
    def broken():
        raise RuntimeError("stats unavailable")

    engine.stats = broken
    async with httpx.AsyncClient(transport=httpx.ASGITransport(create_app(engine)), base_url="http://test") as client:
        m = await scrape(client)
    assert ("splitserve_time_to_first_token_seconds_count", ()) in m
    assert ("splitserve_num_requests_running", ()) not in m


def test_apps_keep_separate_registries(engine):
    # Two apps in one process (tests, several models) must not collide in a global registry.
    create_app(engine)
    create_app(engine)
