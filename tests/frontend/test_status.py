"""Overload, unavailability and engine failures become the right HTTP status; the server keeps serving."""

from __future__ import annotations

import httpx
import openai
import pytest

from splitserve.runtime.frontend.app import UNAVAILABLE_RETRY_AFTER_S, create_app

pytestmark = pytest.mark.anyio

COMPLETION = {"prompt": "Hello", "max_tokens": 4}


@pytest.mark.parametrize("retry_after,header", [(2.5, "3"), (0.2, "1"), (0, "1")])
@pytest.mark.parametrize("stream", [False, True])
async def test_overloaded_is_429_with_retry_after(client, engine, retry_after, header, stream):
    engine.overloaded_retry_after = retry_after
    response = await client.post("/v1/completions", json={**COMPLETION, "stream": stream})
    assert response.status_code == 429
    assert response.headers["retry-after"] == header
    assert response.json()["error"]["code"] == "server_overloaded"
    # Refused before it was queued: there is nothing to abort.
    assert engine.aborts == []


async def test_openai_client_sees_a_rate_limit_error(app, engine):
    engine.overloaded_retry_after = 1
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app))
    async with openai.AsyncOpenAI(api_key="x", base_url="http://test/v1", http_client=http, max_retries=0) as oai:
        with pytest.raises(openai.RateLimitError):
            await oai.completions.create(model="tiny-test", prompt="hi")


async def test_unavailable_engine_is_503_with_retry_after(client, engine):
    engine.unavailable = True
    response = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 503
    assert response.headers["retry-after"] == str(UNAVAILABLE_RETRY_AFTER_S)
    assert "draining" in response.json()["error"]["message"]


async def test_health_follows_the_engine(client, engine):
    response = await client.get("/health")
    assert (response.status_code, response.json()["status"]) == (200, "ok")
    engine.is_healthy = False
    response = await client.get("/health")
    assert (response.status_code, response.json()["status"]) == (503, "unavailable")


async def test_health_answers_503_when_the_engine_check_itself_fails(client, engine):
    def broken() -> bool:
        raise RuntimeError("engine process gone")

    engine.healthy = broken
    assert (await client.get("/health")).status_code == 503


async def test_engine_exception_is_500_and_the_server_keeps_serving(client, engine):
    engine.raise_after = 2
    response = await client.post("/v1/completions", json=COMPLETION)
    assert response.status_code == 500
    assert "GPU fell off the bus" in response.json()["error"]["message"]
    engine.raise_after = None
    assert (await client.post("/v1/completions", json=COMPLETION)).status_code == 200


async def test_engine_error_output_is_500_with_its_message(client, engine):
    engine.error_output = "prompt rejected by worker"
    response = await client.post("/v1/completions", json=COMPLETION)
    assert response.status_code == 500
    assert response.json()["error"]["message"] == "prompt rejected by worker"


async def test_engine_failure_mid_stream_is_an_error_event_the_openai_client_raises(app, engine):
    engine.raise_after = 2
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app))
    async with openai.AsyncOpenAI(api_key="x", base_url="http://test/v1", http_client=http, max_retries=0) as oai:
        stream = await oai.completions.create(model="tiny-test", prompt="hi", stream=True)
        with pytest.raises(openai.APIError, match="GPU fell off the bus"):
            async for _ in stream:
                pass


async def test_unexpected_error_is_an_openai_style_500(engine):
    def broken(*args):
        raise KeyError("no such worker")

    engine.generate = broken
    transport = httpx.ASGITransport(create_app(engine), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.post("/v1/completions", json=COMPLETION)
    assert response.status_code == 500
    assert "no such worker" in response.json()["error"]["message"]


async def test_models_lists_the_served_name(engine):
    app = create_app(engine, served_model_name="my-model")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test") as client:
        body = (await client.get("/v1/models")).json()
        assert [m["id"] for m in body["data"]] == ["my-model"]
        assert body["data"][0]["max_model_len"] == engine.max_model_len
        assert (await client.post("/v1/completions", json={**COMPLETION, "model": "my-model"})).status_code == 200
        assert (await client.post("/v1/completions", json={**COMPLETION, "model": "tiny-test"})).status_code == 400


async def test_openapi_schema_documents_the_endpoints(client):
    schema = (await client.get("/openapi.json")).json()
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics"} <= set(schema["paths"])
    assert "CompletionRequest" in schema["components"]["schemas"]
    assert (await client.get("/docs")).status_code == 200
