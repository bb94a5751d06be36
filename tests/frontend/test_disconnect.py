"""A client that goes away must not leave its request running: the engine request is aborted exactly once."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator

import anyio
import httpx
import pytest
import uvicorn

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]


async def call_then_disconnect(app, path: str, body: dict, *, after_body_chunks: int) -> list[dict]:
    """Drive the ASGI app as a server would, disconnecting once `after_body_chunks` body chunks have arrived
    (0: right after sending the request). Returns what the app sent."""
    sent: list[dict] = []
    gone = anyio.Event()
    request = [{"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}]

    async def receive() -> dict:
        if request:
            return request.pop()
        if after_body_chunks == 0:
            gone.set()
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)
        chunks = [m for m in sent if m["type"] == "http.response.body" and m.get("body")]
        if len(chunks) >= after_body_chunks > 0:
            gone.set()

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"host", b"test")],
        "client": ("127.0.0.1", 50000), "server": ("test", 80),
    }
    with anyio.fail_after(5):  # the app must notice the disconnect, not wait for a reply that never ends
        await app(scope, receive, send)
    return sent


async def test_disconnect_mid_stream_aborts_once(app, engine):
    engine.endless = True
    engine.token_delay = 0.01
    sent = await call_then_disconnect(app, "/v1/completions", {"prompt": "hi", "max_tokens": 200, "stream": True}, after_body_chunks=3)
    assert sent[0]["status"] == 200
    (request_id, _, _), = engine.calls
    assert engine.aborts == [request_id]
    assert engine.closed == [request_id]


async def test_disconnect_while_queued_aborts_once(app, engine):
    engine.first_token_delay = 60  # the request waits in the queue: no output, so no send to fail
    for stream in (True, False):
        await call_then_disconnect(app, "/v1/completions", {"prompt": "hi", "stream": stream}, after_body_chunks=0)
    assert engine.aborts == [call[0] for call in engine.calls]
    assert len(engine.aborts) == 2 and engine.closed == engine.aborts


async def test_disconnect_during_a_whole_chat_aborts_once(app, engine):
    engine.endless = True
    engine.token_delay = 0.01
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 200}
    sent = await call_then_disconnect(app, "/v1/chat/completions", body, after_body_chunks=0)
    assert engine.aborts == [engine.calls[0][0]]
    assert not any(m.get("status") == 200 for m in sent)


async def test_finished_stream_does_not_abort(app, engine):
    sent = await call_then_disconnect(app, "/v1/completions", {"prompt": "hi", "stream": True}, after_body_chunks=10_000)
    assert sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}
    assert engine.aborts == [] and engine.closed == [engine.calls[0][0]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def uvicorn_serving(app, **config) -> Iterator[uvicorn.Server]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", **config))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started)
        yield server
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    assert not thread.is_alive()


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def stream_from(server: uvicorn.Server):
    port = server.servers[0].sockets[0].getsockname()[1]
    body = {"prompt": "hi", "max_tokens": 200, "stream": True}
    return httpx.Client(base_url=f"http://127.0.0.1:{port}").stream("POST", "/v1/completions", json=body)


def test_closing_the_connection_to_uvicorn_aborts_once(app, engine):
    """The same through a real server and socket, as deployed."""
    engine.endless = True
    engine.token_delay = 0.01
    with uvicorn_serving(app) as server:
        with stream_from(server) as response:
            assert next(response.iter_lines()).startswith("data: ")
        wait_for(lambda: engine.aborts)
        time.sleep(0.1)  # a second abort, if any, would come now
        assert engine.aborts == [engine.calls[0][0]]


def test_server_shutdown_aborts_requests_still_streaming(app, engine):
    engine.endless = True
    engine.token_delay = 0.01
    with uvicorn_serving(app, timeout_graceful_shutdown=0.5) as server:
        with stream_from(server) as response:
            assert next(response.iter_lines()).startswith("data: ")
            server.should_exit = True
            # The client is still reading: only the shutdown can have ended the request.
            wait_for(lambda: engine.aborts, timeout=5)
    assert engine.aborts == [engine.calls[0][0]]
