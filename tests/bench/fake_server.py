"""A small OpenAI-compatible SSE server for client-behaviour tests: fixed per-token pacing, an emulated
prefix cache (reports cached_tokens), and injectable failures that a real server cannot easily produce."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from dataclasses import dataclass, field

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

BLOCK = 16


@dataclass
class Behaviour:
    model: str = "fake-model"
    vocab_size: int = 1000
    first_token_delay_s: float = 0.01
    token_delay_s: float = 0.002
    # Extra delay per token for each other request in flight: a server that slows as it fills, so a sweep's
    # low rates pass and its high rates fail.
    token_delay_per_in_flight_s: float = 0.0
    # The n-th request received (0-based) is answered with this HTTP status instead of a stream.
    fail_status: dict[int, int] = field(default_factory=dict)
    retry_after: str | None = None  # the Retry-After header of those answers
    # The n-th request's stream breaks off after its first token.
    break_stream: set[int] = field(default_factory=set)
    report_usage: bool = True
    max_output: int | None = None  # stop early, as a server that ignores ignore_eos would
    text: str = " t"  # each token's text, sent raw (not ASCII-escaped) in the JSON, as servers may
    received: list[dict] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    cached_blocks: set[tuple[int, ...]] = field(default_factory=set)
    # Serve /metrics with splitserve's in-flight gauges, and count a stream its client hung up on as running
    # for `linger_s` more: a server finishing the step that request was in.
    metrics: bool = False
    linger_s: float = 0.0
    lingering: int = 0
    lingering_at_receipt: list[int] = field(default_factory=list)  # `lingering` as each request came in
    received_unix: list[float] = field(default_factory=list)  # when each request came in (Unix time)


def _cached_tokens(b: Behaviour, prompt: list[int]) -> int:
    """Full blocks of this prompt's prefix already seen, as a paged prefix cache would count them."""
    hit = 0
    for end in range(BLOCK, len(prompt) + 1, BLOCK):
        key = tuple(prompt[:end])
        if key not in b.cached_blocks:
            break
        hit = end
    for end in range(BLOCK, len(prompt) + 1, BLOCK):
        b.cached_blocks.add(tuple(prompt[:end]))
    return hit


def make_app(b: Behaviour) -> FastAPI:
    app = FastAPI()

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        if not b.metrics:
            return JSONResponse({"detail": "Not Found"}, status_code=404)
        text = (f"# TYPE splitserve_num_requests_running gauge\nsplitserve_num_requests_running {b.in_flight + b.lingering}\n"
                "# TYPE splitserve_num_requests_waiting gauge\nsplitserve_num_requests_waiting 0\n")
        return Response(text, media_type="text/plain")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": b.model, "object": "model"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        n = len(b.received)
        b.received.append(body)
        b.lingering_at_receipt.append(b.lingering)
        b.received_unix.append(time.time())
        if n in b.fail_status:
            headers = {"Retry-After": b.retry_after} if b.retry_after is not None else None
            return JSONResponse({"error": {"message": "injected"}}, status_code=b.fail_status[n], headers=headers)
        if body.get("model") != b.model:
            return JSONResponse({"error": {"message": "no such model"}}, status_code=404)
        prompt = body["prompt"]
        if any(not 0 <= t < b.vocab_size for t in prompt):
            return JSONResponse({"error": {"message": "token id out of range"}}, status_code=400)
        cached = _cached_tokens(b, prompt)
        max_tokens = min(body["max_tokens"], b.max_output or body["max_tokens"])

        async def stream():
            b.in_flight += 1
            b.max_in_flight = max(b.max_in_flight, b.in_flight)
            finished = False
            try:
                async for event in events():
                    yield event
                finished = True
            finally:
                b.in_flight -= 1
                if not finished and b.linger_s > 0:
                    b.lingering += 1
                    asyncio.get_running_loop().call_later(b.linger_s, _unlinger)

        def _unlinger():
            b.lingering -= 1

        async def events():
            await asyncio.sleep(b.first_token_delay_s)
            for i in range(max_tokens):
                if i:
                    await asyncio.sleep(b.token_delay_s + b.token_delay_per_in_flight_s * (b.in_flight - 1))
                finish = "length" if i == max_tokens - 1 else None
                chunk = {"object": "text_completion", "choices": [{"index": 0, "text": f"{b.text}{i}", "finish_reason": finish}]}
                yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
                if n in b.break_stream:
                    raise RuntimeError("injected stream break")
            if b.report_usage:
                usage = {
                    "prompt_tokens": len(prompt),
                    "completion_tokens": max_tokens,
                    "prompt_tokens_details": {"cached_tokens": cached},
                }
                yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    return app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeServer:
    """Runs the app with uvicorn in a background thread; `url` is its base URL."""

    def __init__(self, behaviour: Behaviour) -> None:
        self.behaviour = behaviour
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(make_app(behaviour), host="127.0.0.1", port=self.port, log_level="error")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def __enter__(self) -> FakeServer:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("fake server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
