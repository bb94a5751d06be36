"""Serving a worker process: join a running deployment through its router, and drain before leaving.

On SIGTERM or SIGINT the worker first asks the router to send it nothing new and waits until the
requests it has are finished; only then does the HTTP server stop. A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from types import FrameType
from typing import Callable

import httpx
import uvicorn

from splitserve.runtime.auth import SignedCalls

log = logging.getLogger(__name__)


class WorkerServer(uvicorn.Server):
    def __init__(
        self, config: uvicorn.Config, url: str, router: str | None, idle: Callable[[], bool], secret: bytes,
        drain_timeout_s: float = 600.0,
    ) -> None:
        """`secret`: the deployment's; it signs this worker's registration and drain, which the router
        refuses from anyone who cannot prove it."""
        super().__init__(config)
        self._auth = SignedCalls(secret)
        # Registration over the frontend's TLS port does not check its certificate: the calls are signed
        # (nothing in them can be changed or replayed) and their answers carry nothing secret.
        self._verify = not (router or "").startswith("https://")
        self.url = url
        self.router = router.rstrip("/") if router else None
        self.idle = idle  # True when the engine holds no request, reservation or block in transit
        self.drain_timeout_s = drain_timeout_s
        self.registration_error: str | None = None
        self._draining = False
        self._loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets: list | None = None) -> None:
        await super().startup(sockets)
        self._loop = asyncio.get_running_loop()
        if self.router is not None and not self.should_exit:
            self._loop.create_task(self._register())

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._draining or self._loop is None:
            super().handle_exit(sig, frame)
            return
        self._draining = True
        log.info("draining: no new requests; exiting once the current ones are done")
        self._loop.call_soon_threadsafe(lambda: self._loop.create_task(self._drain_then_exit()))  # type: ignore[union-attr]

    async def _register(self, timeout_s: float = 60.0) -> None:
        """Join the deployment; the router checks model and KV layout and handshakes KV peers first."""
        end = time.monotonic() + timeout_s
        async with httpx.AsyncClient(auth=self._auth, verify=self._verify) as http:
            while not self.should_exit:
                try:
                    r = await http.post(self.router + "/admin/workers", json={"url": self.url}, timeout=30.0)
                except httpx.HTTPError as exc:
                    if time.monotonic() > end:
                        self._refused(f"router {self.router} unreachable: {exc}")
                        return
                    await asyncio.sleep(0.5)
                    continue
                if r.status_code == 200:
                    log.info("registered with router %s", self.router)
                else:
                    self._refused(f"router {self.router} refused this worker: {r.text}")
                return

    def _refused(self, message: str) -> None:
        log.error("%s", message)
        self.registration_error = message
        self.should_exit = True

    async def _drain_then_exit(self) -> None:
        end = time.monotonic() + self.drain_timeout_s
        try:
            if self.router is not None:
                async with httpx.AsyncClient(auth=self._auth, verify=self._verify) as http:
                    # The router answers once nothing it routed here is still running.
                    await http.post(self.router + "/admin/workers/drain", json={"url": self.url}, timeout=self.drain_timeout_s)
        except httpx.HTTPError as exc:
            log.warning("router did not confirm the drain (%s): waiting for local requests only", exc)
        while not self.idle() and time.monotonic() < end:
            await asyncio.sleep(0.05)
        self.should_exit = True
