"""A cap on request body size, enforced before the app parses anything: a client cannot make the frontend
hold or decode more than `max_bytes` per request (a 10 MB prompt used to take 30 s and gigabytes to refuse).

Plain ASGI middleware: a declared Content-Length over the cap is refused at once; a body without one
(chunked) is read up to the cap and refused as soon as it passes it. Either way the answer is an
OpenAI-style 413 naming the limit, before the first byte of any response.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from splitserve.runtime.asgi import read_body, send_error

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send, int(declared))
            return
        # Read the whole (capped) body first, then replay it: the app never sees a body over the cap.
        body, size, replay = await read_body(receive, self.max_bytes)
        if body is None:
            await self._refuse(send, size)
            return
        await self.app(scope, replay, send)

    async def _refuse(self, send: Send, size: int) -> None:
        message = f"request body: {size:,} bytes or more, over this server's limit of {self.max_bytes:,} bytes"
        await send_error(send, 413, message, "invalid_request_error", "request_too_large")
