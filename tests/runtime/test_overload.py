"""300 concurrent streams against a live 1P1D, and against colocated: every request completes, or is refused
with 429 / 503 before its first byte (a Retry-After on each); no stream is accepted (200) and then dropped;
no worker is taken for dead because it is busy; every KV block is back afterwards.

The deployment is deliberately small (64 KV blocks, a tiny random model) so that 300 streams overload it:
requests wait for decode blocks and queue for prefill, which is what the admission bound is for. A few
requests go first, so that the frontend has measured its first-token rate (before any is measured, only the
count bounds admission: README, Limits)."""

from __future__ import annotations

import asyncio
import json

import time

import httpx
import pytest

from tests.runtime.deployment import Deployment, loaded_bound
from tests.tiny_models import make_tiny_checkpoint

STREAMS = 300
MAX_TOKENS = 16
COMMON = ["--block-size", "16", "--num-blocks", "64", "--max-model-len", "512", "--no-conditional"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("overload"), layers=2, seed=8)


async def stream_one(client: httpx.AsyncClient, url: str, i: int) -> tuple[str, str]:
    """("done" | "refused" | "dropped", detail)."""
    prompt = [(i * 13 + j) % 300 + 3 for j in range(40 + i % 40)]
    body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                if r.status_code in (429, 503) and int(r.headers.get("retry-after", "0")) >= 1:
                    return "refused", str(r.status_code)
                return "dropped", f"{r.status_code} {r.headers.get('retry-after')} {r.text[:200]}"
            usage, finish = None, None
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return "dropped", chunk["error"]["message"]
                usage = chunk.get("usage") or usage
                for c in chunk.get("choices", []):
                    finish = c.get("finish_reason") or finish
            if finish == "length" and usage and usage["completion_tokens"] == MAX_TOKENS:
                return "done", ""
            return "dropped", f"ended early: {finish} {usage}"
    except httpx.HTTPError as exc:
        return "dropped", f"{type(exc).__name__}: {exc}"


async def burst(url: str, n: int) -> list[tuple[str, str]]:
    limits = httpx.Limits(max_connections=n + 8, max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(10.0, read=None)) as client:
        return await asyncio.gather(*(stream_one(client, url, i) for i in range(n)))


@pytest.mark.parametrize("pools", [("--prefill", "1", "--decode", "1"), ("--colocated", "1")], ids=["1p1d", "colocated"])
def test_300_streams_complete_or_are_refused_before_the_first_byte(checkpoint, pools):
    with Deployment(checkpoint, *pools, *COMMON) as dep:
        before = dep.free_blocks()
        workers = len(dep.workers())
        assert all(outcome == "done" for outcome, _ in asyncio.run(burst(dep.url, 8)))
        results = asyncio.run(burst(dep.url, STREAMS))
        dropped = [detail for outcome, detail in results if outcome == "dropped"]
        assert not dropped, f"{len(dropped)} streams dropped, e.g. {dropped[:5]}"
        done = sum(outcome == "done" for outcome, _ in results)
        assert done > 0
        # A worker starved by the burst may be dropped for silence (5 s), but it rejoins once it answers.
        end = time.monotonic() + loaded_bound(10)
        while len(dep.workers()) != workers:
            assert time.monotonic() < end, dep.workers()
            time.sleep(0.2)
        after = dep.wait_all_free()
        assert after == before, (before, after)
