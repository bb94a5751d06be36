"""`GET /internal/state/stream?after=N`: the worker's state reports pushed to the router as NDJSON, one
`WorkerReport` per line, instead of the router polling `/internal/state` every 100 ms.

A report goes out as soon as the worker has KV events the stream has not carried (a block stored or
evicted is in the router's index one engine step later, not up to a poll interval later) or its load
changed, and at least every `heartbeat_s` otherwise. Each carries the events after the last one sent, with
their sequence numbers: the stream itself never skips one, so a gap the router sees means its view broke
(a restart, a reconnect from a stale position), and it resyncs from a snapshot
(`/internal/state?snapshot=1`) and reconnects from there. Events the worker's bounded log no longer holds
go out as `events: null`, which asks the router for the same resync.

Reading the report goes through the engine thread between steps (`Worker.state`), as a poll's does, so the
log, the load and the counters of one report agree. What decides whether to read is checked locally on the
event loop: the pool's event counter and the load the engine thread published.
"""

from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator, Protocol

from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from splitserve.core.router_feed import WorkerReport
from splitserve.core.scheduler import SchedulerLoad
from splitserve.runtime.wire import encoder


class _Pool(Protocol):
    event_seq: int  # the last KV event the BlockPool emitted


class _Engine(Protocol):
    pool: _Pool


class _Loads(Protocol):
    def load(self) -> SchedulerLoad: ...


class StateSource(Protocol):
    """What the stream reads of a worker (`app.Worker`; a Protocol, since app.py includes this module)."""

    engine: _Engine
    async_engine: _Loads

    async def state(self, after: int, snapshot: bool) -> WorkerReport: ...

CHECK_S = 0.005  # how often the stream looks for news: a cheap local read, far below a step's time
HEARTBEAT_S = 1.0  # a report at least this often, news or not: the router sees the stream is alive


async def reports(worker: StateSource, after: int, check_s: float = CHECK_S, heartbeat_s: float = HEARTBEAT_S
                  ) -> AsyncIterator[bytes]:
    """Reports from event `after` on, as NDJSON lines, for as long as the client reads them."""
    pool = worker.engine.pool
    last_load, last_sent = None, float("-inf")
    while True:
        load = worker.async_engine.load()
        if pool.event_seq > after or load != last_load or time.monotonic() - last_sent >= heartbeat_s:
            report = await worker.state(after, snapshot=False)
            yield encoder.encode(report) + b"\n"
            if report.events is not None:
                after = report.last_seq
            last_load, last_sent = load, time.monotonic()
        await asyncio.sleep(check_s)


def include_state_stream(app: FastAPI, worker: StateSource) -> None:
    @app.get("/internal/state/stream")
    async def state_stream(after: int = 0) -> StreamingResponse:
        return StreamingResponse(reports(worker, after), media_type="application/x-ndjson")
