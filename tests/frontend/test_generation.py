"""Completions and chat completions, streamed and whole: text, stop strings, usage, what the engine is asked."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from splitserve.runtime.frontend.app import DEFAULT_MAX_TOKENS

pytestmark = pytest.mark.anyio


@pytest.fixture
async def oai(app):
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test/v1")
    async with openai.AsyncOpenAI(api_key="unused", base_url="http://test/v1", http_client=http, max_retries=0) as client:
        yield client


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def sse_events(body: str) -> list[str]:
    """The data payloads of a server-sent-event body; asserts the framing as it goes."""
    assert body.endswith("data: [DONE]\n\n")
    events = body.split("\n\n")[:-2]  # drop [DONE] and what follows its blank line
    assert all(e.startswith("data: ") for e in events)
    return [e[len("data: ") :] for e in events]


async def test_completion_returns_text_usage_and_cached_tokens(client, engine, tokenizer):
    engine.reply = ids(tokenizer, "Paris is the capital")
    engine.num_cached_tokens = 16
    response = await client.post("/v1/completions", json={"prompt": "The capital of France", "max_tokens": 30})
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "text_completion"
    assert body["id"].startswith("cmpl-")
    assert body["model"] == "tiny-test"
    assert body["choices"] == [{"index": 0, "text": "Paris is the capital", "finish_reason": "length", "logprobs": None}]
    prompt = tokenizer.encode("The capital of France")
    n = len(engine.reply)
    assert body["usage"] == {
        "prompt_tokens": len(prompt),
        "completion_tokens": n,
        "total_tokens": len(prompt) + n,
        "prompt_tokens_details": {"cached_tokens": 16},
    }
    (request_id, sent_prompt, params), = engine.calls
    assert request_id == body["id"] and sent_prompt == prompt
    assert params.max_tokens == 30
    # The engine finished the request itself: nothing to abort.
    assert engine.aborts == [] and engine.closed == [request_id]


async def test_prompt_as_token_ids_goes_to_the_engine_unchanged(client, engine):
    assert (await client.post("/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 3})).status_code == 200
    assert engine.calls[0][1] == [5, 6, 7]


async def test_sampling_fields_reach_the_engine(client, engine):
    body = {
        "prompt": "x", "max_tokens": 5, "temperature": 0, "top_p": 0.5, "top_k": 7, "seed": 11,
        "stop_token_ids": [3, 4], "ignore_eos": True,
    }
    assert (await client.post("/v1/completions", json=body)).status_code == 200
    params = engine.calls[0][2]
    assert (params.max_tokens, params.temperature, params.top_p, params.top_k, params.seed) == (5, 0.0, 0.5, 7, 11)
    assert params.stop_token_ids == (3, 4) and params.ignore_eos


async def test_top_k_beyond_the_vocabulary_or_negative_means_no_cut(client, engine):
    for top_k in (-1, 10_000):
        assert (await client.post("/v1/completions", json={"prompt": "x", "top_k": top_k})).status_code == 200
    assert [c[2].top_k for c in engine.calls] == [0, 0]


async def test_omitted_max_tokens_defaults_and_is_capped_by_the_context(client, engine, tokenizer):
    engine.max_model_len = 1024
    assert (await client.post("/v1/completions", json={"prompt": "Hello"})).status_code == 200
    assert engine.calls[-1][2].max_tokens == DEFAULT_MAX_TOKENS == 256
    prompt = [5] * 900
    room = engine.max_model_len - len(prompt)
    assert 0 < room < DEFAULT_MAX_TOKENS
    assert (await client.post("/v1/completions", json={"prompt": prompt})).status_code == 200
    assert engine.calls[-1][2].max_tokens == room


async def test_chat_applies_the_template_and_answers_as_assistant(client, engine, tokenizer):
    engine.reply = ids(tokenizer, "Hi there!") + [min(tokenizer.eos_token_ids)]
    engine.finish_reason = "stop"
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Hello"}]}]
    response = await client.post("/v1/chat/completions", json={"model": "tiny-test", "messages": messages})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Hi there!"}
    assert body["choices"][0]["finish_reason"] == "stop"
    template = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    assert engine.calls[0][1] == tokenizer.encode(template, add_special_tokens=False)
    assert body["usage"]["completion_tokens"] == len(engine.reply)


async def test_max_completion_tokens_wins_over_max_tokens(client, engine):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 9, "max_completion_tokens": 4}
    assert (await client.post("/v1/chat/completions", json=body)).status_code == 200
    assert engine.calls[0][2].max_tokens == 4


async def test_stop_string_split_across_tokens_cuts_the_text_and_aborts_once(client, engine, tokenizer):
    engine.reply = ids(tokenizer, "Hello") + ids(tokenizer, " E") + ids(tokenizer, "ND") + ids(tokenizer, " more words")
    engine.endless = True  # the engine would go on: only the stop string ends it
    response = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 50, "stop": ["END", "zzz"]})
    body = response.json()
    assert body["choices"][0]["text"] == "Hello "
    assert body["choices"][0]["finish_reason"] == "stop"
    assert engine.aborts == [body["id"]]
    assert engine.closed == [body["id"]]


async def test_streamed_stop_string_is_never_sent(client, engine, tokenizer):
    engine.reply = [t for piece in ("The", " E", "N", "D", " is", " near") for t in ids(tokenizer, piece)]
    engine.endless = True
    response = await client.post("/v1/completions", json={"prompt": "x", "stop": "END", "stream": True})
    chunks = [json.loads(e) for e in sse_events(response.text)]
    texts = [c["choices"][0]["text"] for c in chunks]
    assert "".join(texts) == "The "
    assert not any("E" in t for t in texts)
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "stop"
    assert engine.aborts == [chunks[0]["id"]]


async def test_every_token_gets_its_chunk_even_when_its_text_is_held_back(client, engine, tokenizer):
    engine.reply = ids(tokenizer, "日本 😀 and E") + ids(tokenizer, "N") + ids(tokenizer, "D")
    engine.endless = True
    assert len(engine.reply) > len("日本 😀 and E")  # some tokens hold only part of a character
    response = await client.post("/v1/completions", json={"prompt": "x", "stop": "END", "stream": True})
    chunks = [json.loads(e) for e in sse_events(response.text)]
    texts = [c["choices"][0]["text"] for c in chunks]
    assert "".join(texts) == "日本 😀 and "
    # One chunk per token the engine made, up to the one completing the stop string; the held-back ones empty.
    assert len(chunks) == len(engine.reply) and "" in texts[:-1]


async def test_stop_token_text_is_not_in_the_answer(client, engine, tokenizer):
    bang = ids(tokenizer, "!")[0]
    engine.reply = ids(tokenizer, "Hello") + [bang]
    engine.finish_reason = "stop"
    body = (await client.post("/v1/completions", json={"prompt": "x", "stop_token_ids": [bang]})).json()
    assert body["choices"][0]["text"] == "Hello"


async def test_streamed_completion_parses_with_the_openai_client(oai, engine, tokenizer):
    engine.reply = ids(tokenizer, "Café and 日本語 😀 done")
    engine.num_cached_tokens = 32
    stream = await oai.completions.create(
        model="tiny-test", prompt="Say it", max_tokens=40, stream=True, stream_options={"include_usage": True}
    )
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "Café and 日本語 😀 done"
    assert len({c.id for c in chunks}) == 1
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == len(engine.reply)
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == 32


async def test_streamed_chat_parses_with_the_openai_client(oai, engine, tokenizer):
    engine.reply = ids(tokenizer, "Hi there, friend.")
    stream = await oai.chat.completions.create(
        model="tiny-test", messages=[{"role": "user", "content": "Hello"}], stream=True
    )
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Hi there, friend."
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.object == "chat.completion.chunk" and c.usage is None for c in chunks)


async def test_whole_chat_parses_with_the_openai_client(oai, engine, tokenizer):
    engine.reply = ids(tokenizer, "Rome.")
    engine.num_cached_tokens = 8
    completion = await oai.chat.completions.create(
        model="tiny-test", messages=[{"role": "user", "content": "Capital of Italy?"}], stop=["zz"]
    )
    assert completion.choices[0].message.content == "Rome."
    assert completion.usage.prompt_tokens_details.cached_tokens == 8


async def test_stream_framing_and_deltas(client, engine, tokenizer):
    engine.reply = ids(tokenizer, "ab END")
    engine.endless = True
    body = {"messages": [{"role": "user", "content": "x"}], "stream": True, "stop": "END"}
    response = await client.post("/v1/chat/completions", json=body)
    assert response.headers["content-type"].startswith("text/event-stream")
    chunks = [json.loads(e) for e in sse_events(response.text)]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "ab "
    # Nothing was left to send when the stop string matched: the last chunk is an empty delta and the reason.
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "stop", "logprobs": None}
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
