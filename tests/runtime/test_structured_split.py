"""Structured output and logprobs on the split path: the prefill worker samples the first token under the
request's grammar, the decode worker resumes the grammar after it; the answers (greedy) and the logprobs
are the colocated deployment's. Every block comes back on every worker."""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import jsonschema
import pytest

from tests.runtime.deployment import Deployment
from tests.tiny_models import make_tiny_checkpoint

SCHEMA = {
    "type": "object",
    "properties": {"color": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"}, "n": {"enum": [1, 22, 333]}},
    "required": ["color", "ok", "n"],
    "additionalProperties": False,
}
REGEX = "[a-z]{2,6}( [a-z]{2,6}){1,3}\\."
PROMPTS = [f"Prompt {i}: " + " ".join(["the quick brown fox"] * (i % 4)) for i in range(20)]
COMMON = ["--block-size", "16", "--num-blocks", "256"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("structured"), layers=3, seed=9)


async def _ask(url: str) -> list[dict]:
    async with httpx.AsyncClient(timeout=120) as client:
        async def one(i: int, prompt: str) -> dict:
            body = {"prompt": prompt, "max_tokens": 48, "temperature": 0, "logprobs": 2, "return_token_ids": True}
            body |= {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}} if i % 2 == 0 else {"guided_regex": REGEX}
            r = await client.post(url + "/v1/completions", json=body)
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]

        return await asyncio.gather(*(one(i, p) for i, p in enumerate(PROMPTS)))


def _answers(checkpoint, *args: str) -> tuple[list[dict], list[dict]]:
    with Deployment(checkpoint, *args, *COMMON) as dep:
        before = dep.free_blocks()
        answers = asyncio.run(_ask(dep.url))
        records = dep.requests()
        after = dep.wait_all_free()
        assert {u: f for u, (f, _) in after.items()} == {u: f for u, (f, _) in before.items()}
    return answers, records


def test_grammar_and_logprobs_survive_the_split(checkpoint):
    colocated, _ = _answers(checkpoint, "--colocated", "1")
    split, records = _answers(checkpoint, "--prefill", "1", "--decode", "1", "--no-conditional")
    assert {r["path"] for r in records} == {"split"}, [r["events"] for r in records]
    for i, (c, s) in enumerate(zip(colocated, split)):
        assert s["finish_reason"] == "stop", s
        if i % 2 == 0:
            jsonschema.validate(json.loads(s["text"]), SCHEMA)
        else:
            assert re.fullmatch(REGEX, s["text"]), s["text"]
        assert s["token_ids"] == c["token_ids"] and s["text"] == c["text"]
        got, want = s["logprobs"]["token_logprobs"], c["logprobs"]["token_logprobs"]
        assert len(got) == len(s["token_ids"]) and max(abs(a - b) for a, b in zip(got, want)) <= 1e-4
        assert s["logprobs"]["tokens"] == c["logprobs"]["tokens"]
