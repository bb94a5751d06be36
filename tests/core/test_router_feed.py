"""RouterFeed: reports with gaps, duplicates, restarts and snapshots end with the Router's index equal to the
worker's cached set; counters become measurements only as they grow, never negative; and the one definition
of a prefill token and of running."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given, settings, strategies as st

from splitserve.core.blocks import BlockPool
from splitserve.core.costs import CostModel
from splitserve.core.request import Request, SamplingParams
from splitserve.core.router import Router
from splitserve.core.router_feed import RouterFeed, StepCounters, WorkerReport, prefill_tokens, running
from splitserve.core.scheduler import Scheduler, SchedulerConfig


def make_feed() -> tuple[RouterFeed, list[tuple[str, float, float]]]:
    costs = CostModel(kv_bytes_per_token=100, num_layers=4, link_bytes_per_s=1e9, prefill_s_per_token=1e-4, decode_step_s=0.01)
    router = Router("kv_aware", 4, costs)
    measured: list[tuple[str, float, float]] = []
    router.observe_prefill = lambda w, tokens, seconds, steps=1, now=None: measured.append(("prefill", tokens, seconds))
    router.observe_decode_step = lambda w, seconds: measured.append(("decode", 1, seconds))
    router.observe_transfer = lambda nbytes, seconds: measured.append(("link", nbytes, seconds))
    return RouterFeed(router), measured


def report(pool: BlockPool, generation: int, counters: StepCounters, events, snapshot=None, link=(0.0, 0.0)) -> WorkerReport:
    load = Scheduler(SchedulerConfig(max_model_len=8), pool).load()
    return WorkerReport(generation, pool.event_seq, events, snapshot, load, replace(counters), *link)


ops = st.lists(st.tuples(st.sampled_from(["store", "evict", "report", "drop", "duplicate", "restart", "step"]),
                         st.integers(0, 40)), max_size=60)


@settings(max_examples=500, deadline=None)
@given(ops)
def test_any_interleaving_of_reports_ends_with_the_workers_cached_set(script):
    feed, measured = make_feed()
    generation = 1
    pool = BlockPool(8, 4)
    feed.join("w", "decode", generation, 8)
    counters = StepCounters()
    link = [0.0, 0.0]
    unsent: list = []  # events the worker has produced and the feed has not been offered yet
    last: list[WorkerReport] = []  # the last report sent, as it was (a duplicate arrives unchanged)

    def send(r: WorkerReport) -> None:
        if not feed.report("w", r, 0.0):
            seq, hashes = pool.snapshot()
            assert feed.report("w", report(pool, generation, counters, None, sorted(hashes), tuple(link)), 0.0)

    def deliver(events) -> None:
        last[:] = [report(pool, generation, counters, events, link=tuple(link))]
        send(last[0])

    for op, x in script:
        if op == "store":  # a block computed and cached, then released: cached and evictable
            blocks = pool.allocate(1)
            if blocks:
                pool.cache(blocks[0], 1000 + x, 0)
                pool.release(blocks)
        elif op == "evict":  # allocations reuse free blocks, evicting their cached hashes
            blocks = pool.allocate(1 + x % 8)
            if blocks:
                pool.release(blocks)
        elif op == "step":
            counters.prefill_steps += x % 2
            counters.prefill_tokens += x * (x % 2)
            counters.prefill_s += 0.01 * x * (x % 2)
            counters.decode_steps += 1 - x % 2
            counters.decode_s += 0.02 * (1 - x % 2)
            link[0] += 100.0 * x
            link[1] += 0.001 * x
        elif op == "restart":  # a new process: empty cache, counters from zero, a newer generation
            generation += 1
            pool, counters, link, unsent = BlockPool(8, 4), StepCounters(), [0.0, 0.0], []
        unsent += pool.drain_events()
        if op == "report":
            deliver(unsent)
            unsent = []
        elif op == "drop":  # a lost batch: the next report shows a gap
            unsent = []
        elif op == "duplicate" and last:  # the network delivers an earlier report again
            send(last[0])
    deliver(unsent)
    assert feed.router.index.cached("w") == pool.cached_hashes()
    assert all(tokens > 0 and seconds > 0 for _, tokens, seconds in measured)


def test_counters_become_measurements_from_their_growth_and_a_restart_starts_again():
    feed, measured = make_feed()
    pool = BlockPool(8, 4)
    feed.join("w", "prefill", 1, 8)
    c = StepCounters(prefill_steps=10, prefill_tokens=5000, prefill_s=1.0, decode_steps=4, decode_s=0.25)
    assert feed.report("w", report(pool, 1, c, [], link=(1e6, 0.25)), 0.0)
    assert measured == []  # the first report is the baseline
    c = StepCounters(prefill_steps=12, prefill_tokens=6000, prefill_s=1.5, decode_steps=6, decode_s=0.5)
    feed.report("w", report(pool, 1, c, [], link=(3e6, 0.5)), 1.0)
    assert measured == [("prefill", 1000, 0.5), ("decode", 1, 0.125), ("link", 2e6, 0.25)]
    measured.clear()
    # Restarted: its counters are lower, but they are a new baseline, not a negative measurement.
    feed.join("w", "prefill", 2, 8)
    feed.report("w", report(BlockPool(8, 4), 2, StepCounters(prefill_steps=1, prefill_tokens=10, prefill_s=0.1), [], snapshot=[]), 2.0)
    assert measured == []
    # A late report of the dead process changes nothing.
    feed.report("w", report(pool, 1, StepCounters(prefill_steps=99, prefill_tokens=99_000, prefill_s=9.0), []), 3.0)
    assert measured == []


def test_load_goes_to_the_router_with_running_counting_every_unfinished_request():
    feed, _ = make_feed()
    s = Scheduler(SchedulerConfig(max_model_len=64), BlockPool(32, 4))
    feed.join("d", "decode", 1, 32)
    s.reserve(Request("r", list(range(9)), SamplingParams(max_tokens=4), 0.0))
    s.add_request(Request("q", list(range(20, 30)), SamplingParams(max_tokens=4), 0.0))
    load = s.load()
    assert running(load) == 2
    assert feed.report("d", WorkerReport(1, s.pool.event_seq, s.pool.drain_events(), None, load, StepCounters()), 5.0)
    w = feed.router.workers["d"]
    assert (w.running, w.free_blocks, w.queued_prefill_tokens, w.queue_as_of) == (2, load.free_blocks, 10, 5.0)


def test_a_prefill_token_is_a_prompt_token_computed_and_a_decode_step_has_none():
    s = Scheduler(SchedulerConfig(max_model_len=64, max_num_batched_tokens=4, enable_chunked_prefill=True), BlockPool(32, 4))
    s.add_request(Request("a", list(range(5)), SamplingParams(max_tokens=3, ignore_eos=True), 0.0))
    counters = StepCounters()
    seen = []
    while s.has_work():
        out = s.schedule(0.0)
        seen.append(prefill_tokens(out))
        counters.count(out, 0.5)
        s.update(out, {q.request.request_id: 1 for q in out.seqs if q.sample})
    # Chunks of 4 and of the prompt's last token, then two decode steps.
    assert seen == [4, 1, 0, 0]
    assert (counters.prefill_steps, counters.prefill_tokens, counters.prefill_s) == (2, 5, 1.0)
    assert (counters.decode_steps, counters.decode_s) == (2, 1.0)
