"""The frontend's handle on one worker process: its internal HTTP API, as typed calls."""

from __future__ import annotations

from typing import AsyncIterator

import httpx
import msgspec

from splitserve.runtime.protocol import PrefillResult, StreamEvent, WorkerInfo, encoder


class WorkerError(Exception):
    """The worker could not be reached, or answered with an error."""


class WorkerClient:
    def __init__(self, url: str, http: httpx.AsyncClient, info: WorkerInfo) -> None:
        self.url = url.rstrip("/")
        self.http = http
        self.info = info
        self.in_flight = 0  # requests this frontend has on the worker now
        self.draining = False  # takes no new requests

    @classmethod
    async def connect(cls, url: str, http: httpx.AsyncClient) -> "WorkerClient":
        try:
            r = await http.get(url.rstrip("/") + "/internal/info", timeout=5.0)
            r.raise_for_status()
        except httpx.HTTPError as exc:
            raise WorkerError(f"worker at {url} unreachable: {exc}") from exc
        return cls(url, http, msgspec.json.decode(r.content, type=WorkerInfo))

    async def prefill(self, body: msgspec.Struct, timeout: float) -> PrefillResult:
        try:
            r = await self.http.post(self.url + "/internal/prefill", content=encoder.encode(body), timeout=timeout)
        except httpx.HTTPError as exc:
            raise WorkerError(f"prefill worker {self.url}: {type(exc).__name__}: {exc}") from exc
        if r.status_code != 200:
            raise WorkerError(f"prefill worker {self.url} answered {r.status_code}: {r.text[:300]}")
        return msgspec.json.decode(r.content, type=PrefillResult)

    async def stream(self, path: str, body: msgspec.Struct, read_timeout: float) -> AsyncIterator[StreamEvent]:
        """NDJSON events of a worker stream. Closing the iterator closes the connection, which the worker
        takes as an abort."""
        timeout = httpx.Timeout(5.0, read=read_timeout)
        try:
            async with self.http.stream("POST", self.url + path, content=encoder.encode(body), timeout=timeout) as r:
                if r.status_code != 200:
                    await r.aread()
                    raise WorkerError(f"worker {self.url}{path} answered {r.status_code}: {r.text[:300]}")
                async for line in r.aiter_lines():
                    if line:
                        yield msgspec.json.decode(line, type=StreamEvent)
        except httpx.HTTPError as exc:
            raise WorkerError(f"worker {self.url} lost: {type(exc).__name__}: {exc}") from exc

    async def connect_to(self, endpoint: str) -> None:
        """Prefill worker: open and handshake the KV connection to a decode worker's endpoint."""
        try:
            r = await self.http.post(self.url + "/internal/connect", json={"endpoint": endpoint}, timeout=10.0)
        except httpx.HTTPError as exc:
            raise WorkerError(f"prefill worker {self.url}: {exc}") from exc
        if r.status_code != 200:
            raise WorkerError(r.json().get("error", r.text))

    async def abort(self, request_id: str) -> None:
        try:
            await self.http.post(self.url + "/internal/abort", json={"request_id": request_id}, timeout=2.0)
        except httpx.HTTPError:
            pass  # the worker is gone: nothing of the request survives there

    async def healthy(self) -> bool:
        try:
            return (await self.http.get(self.url + "/health", timeout=2.0)).status_code == 200
        except httpx.HTTPError:
            return False
