"""Keeps the Router's view of each worker current: a stream of state reports pushed by the worker
(`/internal/state/stream`, runtime/worker/state_stream.py: load, KV events with their sequence numbers,
step counters) handed to the core `RouterFeed`. A gap in the events is answered with a snapshot read
(`/internal/state?snapshot=1`) and a new stream from the snapshot's position; a worker without the stream
endpoint is polled (`/internal/state`) instead.

The feed and the Router stay pure: this is the I/O around them.
"""

from __future__ import annotations

import asyncio
import logging
import time

import httpx
import msgspec

from splitserve.core.router import Router
from splitserve.core.router_feed import RouterFeed, WorkerReport
from splitserve.runtime.wire import WorkerClient

log = logging.getLogger(__name__)

# A stream sends a heartbeat report every second (`state_stream.HEARTBEAT_S`), but a report is read between
# engine steps, and one step can take seconds on a loaded machine: silence this long means a broken stream.
STREAM_READ_TIMEOUT_S = 30.0


class StreamUnsupported(Exception):
    """The worker has no state stream (an older worker): poll it."""


class RouterPoll:
    def __init__(self, router: Router, http: httpx.AsyncClient) -> None:
        self.feed = RouterFeed(router)
        self.http = http

    async def join(self, w: WorkerClient) -> None:
        """Register a worker and load its cache from a snapshot (also how a restarted router rebuilds)."""
        self.feed.join(w.url, w.info.role, w.info.generation, w.info.num_blocks, w.info.prefill_tokens_while_decoding)
        await self.refresh(w, snapshot=True)

    def leave(self, w: WorkerClient) -> None:
        self.feed.leave(w.url)

    async def refresh(self, w: WorkerClient, snapshot: bool = False) -> None:
        after = self.feed.after(w.url)
        if not self.feed.report(w.url, await self._fetch(w, after, snapshot), time.monotonic()):
            self.feed.report(w.url, await self._fetch(w, after, True), time.monotonic())

    async def run(self, pools: dict[str, list[WorkerClient]], interval_s: float) -> None:
        """Follow every worker in `pools` (which changes as workers join and leave), each on its own task: a
        worker's reports are read between its engine steps, so a worker in a long prefill must not hold back
        the router's view of the others. `interval_s`: how often membership is checked, the wait before
        reconnecting a broken stream, and the poll interval of a worker without a stream."""
        tasks: dict[str, asyncio.Task[None]] = {}
        try:
            while True:
                current = {w.url: w for pool in pools.values() for w in pool}
                for url in tasks.keys() - current.keys():
                    tasks.pop(url).cancel()
                for url, w in current.items():
                    task = tasks.get(url)
                    if task is not None and task.done() and not task.cancelled():
                        # A bug, not a worker being away (those are caught in _follow): say so, keep following.
                        log.error("following %s failed", url, exc_info=task.exception())
                    if task is None or task.done():
                        tasks[url] = asyncio.create_task(self._follow(w, interval_s))
                await asyncio.sleep(interval_s)
        finally:
            for task in tasks.values():
                task.cancel()

    async def _follow(self, w: WorkerClient, interval_s: float) -> None:
        while True:
            try:
                await self.stream(w)
                continue  # a gap was resynced: stream again from the snapshot's position at once
            except StreamUnsupported:
                break
            except (httpx.HTTPError, msgspec.DecodeError, msgspec.ValidationError) as exc:
                log.debug("state stream of %s broken: %s", w.url, exc)
            await asyncio.sleep(interval_s)
        await self._poll(w, interval_s)

    async def stream(self, w: WorkerClient) -> None:
        """Apply the worker's pushed reports until the stream breaks or shows a gap (resynced here)."""
        params = {"after": self.feed.after(w.url)}
        timeout = httpx.Timeout(5.0, read=STREAM_READ_TIMEOUT_S)
        async with self.http.stream("GET", w.url + "/internal/state/stream", params=params, timeout=timeout) as r:
            if r.status_code == 404:
                raise StreamUnsupported(w.url)
            r.raise_for_status()
            async for line in r.aiter_lines():
                if line and not self.feed.report(w.url, msgspec.json.decode(line, type=WorkerReport),
                                                 time.monotonic()):
                    break
            else:
                return  # the worker closed the stream (it is stopping): reconnect or find it gone
        await self.refresh(w, snapshot=True)

    async def _poll(self, w: WorkerClient, interval_s: float) -> None:
        while True:
            try:
                await self.refresh(w)
            except (httpx.HTTPError, msgspec.DecodeError, msgspec.ValidationError) as exc:
                log.debug("state of %s unavailable: %s", w.url, exc)
            await asyncio.sleep(interval_s)

    async def _fetch(self, w: WorkerClient, after: int, snapshot: bool) -> WorkerReport:
        params = {"after": after, "snapshot": int(snapshot)}
        r = await self.http.get(w.url + "/internal/state", params=params, timeout=5.0)
        r.raise_for_status()
        return msgspec.json.decode(r.content, type=WorkerReport)
