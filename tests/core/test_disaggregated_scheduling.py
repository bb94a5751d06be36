"""Both sides of a disaggregated request driven through the real Scheduler, with a fake model whose KV
slots hold token ids: the decode side only produces the reference tokens if exactly the right blocks
crossed over, and it reuses the prefix blocks it already holds."""

from splitserve.core.blocks import BlockPool
from splitserve.core.request import Request, RequestStatus, SamplingParams
from splitserve.core.scheduler import Scheduler, SchedulerConfig

from tests.core.test_scheduler import FakeModel, make, reference, run


def transfer(p_model, d_model, p_req, d_req, first_block, bs):
    for src, dst in zip(p_req.block_ids[first_block:], d_req.block_ids[first_block:]):
        for off in range(bs):
            if src * bs + off in p_model.slots:
                d_model.slots[dst * bs + off] = p_model.slots[src * bs + off]


def serve_split(p, d, p_model, d_model, prompt, n, rid):
    bs = p.pool.block_size
    d_req = make(rid, prompt, n)
    cached = d.reserve(d_req)
    assert cached is not None and d_req.status is RequestStatus.WAITING_FOR_KV
    p_req = Request(rid, prompt, SamplingParams(max_tokens=1, ignore_eos=True), 0.0, hold_kv=True)
    run(p, [p_req], p_model)
    assert p.load().held == 1 and p_req.block_ids, "prefill freed blocks still being sent"
    transfer(p_model, d_model, p_req, d_req, cached // bs, bs)
    p.release_held(rid)
    assert d.kv_arrived(rid, p_req.output_token_ids[0], now=1.0) is None
    while d.has_work():
        out = d.schedule(2.0)
        d.update(out, d_model.step(out))
    return d_req, cached


def test_split_output_equals_reference_and_prefix_is_not_sent_twice():
    p = Scheduler(SchedulerConfig(max_model_len=64), BlockPool(32, 4))
    d = Scheduler(SchedulerConfig(max_model_len=64), BlockPool(32, 4))
    pm, dm = FakeModel(p.pool), FakeModel(d.pool)
    prompt = list(range(3, 17))
    first, cached = serve_split(p, d, pm, dm, prompt, 6, "a")
    assert cached == 0 and first.output_token_ids == reference(prompt, 6)
    second, cached = serve_split(p, d, pm, dm, prompt + [1, 2], 5, "b")
    assert cached == 12  # three full blocks of the shared prefix were already on the decode worker
    assert second.output_token_ids == reference(prompt + [1, 2], 5)
    for s in (p, d):
        assert s.pool.num_free_blocks == s.pool.num_blocks and s.load().idle


def test_reservation_refused_when_blocks_are_short_and_abort_releases_everything():
    d = Scheduler(SchedulerConfig(max_model_len=16), BlockPool(6, 4))
    a = make("a", list(range(12)), 2)
    assert d.reserve(a) == 0
    assert d.reserve(make("b", list(range(20, 33)), 2)) is None
    assert d.pool.num_free_blocks == 3
    d.abort("a")
    assert d.pool.num_free_blocks == 6
    p = Scheduler(SchedulerConfig(max_model_len=16), BlockPool(6, 4))
    held = Request("h", [1, 2, 3, 4, 5], SamplingParams(max_tokens=1), 0.0, hold_kv=True)
    run(p, [held])
    assert p.pool.num_free_blocks == 4
    assert p.abort("h") is held and p.pool.num_free_blocks == 6


def test_first_token_can_finish_the_request_and_failed_transfer_recomputes():
    d = Scheduler(SchedulerConfig(max_model_len=32), BlockPool(16, 4))
    one = make("one", [1, 2, 3], 1)
    d.reserve(one)
    assert d.kv_arrived("one", 42, now=0.0) is one and one.status is RequestStatus.FINISHED_LENGTH
    # A transfer that fails after the first token was streamed: drop the reservation, recompute locally.
    prompt = [5, 6, 7, 8, 9]
    r = make("r", prompt, 4)
    d.reserve(r)
    d.abort("r")
    first = reference(prompt, 1)[0]
    again = make("r", prompt, 4)
    again.output_token_ids = [first]
    run(d, [again])
    assert again.output_token_ids == reference(prompt, 4)
    assert d.pool.num_free_blocks == d.pool.num_blocks


def test_ready_requests_that_fill_the_pool_do_not_wedge_it():
    # Prompts of whole blocks: each ready request needs one more block for its first decode step. With the
    # pool full of them and nothing running, no block would free (a live 300-stream test hung this way):
    # one goes back to be recomputed here, and every request still gives the reference tokens.
    d = Scheduler(SchedulerConfig(max_model_len=16), BlockPool(6, 4))
    dm = FakeModel(d.pool)
    prompts = {"a": list(range(1, 9)), "b": list(range(20, 28)), "c": list(range(40, 48))}  # 2 blocks each
    reqs = {rid: make(rid, prompt, 3) for rid, prompt in prompts.items()}
    for rid, r in reqs.items():
        assert d.reserve(r) == 0
    assert d.pool.num_free_blocks == 0
    for rid, r in reqs.items():
        for pos, t in enumerate(prompts[rid]):  # the KV a prefill worker would have sent
            dm.slots[r.block_ids[pos // 4] * 4 + pos % 4] = t
        assert d.kv_arrived(rid, reference(prompts[rid], 1)[0], now=0.0) is None
    steps = 0
    while d.has_work():
        out = d.schedule(float(steps))
        d.update(out, dm.step(out))
        steps += 1
        assert steps < 1000, "the decode worker wedged"
    assert {rid: r.output_token_ids for rid, r in reqs.items()} == {rid: reference(p, 3) for rid, p in prompts.items()}
    assert d.pool.num_free_blocks == 6 and d.load().idle
