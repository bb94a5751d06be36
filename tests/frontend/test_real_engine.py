"""The frontend over the real engine (tiny random model on CPU), wired as `serve` wires it."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from splitserve.model.loader import load_model
from splitserve.runtime.worker.async_engine import AsyncEngine
from splitserve.runtime.worker.engine import Engine, EngineConfig
from splitserve.runtime.frontend.app import create_app
from tests.frontend.test_disconnect import call_then_disconnect

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

GREEDY = {"temperature": 0, "ignore_eos": True, "max_tokens": 10}


@pytest.fixture
def real_engine(checkpoint):
    engine = AsyncEngine(Engine(load_model(checkpoint), EngineConfig(num_blocks=64, max_model_len=256))).start()
    yield engine
    engine.shutdown()


@pytest.fixture
def real_app(real_engine):
    return create_app(real_engine, served_model_name="tiny")


def wait_until_idle(engine: AsyncEngine, timeout: float = 5.0) -> None:
    """Every request gone and every KV block free again (aborts are applied between engine steps)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = engine.stats()
        if (s.num_running, s.num_waiting, s.num_free_blocks) == (0, 0, s.num_total_blocks):
            return
        time.sleep(0.01)
    raise AssertionError(f"engine not idle: {engine.stats()}")


async def test_streamed_and_whole_answers_agree_and_stop_strings_cut(real_app, real_engine):
    http = httpx.AsyncClient(transport=httpx.ASGITransport(real_app), base_url="http://test/v1")
    async with openai.AsyncOpenAI(api_key="x", base_url="http://test/v1", http_client=http, max_retries=0) as oai:
        messages = [{"role": "user", "content": "The quick brown fox"}]
        whole = await oai.chat.completions.create(model="tiny", messages=messages, extra_body=GREEDY)
        text = whole.choices[0].message.content
        assert whole.usage.completion_tokens == 10 and whole.choices[0].finish_reason == "length"
        stream = await oai.chat.completions.create(model="tiny", messages=messages, stream=True, extra_body=GREEDY)
        assert "".join([c.choices[0].delta.content or "" async for c in stream]) == text

        stop = text[len(text) // 2 :][:2]
        cut = await oai.chat.completions.create(model="tiny", messages=messages, stop=[stop], extra_body=GREEDY)
        assert cut.choices[0].message.content == text[: text.find(stop)]
        assert cut.choices[0].finish_reason == "stop"
    wait_until_idle(real_engine)


async def test_client_disconnect_frees_the_blocks(real_app, real_engine):
    body = {"prompt": "Once upon a time", "max_tokens": 200, "ignore_eos": True, "stream": True}
    sent = await call_then_disconnect(real_app, "/v1/completions", body, after_body_chunks=3)
    assert sent[0]["status"] == 200
    wait_until_idle(real_engine)
