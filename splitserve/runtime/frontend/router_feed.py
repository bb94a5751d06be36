"""Polls each worker's state (`/internal/state`: load, KV events since the last one the Router has, step
counters) and hands it to the core `RouterFeed`; answers a gap in the event log by fetching a snapshot.

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


class RouterPoll:
    def __init__(self, router: Router, http: httpx.AsyncClient) -> None:
        self.feed = RouterFeed(router)
        self.http = http

    async def join(self, w: WorkerClient) -> None:
        """Register a worker and load its cache from a snapshot (also how a restarted router rebuilds)."""
        self.feed.join(w.url, w.info.role, w.info.generation, w.info.num_blocks)
        await self.refresh(w, snapshot=True)

    def leave(self, w: WorkerClient) -> None:
        self.feed.leave(w.url)

    async def refresh(self, w: WorkerClient, snapshot: bool = False) -> None:
        after = self.feed.after(w.url)
        if not self.feed.report(w.url, await self._fetch(w, after, snapshot), time.monotonic()):
            self.feed.report(w.url, await self._fetch(w, after, True), time.monotonic())

    async def run(self, pools: dict[str, list[WorkerClient]], interval_s: float) -> None:
        """Poll every worker in `pools` (which changes as workers join and leave), each on its own loop: a
        worker's state answers between engine steps, so a worker in a long prefill must not hold back
        the router's view of the others."""
        polls: dict[str, asyncio.Task[None]] = {}
        try:
            while True:
                current = {w.url: w for pool in pools.values() for w in pool}
                for url in polls.keys() - current.keys():
                    polls.pop(url).cancel()
                for url, w in current.items():
                    task = polls.get(url)
                    if task is not None and task.done() and not task.cancelled():
                        # A bug, not a worker being away (those are caught in _poll): say so, keep polling.
                        log.error("polling %s failed", url, exc_info=task.exception())
                    if task is None or task.done():
                        polls[url] = asyncio.create_task(self._poll(w, interval_s))
                await asyncio.sleep(interval_s)
        finally:
            for task in polls.values():
                task.cancel()

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
