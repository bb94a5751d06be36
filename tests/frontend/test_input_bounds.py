"""Input a careless or hostile client sends costs bounded work and gets a clear 4xx: lone surrogates,
prompts far over the context, bodies over the size cap. None of it reaches the engine."""

from __future__ import annotations

import time

import httpx
import pytest

from splitserve.runtime.frontend.app import create_app
from tests.runtime.deployment import loaded_bound

pytestmark = pytest.mark.anyio

CHAT = {"model": "tiny-test", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}


def _error(response: httpx.Response, status: int = 400) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", b'{"prompt": "a \\ud800 b", "max_tokens": 2}', "prompt"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x\\udfff"}], "max_tokens": 2}', "messages[0].content"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud83d"}]}]}',
     "messages[0].content"),
])
async def test_a_lone_surrogate_is_400_naming_the_field(client, engine, path, body, param):
    error = _error(await client.post(path, content=body, headers={"content-type": "application/json"}))
    assert error["param"] == param
    assert "not valid Unicode" in error["message"]
    assert engine.calls == []


async def test_a_prompt_that_cannot_fit_is_refused_without_tokenizing_it(client, engine, tokenizer, monkeypatch):
    calls = []
    monkeypatch.setattr(tokenizer, "encode", lambda *a, **k: calls.append(a) or [1])
    huge = "x" * (256 * tokenizer.max_token_bytes + 1)
    error = _error(await client.post("/v1/completions", json={"prompt": huge, "max_tokens": 2}))
    assert error["param"] == "prompt" and error["code"] == "context_length_exceeded"
    assert "256-token context" in error["message"]
    assert calls == [] and engine.calls == []
    chat = {**CHAT, "messages": [{"role": "user", "content": huge}]}
    assert _error(await client.post("/v1/chat/completions", json=chat))["param"] == "messages[0].content"
    assert calls == []


async def test_the_bound_only_refuses_text_that_really_cannot_fit(client, tokenizer):
    # Text right at the bound is tokenized and judged by its real length (here: too long, by token count).
    at_bound = "x" * (256 * tokenizer.max_token_bytes)
    error = _error(await client.post("/v1/completions", json={"prompt": at_bound, "max_tokens": 2}))
    assert "tokens" in error["message"] and "bytes of text" not in error["message"]


async def test_max_token_bytes_bounds_every_encoding(tokenizer):
    text = "The quick brown fox, 1234567890!! \n\n\t  ééé 漢字 🙂 " * 20
    assert len(text.encode()) <= len(tokenizer.encode(text, add_special_tokens=False)) * tokenizer.max_token_bytes


@pytest.fixture
def small_app(engine):
    return create_app(engine, max_body_bytes=1000)


async def test_a_body_over_the_cap_is_413_before_parsing(engine, small_app):
    async with httpx.AsyncClient(transport=httpx.ASGITransport(small_app), base_url="http://test") as c:
        big = {"prompt": "x" * 2000, "max_tokens": 2}
        error = _error(await c.post("/v1/completions", json=big), 413)
        assert "1,000 bytes" in error["message"] and error["code"] == "request_too_large"

        async def chunked():  # no Content-Length: the cap still holds while reading
            for _ in range(5):
                yield b" " * 400

        r = await c.post("/v1/completions", content=chunked(), headers={"content-type": "application/json"})
        assert _error(r, 413)["code"] == "request_too_large"
        ok = await c.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 2})
        assert ok.status_code == 200
    assert len(engine.calls) == 1


async def test_a_10_mb_prompt_is_refused_at_once(client, engine):
    start = time.perf_counter()
    r = await client.post("/v1/completions", json={"prompt": "word " * 2_000_000, "max_tokens": 2})
    elapsed = time.perf_counter() - start
    assert _error(r, 413)["code"] == "request_too_large"
    # Refused from the header alone: no parsing or tokenizing (that took 30 s). 5 s on a quiet machine,
    # stretched by load (the client side still has to build the 10 MB body).
    assert elapsed < loaded_bound(5.0)
    assert engine.calls == []
