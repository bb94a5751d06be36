"""Keeps the core Router's view of the workers current: polls each worker's state (load, KV events since
the last one seen, step counters) and feeds it in; answers a gap in the event log with a snapshot.

The Router itself stays pure: this is the I/O around it.
"""

from __future__ import annotations

import asyncio
import logging
import time

import httpx
import msgspec

from splitserve.core.router import Router
from splitserve.runtime.worker.engine import StepCounters
from splitserve.runtime.wire import WorkerState
from splitserve.runtime.wire import WorkerClient

log = logging.getLogger(__name__)


class RouterFeed:
    def __init__(self, router: Router, http: httpx.AsyncClient) -> None:
        self.router = router
        self.http = http
        self._counters: dict[str, tuple[StepCounters, float, float]] = {}  # last counters, link bytes, link s

    async def join(self, w: WorkerClient) -> None:
        """Register a worker and load its cache from a snapshot (also how a restarted router rebuilds)."""
        self.router.register(w.url, w.info.role, w.info.generation, w.info.num_blocks)
        await self.refresh(w, snapshot=True)

    def leave(self, w: WorkerClient) -> None:
        self.router.deregister(w.url)
        self._counters.pop(w.url, None)

    async def refresh(self, w: WorkerClient, snapshot: bool = False) -> None:
        position = self.router.index.position(w.url)
        after = position[1] if position else 0
        state = await self._fetch(w, after, snapshot)
        r = self.router
        if state.snapshot is not None:
            r.resync(w.url, state.generation, state.last_seq, state.snapshot)
        elif state.events is None or not r.on_events(w.url, state.generation, state.events, state.last_seq):
            state = await self._fetch(w, after, True)
            r.resync(w.url, state.generation, state.last_seq, state.snapshot or [])
        r.update_load(
            w.url, free_blocks=state.free_blocks, running=state.running,
            queued_prefill_tokens=state.queued_prefill_tokens, now=time.monotonic(),
        )
        self._observe(w.url, state)

    async def run(self, pools: dict[str, list[WorkerClient]], interval_s: float) -> None:
        """Poll every worker in `pools` (which changes as workers join and leave), each on its own loop: a
        worker's state answers between engine steps, so a worker in a long prefill must not hold back
        the router's view of the others."""
        polls: dict[str, asyncio.Task[None]] = {}
        try:
            while True:
                current = {w.url: w for role in ("prefill", "decode") for w in pools[role]}
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

    async def _fetch(self, w: WorkerClient, after: int, snapshot: bool) -> WorkerState:
        params = {"after": after, "snapshot": int(snapshot)}
        r = await self.http.get(w.url + "/internal/state", params=params, timeout=5.0)
        r.raise_for_status()
        return msgspec.json.decode(r.content, type=WorkerState)

    def _observe(self, url: str, state: WorkerState) -> None:
        """Per-token prefill cost, decode step time and link speed from the deltas since the last poll."""
        prev = self._counters.get(url)
        self._counters[url] = (state.counters, state.link_bytes, state.link_s)
        if prev is None:
            return
        c, (p, link_bytes, link_s) = state.counters, prev
        if c.prefill_tokens > p.prefill_tokens:
            self.router.observe_prefill(
                url, c.prefill_tokens - p.prefill_tokens, c.prefill_s - p.prefill_s, c.prefill_steps - p.prefill_steps
            )
        if c.decode_steps > p.decode_steps:
            self.router.observe_decode_step(url, (c.decode_s - p.decode_s) / (c.decode_steps - p.decode_steps))
        if state.link_s > link_s:
            self.router.observe_transfer(state.link_bytes - link_bytes, state.link_s - link_s)
