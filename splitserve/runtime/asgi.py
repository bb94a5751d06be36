"""Two ASGI helpers the middlewares of both processes share: read a request body under a cap and hand the
app a `receive` that replays it, and answer with an OpenAI-style error before any route runs."""

from __future__ import annotations

import json

from starlette.types import Message, Receive, Send


async def read_body(receive: Receive, max_bytes: int) -> tuple[bytes | None, int, Receive]:
    """(the whole body, or None once it passes `max_bytes`; bytes read; a receive replaying the body)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break  # the client left; the app will see the disconnect
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > max_bytes:
            return None, size, receive
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    body = b"".join(chunks)
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return body, size, replay


async def send_error(
    send: Send, status: int, message: str, kind: str, code: str | None = None, headers: list[tuple[bytes, bytes]] = ()
) -> None:
    payload = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()
    start = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()), *headers]
    await send({"type": "http.response.start", "status": status, "headers": start})
    await send({"type": "http.response.body", "body": payload})
