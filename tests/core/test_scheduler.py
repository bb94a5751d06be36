"""Scheduler, driven by a fake model whose 'KV cache' stores the token ids themselves.

The fake model reads each sequence's context back from the slots its block table names, so any wrong
block table, a prefix hit on the wrong blocks, or a block reused while still in use changes the output.
"""

from hypothesis import given, settings, strategies as st

from splitserve.core.blocks import BlockPool
from splitserve.core.request import Request, RequestStatus, SamplingParams
from splitserve.core.scheduler import QueueFull, Scheduler, SchedulerConfig

VOCAB = 97


def next_token(context: list[int]) -> int:
    return (sum((i + 1) * t for i, t in enumerate(context)) * 31 + len(context)) % VOCAB


class FakeModel:
    def __init__(self, pool: BlockPool):
        self.bs = pool.block_size
        self.slots: dict[int, int] = {}

    def step(self, out) -> dict[str, int]:
        sampled = {}
        for s in out.seqs:
            req = s.request
            for pos in range(s.start_pos, s.start_pos + s.num_new_tokens):
                block = req.block_ids[pos // self.bs]
                self.slots[block * self.bs + pos % self.bs] = req.all_token_ids[pos]
            if s.sample:
                end = s.start_pos + s.num_new_tokens
                context = [self.slots[req.block_ids[p // self.bs] * self.bs + p % self.bs] for p in range(end)]
                sampled[req.request_id] = next_token(context)
        return sampled


def reference(prompt: list[int], n: int) -> list[int]:
    ctx = list(prompt)
    for _ in range(n):
        ctx.append(next_token(ctx))
    return ctx[len(prompt):]


def run(sched: Scheduler, reqs: list[Request], model: FakeModel | None = None, max_steps: int = 10_000) -> dict[str, list[int]]:
    model = model or FakeModel(sched.pool)
    for r in reqs:
        sched.add_request(r)
    steps = 0
    while sched.has_work():
        out = sched.schedule(now=float(steps))
        assert out.num_tokens <= sched.config.max_num_batched_tokens
        assert sched.load().running <= sched.config.max_num_seqs
        sched.update(out, model.step(out))
        steps += 1
        assert steps < max_steps, "scheduler made no progress"
    return {r.request_id: r.output_token_ids for r in reqs}


def make(rid: str, prompt: list[int], n: int) -> Request:
    return Request(rid, prompt, SamplingParams(max_tokens=n, ignore_eos=True), 0.0)


def test_continuous_batching_matches_reference_and_frees_everything():
    pool = BlockPool(64, 4)
    sched = Scheduler(SchedulerConfig(max_model_len=128, max_num_batched_tokens=64, max_num_seqs=3), pool)
    reqs = [make(f"r{i}", [(i * 7 + j) % VOCAB for j in range(5 + 3 * i)], 4 + i) for i in range(6)]
    outs = run(sched, reqs)
    for r in reqs:
        assert outs[r.request_id] == reference(r.prompt_token_ids, r.params.max_tokens)
        assert r.status is RequestStatus.FINISHED_LENGTH
    assert pool.num_free_blocks == pool.num_blocks


def test_chunked_prefill_respects_budget_and_is_exact():
    pool = BlockPool(64, 4)
    sched = Scheduler(SchedulerConfig(max_model_len=128, max_num_batched_tokens=8, enable_chunked_prefill=True), pool)
    reqs = [make("long", list(range(40)), 3), make("short", [5, 6], 3)]
    outs = run(sched, reqs)
    assert outs["long"] == reference(list(range(40)), 3)
    assert outs["short"] == reference([5, 6], 3)


def test_prefix_hit_skips_cached_blocks_and_reports_them():
    pool = BlockPool(32, 4)
    sched = Scheduler(SchedulerConfig(max_model_len=64), pool)
    model = FakeModel(pool)  # one model: its slots are the cache the later requests hit
    prompt = list(range(1, 14))
    run(sched, [make("a", prompt, 2)], model)
    b = make("b", prompt + [50], 2)
    assert run(sched, [b], model)["b"] == reference(prompt + [50], 2)
    assert b.num_cached_tokens == 12
    assert sched.prefix_hit_tokens == 12
    # A fully cached prompt still computes its last token, so it can be sampled.
    c = make("c", prompt[:12], 1)
    assert run(sched, [c], model)["c"] == reference(prompt[:12], 1)
    assert c.num_cached_tokens == 8


def test_preemption_by_recompute_gives_identical_output():
    pool = BlockPool(10, 2)
    sched = Scheduler(SchedulerConfig(max_model_len=20, max_num_seqs=8), pool)
    reqs = [make(f"r{i}", [i + 1, i + 2, i + 3], 10) for i in range(4)]
    outs = run(sched, reqs)
    assert sum(r.num_preemptions for r in reqs) > 0
    for r in reqs:
        assert outs[r.request_id] == reference(r.prompt_token_ids, 10)
    assert pool.num_free_blocks == pool.num_blocks


def test_abort_frees_blocks_in_any_state():
    pool = BlockPool(16, 4)
    sched = Scheduler(SchedulerConfig(max_model_len=32, max_num_seqs=1), pool)
    a, b = make("a", list(range(9)), 5), make("b", list(range(7)), 5)
    sched.add_request(a)
    sched.add_request(b)
    out = sched.schedule(0.0)
    sched.update(out, FakeModel(pool).step(out))
    assert a.block_ids and not b.block_ids
    assert sched.abort("b") is b and sched.abort("a") is a
    assert a.status is RequestStatus.FINISHED_ABORTED
    assert pool.num_free_blocks == pool.num_blocks
    assert sched.abort("a") is None and not sched.has_work()


def test_stop_token_and_eos():
    pool = BlockPool(16, 4)
    sched = Scheduler(SchedulerConfig(max_model_len=64), pool)
    ref = reference([1, 2, 3], 6)
    stop = Request("s", [1, 2, 3], SamplingParams(max_tokens=6, stop_token_ids=(ref[2],)), 0.0)
    eos = Request("e", [1, 2, 3], SamplingParams(max_tokens=6), 0.0, eos_token_ids=frozenset({ref[1]}))
    outs = run(sched, [stop, eos])
    assert outs["s"] == ref[: ref.index(ref[2]) + 1] and stop.status is RequestStatus.FINISHED_STOPPED
    assert outs["e"] == ref[: ref.index(ref[1]) + 1] and eos.status is RequestStatus.FINISHED_STOPPED


def test_queue_cap_and_context_limit():
    pool = BlockPool(16, 4)
    sched = Scheduler(SchedulerConfig(max_model_len=16, max_waiting=1), pool)
    sched.add_request(make("a", [1], 1))
    try:
        sched.add_request(make("b", [1], 1))
    except QueueFull:
        pass
    else:
        raise AssertionError("queue cap ignored")
    try:
        Scheduler(SchedulerConfig(max_model_len=16), pool).add_request(make("c", list(range(16)), 1))
    except ValueError as e:
        assert "context" in str(e)
    else:
        raise AssertionError("over-long prompt accepted")


@settings(max_examples=60, deadline=None)
@given(
    prompts=st.lists(st.lists(st.integers(0, 5), min_size=1, max_size=30), min_size=1, max_size=8),
    max_tokens=st.lists(st.integers(1, 12), min_size=8, max_size=8),
    num_blocks=st.integers(12, 40),
    block_size=st.sampled_from([1, 2, 4, 16]),
    chunked=st.booleans(),
    budget=st.integers(4, 64),
    max_seqs=st.integers(1, 6),
)
def test_any_workload_is_exact_and_balances_blocks(prompts, max_tokens, num_blocks, block_size, chunked, budget, max_seqs):
    max_model_len = 44
    num_blocks = max(num_blocks, -(-max_model_len // block_size))
    pool = BlockPool(num_blocks, block_size)
    sched = Scheduler(
        SchedulerConfig(max_model_len=max_model_len, max_num_batched_tokens=budget, enable_chunked_prefill=chunked, max_num_seqs=max_seqs),
        pool,
    )
    # Shared prefixes come from the small token alphabet: prompts often repeat each other's starts.
    reqs = [make(f"r{i}", p, max_tokens[i]) for i, p in enumerate(prompts)]
    outs = run(sched, reqs)
    for r in reqs:
        assert outs[r.request_id] == reference(r.prompt_token_ids, r.params.max_tokens)
    assert pool.num_free_blocks == pool.num_blocks
    assert all(c == 0 for c in pool.ref_counts)


def test_load_counts_each_queue_and_idle_means_nothing_left():
    """The one read of the scheduler's state: every request is counted in exactly one place, from
    reservation through the KV's arrival, decoding and the prefill side's held blocks, to idle."""
    d = Scheduler(SchedulerConfig(max_model_len=32), BlockPool(16, 4))
    r = Request("r", list(range(9)), SamplingParams(max_tokens=3, ignore_eos=True), 0.0)
    assert d.load().idle
    d.reserve(r)
    load = d.load()
    assert (load.reserved, load.waiting, load.running, load.ready) == (1, 0, 0, 0) and not load.has_work and not load.idle
    assert load.free_blocks == 16 - 3 and load.total_blocks == 16
    d.kv_arrived("r", 5, now=0.0)
    load = d.load()
    assert (load.reserved, load.ready) == (0, 1) and load.has_work
    d.update(out := d.schedule(1.0), {"r": 6})
    assert d.load().running == 1 and out.num_tokens == 1
    d.reserve(Request("x", [1, 2, 3], SamplingParams(max_tokens=2), 0.0))
    d.abort("x")
    d.abort("r")
    assert d.load().idle and d.load().free_blocks == 16

    p = Scheduler(SchedulerConfig(max_model_len=32), BlockPool(16, 4))
    p.add_request(Request("h", list(range(10)), SamplingParams(max_tokens=1), 0.0, hold_kv=True))
    assert p.load().queued_prefill_tokens == 10 and p.load().waiting == 1
    p.update(out := p.schedule(0.0), {"h": 1})
    load = p.load()
    assert (load.held, load.waiting, load.running, load.queued_prefill_tokens) == (1, 0, 0, 0) and not load.idle
    p.release_held("h")
    assert p.load().idle


def test_queued_prefill_tokens_leave_out_a_waiting_prompts_cached_prefix():
    """The router compares a worker's queue with the prefix it would hit there: a waiting prompt whose
    first blocks are cached here owes only its uncached tail (counting the prefix sent prefix hits away)."""
    s = Scheduler(SchedulerConfig(max_model_len=64), BlockPool(32, 4))
    first = Request("a", list(range(12)), SamplingParams(max_tokens=1), 0.0)
    s.add_request(first)
    s.update(s.schedule(0.0), {"a": 1})  # computes and caches all three blocks of `a`, then finishes
    s.add_request(Request("b", list(range(12)) + [50, 51, 52], SamplingParams(max_tokens=1), 1.0))
    assert s.load().queued_prefill_tokens == 15 - 12
    s.add_request(Request("c", list(range(12)), SamplingParams(max_tokens=1), 1.0))
    # A prompt wholly cached still computes its last token (the step that samples): its last block is redone.
    assert s.load().queued_prefill_tokens == (15 - 12) + (12 - 8)
