"""RouterPoll.run: every worker followed on its own task, so a slow one holds back nobody, and one that
crashes on a bug is logged and started again; a worker's pushed state stream feeds the Router, a gap in it
is resynced from a snapshot; a worker without a stream is polled."""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace

from splitserve.runtime.frontend.router_feed import RouterPoll, StreamUnsupported


class ScriptedFeed(RouterPoll):
    """Workers without a state stream: each is polled through `refresh`."""

    def __init__(self) -> None:
        super().__init__(router=None, http=None)
        self.calls: dict[str, int] = {"fast": 0, "slow": 0, "buggy": 0}

    async def refresh(self, w, snapshot: bool = False) -> None:
        self.calls[w.url] += 1
        if w.url == "slow":
            await asyncio.sleep(10)  # a worker in a long prefill: its state read waits for the step
        if w.url == "buggy" and self.calls["buggy"] == 1:
            raise KeyError("a bug, not an unreachable worker")

    async def stream(self, w) -> None:
        raise StreamUnsupported(w.url)


def test_each_worker_polls_on_its_own_and_a_crashed_poll_restarts(caplog):
    feed = ScriptedFeed()
    pools = {"prefill": [SimpleNamespace(url="slow"), SimpleNamespace(url="buggy")], "decode": [SimpleNamespace(url="fast")]}

    async def main() -> None:
        task = asyncio.create_task(feed.run(pools, interval_s=0.01))
        await asyncio.sleep(0.3)
        task.cancel()

    with caplog.at_level(logging.ERROR, logger="splitserve.runtime.frontend.router_feed"):
        asyncio.run(main())
    assert feed.calls["slow"] == 1
    assert feed.calls["fast"] >= 5
    assert feed.calls["buggy"] >= 3
    assert "following buggy failed" in caplog.text


def test_the_poller_and_a_direct_feed_leave_the_router_in_the_same_state():
    """The runtime's poller hands each `/internal/state` (JSON, through a bounded event log that drops old
    events) to the core feed; the simulator hands the same reports to it directly. Same reports, same Router."""
    from dataclasses import replace

    import httpx

    from splitserve.core.blocks import BlockPool
    from splitserve.core.costs import CostModel
    from splitserve.core.request import Request, SamplingParams
    from splitserve.core.router import Router
    from splitserve.core.router_feed import RouterFeed, StepCounters, WorkerReport
    from splitserve.core.scheduler import Scheduler, SchedulerConfig
    from splitserve.runtime.wire import encoder
    from splitserve.runtime.worker.kv_event_log import KVEventLog

    def new_router() -> Router:
        costs = CostModel(kv_bytes_per_token=100, num_layers=4, link_bytes_per_s=1e9, prefill_s_per_token=1e-4, decode_step_s=0.01)
        return Router("kv_aware", 4, costs)

    sched = Scheduler(SchedulerConfig(max_model_len=64, max_num_seqs=4), BlockPool(48, 4))
    log = KVEventLog(sched.pool, capacity=8)  # small: a slow poll finds a gap and fetches a snapshot
    counters = StepCounters()

    def state(after: int, snapshot: bool) -> WorkerReport:
        log.collect()
        return WorkerReport(7, log.last_seq, None if snapshot else log.since(after),
                            sorted(sched.pool.cached_hashes()) if snapshot else None, sched.load(), replace(counters), 0.0, 0.0)

    def handler(request: httpx.Request) -> httpx.Response:
        q = request.url.params
        return httpx.Response(200, content=encoder.encode(state(int(q["after"]), q["snapshot"] == "1")))

    direct, polled = RouterFeed(new_router()), RouterPoll(new_router(), httpx.AsyncClient(transport=httpx.MockTransport(handler)))
    worker = SimpleNamespace(url="http://w", info=SimpleNamespace(role="decode", generation=7, num_blocks=48, prefill_tokens_while_decoding=32))

    def feed_directly(now: float) -> None:
        after = direct.after("http://w")
        if not direct.report("http://w", state(after, False), now):
            direct.report("http://w", state(after, True), now)

    async def main() -> None:
        direct.join("http://w", "decode", 7, 48, 32)
        feed_directly(0.0)
        await polled.join(worker)
        for i in range(12):
            sched.add_request(Request(str(i), [i % 3] * 12 + [i, i], SamplingParams(max_tokens=3, ignore_eos=True), 0.0))
            out = sched.schedule(float(i))
            counters.count(out, 0.01 * (1 + out.num_tokens))
            sched.update(out, {s.request.request_id: 5 for s in out.seqs if s.sample})
            if i % 4 == 3:  # now and then both read the worker, after several steps' events
                feed_directly(float(i))
                await polled.refresh(worker)
                polled.feed.router.workers["http://w"].queue_as_of = float(i)  # the poller reads the wall clock

    asyncio.run(main())
    a, b = direct.router, polled.feed.router
    assert a.index.cached("http://w") == b.index.cached("http://w") == sched.pool.cached_hashes() != frozenset()
    assert a.index.position("http://w") == b.index.position("http://w")
    assert a.workers == b.workers
    assert a.costs.prefill_fit("http://w") == b.costs.prefill_fit("http://w") != (0.0, a.costs.prefill_s_per_token)


def test_a_pushed_stream_feeds_the_router_and_a_gap_in_it_is_resynced_from_a_snapshot():
    import httpx

    from splitserve.core.blocks import NO_PARENT, BlockPool, KVEvent
    from splitserve.core.costs import CostModel
    from splitserve.core.router import Router
    from splitserve.core.router_feed import StepCounters, WorkerReport
    from splitserve.core.scheduler import Scheduler, SchedulerConfig
    from splitserve.runtime.wire import encoder

    load = Scheduler(SchedulerConfig(max_model_len=64), BlockPool(48, 4)).load()

    def report(last_seq, events=None, snapshot=None) -> bytes:
        return encoder.encode(WorkerReport(7, last_seq, events, snapshot, load, StepCounters()))

    def stored(seq, h):
        return KVEvent(seq, "stored", h, NO_PARENT)

    asked: list[tuple[str, dict]] = []
    # The stream: events 1-3, then 5-6 (event 4, evicting block 11, was lost): the router must resync.
    lines = [report(3, [stored(1, 11), stored(2, 12), stored(3, 13)]), report(6, [stored(5, 15), stored(6, 16)])]

    def handler(request: httpx.Request) -> httpx.Response:
        asked.append((request.url.path, dict(request.url.params)))
        if request.url.path == "/internal/state/stream":
            return httpx.Response(200, content=b"\n".join(lines) + b"\n")
        return httpx.Response(200, content=report(6, snapshot=[12, 13, 15, 16]))

    costs = CostModel(kv_bytes_per_token=100, num_layers=4, link_bytes_per_s=1e9, prefill_s_per_token=1e-4,
                      decode_step_s=0.01)
    feed = RouterPoll(Router("kv_aware", 4, costs), httpx.AsyncClient(transport=httpx.MockTransport(handler)))
    feed.feed.join("http://w", "prefill", 7, 48)
    worker = SimpleNamespace(url="http://w")

    asyncio.run(feed.stream(worker))
    router = feed.feed.router
    assert router.index.cached("http://w") == frozenset({12, 13, 15, 16})  # the snapshot, not 11's ghost
    assert router.index.position("http://w") == (7, 6)
    assert asked[0] == ("/internal/state/stream", {"after": "0"})
    assert asked[1] == ("/internal/state", {"after": "3", "snapshot": "1"})
    # A new stream continues from the snapshot's position: no event is asked for twice.
    lines[:] = [report(7, [stored(7, 17)])]
    asyncio.run(feed.stream(worker))
    assert asked[2] == ("/internal/state/stream", {"after": "6"}) and len(asked) == 3
    assert 17 in router.index.cached("http://w")
