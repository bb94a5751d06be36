"""The served /openapi.json says what the server accepts: every request field it advertises has an example
here that validates against the advertised schema and that the server serves (200), and every example is
advertised. A field added without being served, or served without being advertised, fails this test."""

from __future__ import annotations

import httpx
import jsonschema
import pytest

from splitserve.model.tokenizer import Tokenizer
from splitserve.runtime.frontend.app import create_app
from tests.frontend.fake_engine import FakeEngine

pytestmark = pytest.mark.anyio

# A template that renders tools (as templates that take them do): the tiny model's own has no place for them.
TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools: {% for t in tools %}{{ t.function.name }} {% endfor %}<|im_end|>\n{% endif %}"
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "d", "parameters": {"type": "object"}}}

SHARED = {
    "model": "tiny-test",
    "max_tokens": 3,
    "temperature": 0.5,
    "top_p": 0.9,
    "top_k": 5,
    "seed": 1,
    "stop": ["zz"],
    "stop_token_ids": [7],
    "ignore_eos": True,
    "stream": True,
    "stream_options": {"include_usage": True},
    "n": 2,
    "user": "someone",
    "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}, "strict": True}},
    "structured_outputs": {"regex": "[a-z]+"},
    "guided_json": {"type": "object"},
    "guided_regex": "[a-z]+",
    "guided_grammar": 'root ::= "a" | "b"',
    "guided_choice": ["yes", "no"],
}
EXAMPLES = {
    "/v1/completions": {
        **SHARED,
        "prompt": ["Hello", "Paris"],
        "best_of": 3,
        "logprobs": 2,
        "echo": False,
        "return_token_ids": True,
    },
    "/v1/chat/completions": {
        **SHARED,
        "messages": [{"role": "user", "content": "Hi"}],
        "max_completion_tokens": 3,
        "logprobs": True,
        "top_logprobs": 2,
        "tools": [TOOL],
        "tool_choice": "auto",
    },
}
REQUIRED = {"/v1/completions": {"prompt": "Hi"}, "/v1/chat/completions": {"messages": [{"role": "user", "content": "Hi"}]}}
# Fields that cannot be combined with the rest of a request on their own terms.
NEEDS = {"top_logprobs": {"logprobs": True}}  # top_logprobs alone: 400, as OpenAI answers
ALONE = {"ignore_eos"}  # with a grammar: 400 (the grammar ends the output with EOS)
EXCLUSIVE = {"response_format", "structured_outputs", "guided_json", "guided_regex", "guided_grammar", "guided_choice"}


@pytest.fixture
def tools_engine(tokenizer: Tokenizer) -> FakeEngine:
    tok = Tokenizer(tokenizer.backend, bos_token_id=tokenizer.bos_token_id, eos_token_ids=tokenizer.eos_token_ids,
                    add_bos_token=tokenizer.add_bos_token, chat_template=TOOLS_TEMPLATE)
    return FakeEngine(tok)


@pytest.fixture
async def served(tools_engine):
    app = create_app(tools_engine)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as client:
        yield client, (await client.get("/openapi.json")).json()


def request_ref(doc: dict, path: str) -> str:
    return doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]


def request_schema(doc: dict, path: str) -> dict:
    return doc["components"]["schemas"][request_ref(doc, path).rsplit("/", 1)[1]]


@pytest.mark.parametrize("path", list(EXAMPLES))
async def test_every_advertised_field_is_served_and_every_served_field_advertised(served, path):
    client, doc = served
    assert set(request_schema(doc, path)["properties"]) == set(EXAMPLES[path])
    validator = jsonschema.Draft202012Validator({**doc, "$ref": request_ref(doc, path)})
    for field, value in EXAMPLES[path].items():
        body = {**REQUIRED[path], **NEEDS.get(field, {}), field: value}
        validator.validate(body)
        r = await client.post(path, json=body)
        assert r.status_code == 200, (field, r.text)
    # All together, minus the one-of-a-kind constraints but one.
    body = {k: v for k, v in EXAMPLES[path].items() if k not in ALONE | EXCLUSIVE} | {"guided_regex": "[a-z]+"}
    if path == "/v1/completions":
        body["best_of"] = body["n"]  # best_of > n cannot stream
    validator.validate(body)
    r = await client.post(path, json=body)
    assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]"), r.text


async def test_tools_reach_a_template_that_takes_them(served, tools_engine):
    client, _ = served
    r = await client.post("/v1/chat/completions", json={**REQUIRED["/v1/chat/completions"], "tools": [TOOL]})
    assert r.status_code == 200, r.text
    (_, prompt, _), = tools_engine.calls
    assert "Tools: get_weather" in tools_engine.tokenizer.decode(prompt)
