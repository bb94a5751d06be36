"""Every bad request is a 400 in OpenAI's error shape, naming the field, and never reaches the engine."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.anyio

GOOD_COMPLETION = {"model": "tiny-test", "prompt": "Hello", "max_tokens": 4}
GOOD_CHAT = {"model": "tiny-test", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
LONG_TEXT = "The quick brown fox jumps over the lazy dog. " * 40  # far over the fake's 256-token context

COMPLETION_CASES = [
    # (changes to a good request, field the error must name, code when it matters)
    ({"prompt": None}, "prompt", None),
    ({"prompt": 123}, "prompt", None),
    ({"prompt": ""}, "prompt", None),
    ({"prompt": []}, "prompt", None),
    ({"prompt": ["one", ""]}, "prompt", None),
    ({"prompt": [[1, 2], []]}, "prompt", None),
    ({"prompt": [[1, 2], [1, 100_000]]}, "prompt", None),
    ({"prompt": ["a"] * 5, "n": 4}, "prompt", None),
    ({"prompt": [1, "2"]}, "prompt", None),
    ({"prompt": [1, 100_000]}, "prompt", None),
    ({"prompt": LONG_TEXT}, "prompt", "context_length_exceeded"),
    ({"max_tokens": 0}, "max_tokens", None),
    ({"max_tokens": -5}, "max_tokens", None),
    ({"max_tokens": "10"}, "max_tokens", None),
    ({"max_tokens": 1.5}, "max_tokens", None),
    ({"max_tokens": 10**12}, "max_tokens", "context_length_exceeded"),
    ({"max_tokens": 254}, "max_tokens", "context_length_exceeded"),
    ({"temperature": -0.1}, "temperature", None),
    ({"temperature": "hot"}, "temperature", None),
    ({"top_p": 0}, "top_p", None),
    ({"top_p": 1.5}, "top_p", None),
    ({"top_k": -2}, "top_k", None),
    ({"seed": 2**70}, "seed", None),
    ({"n": 0}, "n", None),
    ({"n": 17}, "n", None),
    ({"best_of": 1, "n": 2}, "best_of", None),
    ({"best_of": 3, "stream": True}, "best_of", None),
    ({"logprobs": 21}, "logprobs", None),
    ({"logprobs": True}, "logprobs", None),
    ({"echo": True}, "echo", None),
    ({"response_format": {"type": "json_schema"}}, "response_format", None),
    ({"response_format": {"type": "yaml"}}, "response_format", None),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}}, "response_format", None),
    ({"guided_regex": "(unclosed"}, "guided_regex", None),
    ({"guided_grammar": "root ::= "}, "guided_grammar", None),
    ({"guided_regex": "a+", "guided_choice": ["a"]}, "guided_choice", None),
    ({"structured_outputs": {"regex": "a+", "choice": ["a"]}}, "structured_outputs", None),
    ({"response_format": {"type": "json_object"}, "ignore_eos": True}, "ignore_eos", None),
    ({"user": 7}, "user", None),
    ({"stop": ""}, "stop", None),
    ({"stop": ["ok", ""]}, "stop", None),
    ({"stop": 7}, "stop", None),
    ({"stop_token_ids": [-1]}, "stop_token_ids", None),
    ({"stop_token_ids": [10**6]}, "stop_token_ids", None),
    ({"ignore_eos": "yes"}, "ignore_eos", None),
    ({"stream": "true"}, "stream", None),
    ({"stream": True, "stream_options": {"include_usage": 1}}, "stream_options", None),
    ({"model": "gpt-4"}, "model", "model_not_found"),
]

CHAT_CASES = [
    ({"messages": []}, "messages", None),
    ({"messages": None}, "messages", None),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages", None),
    ({"messages": [{"role": "user", "content": 5}]}, "messages", None),
    ({"messages": [{"role": "user"}]}, "messages", None),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages", None),
    ({"messages": [{"role": "user", "content": LONG_TEXT}]}, "messages", "context_length_exceeded"),
    ({"max_completion_tokens": 0}, "max_completion_tokens", None),
    ({"max_completion_tokens": 10_000}, "max_completion_tokens", "context_length_exceeded"),
    ({"logprobs": 1}, "logprobs", None),
    ({"top_logprobs": 2}, "top_logprobs", None),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", None),
    ({"n": 0}, "n", None),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]}, "tools", None),
    ({"tools": [{"type": "function"}]}, "tools", None),
    ({"tool_choice": "required"}, "tool_choice", None),
    ({"temperature": -1}, "temperature", None),
]


def assert_invalid(response, param: str | None, code: str | None = None) -> dict:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    if param is not None:
        assert param in error["message"]
    if code is not None:
        assert error["code"] == code
    return error


@pytest.mark.parametrize("change,param,code", COMPLETION_CASES)
async def test_bad_completion_request_is_400_naming_the_field(client, engine, change, param, code):
    body = {k: v for k, v in {**GOOD_COMPLETION, **change}.items() if v is not None}
    assert_invalid(await client.post("/v1/completions", json=body), param, code)
    assert engine.calls == []


@pytest.mark.parametrize("change,param,code", CHAT_CASES)
async def test_bad_chat_request_is_400_naming_the_field(client, engine, change, param, code):
    body = {k: v for k, v in {**GOOD_CHAT, **change}.items() if v is not None}
    assert_invalid(await client.post("/v1/chat/completions", json=body), param, code)
    assert engine.calls == []


async def test_good_requests_pass(client):
    # The baseline the cases above change one field of.
    assert (await client.post("/v1/completions", json=GOOD_COMPLETION)).status_code == 200
    assert (await client.post("/v1/chat/completions", json=GOOD_CHAT)).status_code == 200


async def test_too_long_prompt_says_how_long_it_is_and_what_fits(client, tokenizer):
    error = assert_invalid(await client.post("/v1/completions", json={**GOOD_COMPLETION, "prompt": LONG_TEXT}), "prompt")
    assert f"{len(tokenizer.encode(LONG_TEXT))} tokens" in error["message"]
    assert "256" in error["message"]


async def test_max_tokens_over_the_context_says_what_fits(client, tokenizer):
    room = 256 - len(tokenizer.encode("Hello"))
    error = assert_invalid(await client.post("/v1/completions", json={**GOOD_COMPLETION, "max_tokens": room + 1}), "max_tokens")
    assert f"at most {room}" in error["message"]
    assert (await client.post("/v1/completions", json={**GOOD_COMPLETION, "max_tokens": room})).status_code == 200


@pytest.mark.parametrize("raw", [b"{not json", b'{"prompt": "x",}', b"", b"\xff\xfe"])
async def test_invalid_json_is_400(client, engine, raw):
    response = await client.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert_invalid(response, None)
    assert engine.calls == []


@pytest.mark.parametrize("raw", [b"[]", b'"prompt"', b"null", b"42"])
async def test_body_that_is_not_an_object_is_400(client, raw):
    response = await client.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


async def test_unknown_route_is_an_openai_style_404(client):
    response = await client.post("/v1/embeddings", json={})
    assert response.status_code == 404
    assert response.json()["error"]["message"] == "Not Found"


async def test_nested_field_path_is_named(client):
    body = {**GOOD_CHAT, "messages": [{"role": "user", "content": "a"}, {"role": "wizard", "content": "b"}]}
    error = assert_invalid(await client.post("/v1/chat/completions", json=body), "messages")
    assert error["message"].startswith("messages.1.role:")
