"""The worker's pushed state stream: a report at once, another as soon as the pool has new KV events (from
the last event sent), none while nothing changes until the heartbeat, and `events: null` does not move the
stream's position (the router resyncs)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import msgspec

from splitserve.core.blocks import BlockPool
from splitserve.core.router_feed import StepCounters, WorkerReport
from splitserve.core.scheduler import Scheduler, SchedulerConfig
from splitserve.runtime.worker.state_stream import reports


class FakeWorker:
    def __init__(self) -> None:
        self.engine = SimpleNamespace(pool=SimpleNamespace(event_seq=0))
        load = Scheduler(SchedulerConfig(max_model_len=64), BlockPool(48, 4)).load()
        self.async_engine = SimpleNamespace(load=lambda: load)
        self.asked: list[int] = []
        self.lost = False  # the worker's bounded log dropped events the stream has not sent

    async def state(self, after: int, snapshot: bool) -> WorkerReport:
        self.asked.append(after)
        seq = self.engine.pool.event_seq
        return WorkerReport(1, seq, None if self.lost else [], None, self.async_engine.load(), StepCounters())


def test_reports_go_out_on_news_and_on_the_heartbeat_only():
    worker = FakeWorker()

    async def main() -> list[WorkerReport]:
        got = []
        stream = reports(worker, after=0, check_s=0.001, heartbeat_s=0.2)
        got.append(msgspec.json.decode(await anext(stream), type=WorkerReport))  # at once: the load is news
        worker.engine.pool.event_seq = 3  # the engine stored three blocks
        got.append(msgspec.json.decode(await anext(stream), type=WorkerReport))
        worker.lost, worker.engine.pool.event_seq = True, 9
        got.append(msgspec.json.decode(await anext(stream), type=WorkerReport))
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        got.append(msgspec.json.decode(await anext(stream), type=WorkerReport))  # still seq 9 > 3: news
        worker.lost = False
        got.append(msgspec.json.decode(await anext(stream), type=WorkerReport))
        t1 = loop.time()
        got.append(msgspec.json.decode(await anext(stream), type=WorkerReport))  # nothing new: the heartbeat
        return got, t0, t1, loop.time()

    got, t0, t1, t2 = asyncio.run(main())
    assert [r.last_seq for r in got] == [0, 3, 9, 9, 9, 9]
    # Each read asks from the last event sent; a report without events (lost) does not advance it.
    assert worker.asked == [0, 0, 3, 3, 3, 9]
    assert t2 - t1 >= 0.2 * 0.9  # the last one waited for the heartbeat, not for the next check
