"""`splitserve serve` with no flags (1 prefill + 1 decode on the bundled SmolLM2) answers the official
OpenAI client, streaming: the capital of France is Paris."""

from __future__ import annotations

import openai
import pytest

from tests.runtime.deployment import Deployment


@pytest.fixture(scope="module")
def bundled():
    with Deployment(None, startup_timeout=300) as dep:
        yield dep


def test_openai_client_streams_paris(bundled):
    client = openai.OpenAI(base_url=bundled.url + "/v1", api_key="unused")
    (model,) = [m.id for m in client.models.list().data]
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=32,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, usage = "", None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
        usage = chunk.usage or usage
    assert "Paris" in text
    assert usage is not None and usage.prompt_tokens > 5 and 0 < usage.completion_tokens <= 32
    # A short chat prompt: the router's cost model decides where it is prefilled, and says why.
    (rec,) = bundled.requests()[-1:]
    assert rec["path"] in ("split", "local") and rec["route"], rec
    # Either way the record says where the TTFT went: the worker's queue, the prefill, and the rest (hand-off).
    assert rec["queue_s"] is not None and rec["prefill_s"] is not None, rec
    assert 0 < rec["queue_s"] + rec["prefill_s"] <= rec["ttft_s"], rec
    assert {w["role"] for w in bundled.workers()} == {"prefill", "decode"}
    assert all(free == total for free, total in bundled.wait_all_free().values())


def test_bad_requests_get_400_naming_the_field(bundled):
    client = openai.OpenAI(base_url=bundled.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="SmolLM2-135M-Instruct", prompt="hi", max_tokens=-3)
    with pytest.raises(openai.BadRequestError, match="model"):
        client.completions.create(model="no-such-model", prompt="hi", max_tokens=3)
