"""Structured output, logprobs, n > 1, best_of and lists of prompts over the real engine (tiny random model),
through the official client where it has the field."""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pytest
import torch

from splitserve.model.loader import load_model
from splitserve.runtime.frontend.app import create_app
from splitserve.runtime.worker.async_engine import AsyncEngine
from splitserve.runtime.worker.engine import Engine, EngineConfig
from tests.frontend.test_real_engine import wait_until_idle

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]

BLOCK = 16
# A schema whose every valid answer is short: a random model must still finish it within max_tokens.
SCHEMA = {
    "type": "object",
    "properties": {"color": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"}},
    "required": ["color", "ok"],
    "additionalProperties": False,
}


@pytest.fixture
def real_engine(checkpoint):
    engine = AsyncEngine(Engine(load_model(checkpoint), EngineConfig(num_blocks=64, block_size=BLOCK, max_model_len=256))).start()
    yield engine
    engine.shutdown()


@pytest.fixture
async def oai(real_engine):
    http = httpx.AsyncClient(transport=httpx.ASGITransport(create_app(real_engine, served_model_name="tiny")), base_url="http://t/v1")
    async with openai.AsyncOpenAI(api_key="x", base_url="http://t/v1", http_client=http, max_retries=0) as client:
        yield client


async def test_json_schema_output_validates_and_each_kind_constrains(oai, real_engine):
    fmt = {"type": "json_schema", "json_schema": {"name": "c", "schema": SCHEMA}}
    for prompt in ("The quick brown fox", "Paris is", "def f(x):", "1969"):
        for temperature in (0, 1.0):
            r = await oai.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": prompt}], max_tokens=64, temperature=temperature,
                response_format=fmt, seed=3,
            )
            assert r.choices[0].finish_reason == "stop", r
            jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
    r = await oai.completions.create(model="tiny", prompt="Hello", max_tokens=40, temperature=1.0, seed=1,
                                     extra_body={"guided_regex": "[0-9]{3}-[a-z]{2,4}"})
    assert re.fullmatch("[0-9]{3}-[a-z]{2,4}", r.choices[0].text), r.choices[0].text
    r = await oai.completions.create(model="tiny", prompt="Hello", max_tokens=40, temperature=1.0, seed=1,
                                     extra_body={"structured_outputs": {"choice": ["yes", "no", "maybe so"]}})
    assert r.choices[0].text in ("yes", "no", "maybe so")
    r = await oai.completions.create(model="tiny", prompt="Hello", max_tokens=60, temperature=0,
                                     extra_body={"response_format": {"type": "json_object"}})
    # Any object: a random model may still be inside one of its strings when max_tokens ends it.
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].text), dict)
    else:
        assert r.choices[0].text.startswith("{")
    wait_until_idle(real_engine)


async def test_logprobs_match_transformers_log_softmax(oai, real_engine, checkpoint, tokenizer):
    from transformers import AutoModelForCausalLM

    prompt = tokenizer.encode("The quick brown fox")
    r = await oai.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0, logprobs=3,
                                     extra_body={"ignore_eos": True, "return_token_ids": True})
    choice = r.choices[0]
    out = choice.model_extra["token_ids"]
    hf = AutoModelForCausalLM.from_pretrained(checkpoint, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([prompt + out])).logits[0, len(prompt) - 1 : -1].float(), -1)
    got = choice.logprobs.token_logprobs
    want = [float(ref[i, t]) for i, t in enumerate(out)]
    assert max(abs(a - b) for a, b in zip(got, want)) <= 1e-4, (got, want)
    for i, top in enumerate(choice.logprobs.top_logprobs):
        best = ref[i].topk(3)
        assert len(top) == 3
        assert sorted(top.values(), reverse=True) == pytest.approx(best.values.tolist(), abs=1e-4)

    chat = await oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                             temperature=0, logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(len(c.top_logprobs) == 2 and c.logprob <= 0 for c in content)
    # The greedy token is the most likely one: its logprob is the top alternative's.
    assert all(c.logprob == pytest.approx(c.top_logprobs[0].logprob) for c in content)
    stream = await oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                               temperature=0, logprobs=True, top_logprobs=2, stream=True,
                                               extra_body={"ignore_eos": True})
    streamed = [c for chunk in [ch async for ch in stream] for choice in chunk.choices if choice.logprobs
                for c in choice.logprobs.content]
    assert [c.token for c in streamed] == [c.token for c in content]
    assert [c.logprob for c in streamed] == pytest.approx([c.logprob for c in content], abs=1e-4)
    wait_until_idle(real_engine)


async def test_n_choices_share_the_prompts_kv_blocks(oai, real_engine, tokenizer):
    engine = real_engine.engine
    used: list[int] = []
    engine.step_observers.append(lambda out, s: used.append(engine.load().total_blocks - engine.load().free_blocks))
    prompt = list(range(3, 3 + 4 * BLOCK + 5))  # four full blocks and a partial one
    r = await oai.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=1.0, n=4, seed=11,
                                     extra_body={"ignore_eos": True})
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    assert len({c.text for c in r.choices}) > 1  # distinct seeds per choice: not four copies
    assert r.usage.prompt_tokens == len(prompt) and r.usage.completion_tokens == 32
    # Alone, four copies would hold 4 x 5 blocks. Shared, the four full prompt blocks are held once; each
    # choice holds its own partial block (its tokens diverge there).
    assert max(used) <= 4 + 4, used
    assert engine.stats().prefix_cache_hits >= 3 * 4 * BLOCK
    wait_until_idle(real_engine)

    again = await oai.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=1.0, n=4, seed=11,
                                         extra_body={"ignore_eos": True})
    assert [c.text for c in again.choices] == [c.text for c in r.choices]  # seeded: the same four answers
    wait_until_idle(real_engine)


async def test_best_of_returns_the_most_likely_and_prompt_lists_get_choices_each(oai, real_engine):
    r = await oai.completions.create(model="tiny", prompt="Hello", max_tokens=5, temperature=1.0, n=2, best_of=4,
                                     logprobs=0, seed=5, extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1]
    totals = [sum(c.logprobs.token_logprobs) for c in r.choices]
    assert totals == sorted(totals, reverse=True)
    assert r.usage.completion_tokens == 4 * 5  # every candidate's tokens count

    r = await oai.completions.create(model="tiny", prompt=["Hello", "The quick brown fox", "1969"], max_tokens=3,
                                     temperature=0, n=2, extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == list(range(6))
    by_prompt = [[c.text for c in r.choices[i : i + 2]] for i in range(0, 6, 2)]
    assert all(a == b for a, b in by_prompt)  # greedy: a prompt's two choices agree
    for i, p in enumerate(["Hello", "The quick brown fox", "1969"]):
        alone = await oai.completions.create(model="tiny", prompt=p, max_tokens=3, temperature=0, extra_body={"ignore_eos": True})
        assert alone.choices[0].text == by_prompt[i][0]

    ids = await oai.completions.create(model="tiny", prompt=[[5, 6, 7], [8, 9]], max_tokens=2, temperature=0)
    assert [c.index for c in ids.choices] == [0, 1] and ids.usage.prompt_tokens == 5

    stream = await oai.completions.create(model="tiny", prompt=["Hello", "Paris"], max_tokens=4, temperature=0, n=2,
                                          stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    texts: dict[int, str] = {}
    usage = None
    async for chunk in stream:
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
        usage = chunk.usage or usage
    assert sorted(texts) == [0, 1, 2, 3] and texts[0] == texts[1] and texts[2] == texts[3]
    assert usage.completion_tokens == 16
    wait_until_idle(real_engine)
