"""Router: each policy's choice, conditional disaggregation, membership, and the admission queue."""

import pytest

from splitserve.core.blocks import BlockPool, hash_blocks
from splitserve.core.costs import CostModel
from splitserve.core.kv_manager import KVCacheManager
from splitserve.core.request import Request, SamplingParams
from splitserve.core.router import NoWorker, Router

BS = 4
PER_TOK = 1e-4


def costs(**kw) -> CostModel:
    args = dict(kv_bytes_per_token=1000, num_layers=4, link_bytes_per_s=1e10, prefill_s_per_token=PER_TOK,
                decode_step_s=0.01)
    args.update(kw)
    return CostModel(**args)


def router(policy="kv_aware", prefill=("p0", "p1"), decode=("d0", "d1"), blocks=1000, **kw) -> Router:
    r = Router(policy, BS, costs(), **kw)
    for w in prefill:
        r.register(w, "prefill", 1, blocks)
    for w in decode:
        r.register(w, "decode", 1, blocks)
    return r


def cache(r: Router, worker, tokens, generation=1):
    """Make `worker` report every full block of `tokens` as cached."""
    seq = r.index.position(worker)[1] + 1
    r.resync(worker, generation, seq, set(r.index.cached(worker)) | set(hash_blocks(tokens, BS)))


PROMPT = list(range(1000, 1256))  # 64 blocks


def test_round_robin_cycles_each_pool():
    r = router("round_robin", prefill=("p0", "p1"), decode=("d0", "d1", "d2"), conditional=False)
    got = [r.route_tokens(PROMPT, now=0.0) for _ in range(6)]
    assert [g.decode for g in got] == ["d0", "d1", "d2", "d0", "d1", "d2"]
    assert [g.prefill for g in got] == ["p0", "p1", "p0", "p1", "p0", "p1"]


def test_least_loaded_picks_the_lightest_reported_worker_and_spreads_a_burst():
    r = router("least_loaded", conditional=False)
    r.update_load("d0", free_blocks=500, running=9, queued_prefill_tokens=0, now=0.0)
    r.update_load("d1", free_blocks=100, running=2, queued_prefill_tokens=0, now=0.0)
    r.update_load("p0", free_blocks=1000, running=0, queued_prefill_tokens=5000, now=0.0)
    got = r.route_tokens(PROMPT, now=0.0)
    assert (got.decode, got.prefill) == ("d1", "p1")
    # Between two reports the router counts what it sent itself: d1 fills up to d0's 9, then they alternate.
    decodes = [r.route_tokens(PROMPT, now=0.0).decode for _ in range(10)]
    assert decodes[:6] == ["d1"] * 6 and sorted(decodes[6:]) == ["d0", "d0", "d1", "d1"]


def test_kv_aware_prefers_the_longest_cached_prefix_until_its_queue_outweighs_it():
    r = router(conditional=False)
    cache(r, "p0", PROMPT[:240])  # 60 of the 64 blocks
    assert r.route_tokens(PROMPT, now=0.0).prefill == "p0"
    # p0 saves 240 tokens of compute: a queue of that much more work is where the preference flips.
    for queued, expect in ((239, "p0"), (241, "p1")):
        r.update_load("p0", free_blocks=1000, running=0, queued_prefill_tokens=queued, now=1.0)
        r.update_load("p1", free_blocks=1000, running=0, queued_prefill_tokens=0, now=1.0)
        assert r.route_tokens(PROMPT, now=1.0).prefill == expect


def test_alike_workers_share_one_speed_and_new_prompts_go_where_the_cache_is_under_less_pressure():
    r = router(conditional=False)
    r.observe_prefill("p0", 1000, 1000 * PER_TOK)
    r.observe_prefill("p1", 1000, 1.3 * 1000 * PER_TOK)  # noise: p1 looked 30 % slower once
    assert r.costs.per_token_s("p0") == r.costs.per_token_s("p1")  # alike (same capacity): one pool-wide fit
    first = r.route_tokens(PROMPT, now=0.0).prefill
    for w in ("p0", "p1"):  # both finished
        r.update_load(w, free_blocks=1000, running=0, queued_prefill_tokens=0, now=0.0)
    # The first worker took 64 new blocks into its cache: the next new conversation goes to the other one,
    # whatever either cache already holds.
    cache(r, "p1" if first == "p0" else "p0", list(range(5000, 9000)))
    second = r.route_tokens(list(range(7000, 7256)), now=0.0).prefill
    assert {first, second} == {"p0", "p1"}
    assert r.pressure(first) < r.pressure(second)  # the older 64 blocks decayed by the newer ones


def test_unlike_workers_keep_their_own_speed_and_the_cheaper_one_wins():
    r = router(prefill=(), conditional=False)
    r.register("p0", "prefill", 1, 1000)
    r.register("p1", "prefill", 1, 4000)  # another accelerator: its own fit
    r.observe_prefill("p0", 1000, 0.5 * 1000 * PER_TOK)
    r.observe_prefill("p1", 1000, 1000 * PER_TOK)
    assert r.costs.per_token_s("p0") < 0.8 * r.costs.per_token_s("p1")
    cache(r, "p0", list(range(8000, 12000)))
    assert r.route_tokens(list(range(9000, 9256)), now=0.0).prefill == "p0"


def test_overlap_weight_sets_how_much_a_cached_block_is_worth():
    for weight, expect in ((0.0, "p1"), (1.0, "p0")):
        r = router(conditional=False, overlap_weight=weight)
        cache(r, "p0", PROMPT)
        r.update_load("p0", free_blocks=1000, running=0, queued_prefill_tokens=100, now=0.0)
        assert r.route_tokens(PROMPT, now=0.0).prefill == expect


def test_kv_aware_prefers_its_prefix_on_decode_and_skips_workers_without_room():
    r = router(conditional=False)
    cache(r, "d0", PROMPT)
    got = r.route_tokens(PROMPT + [1, 2], now=0.0)
    assert got.decode == "d0" and got.decode_cached_blocks == 64 and got.num_blocks == 65
    r = router(conditional=False)
    cache(r, "d0", PROMPT)
    r.update_load("d0", free_blocks=0, running=1, queued_prefill_tokens=0, now=0.0)  # no room for the suffix
    assert r.route_tokens(PROMPT + [1, 2], now=0.0).decode == "d1"


def test_cached_blocks_are_counted_as_the_worker_scheduler_will_reuse_them():
    pool = BlockPool(100, BS)
    kv = KVCacheManager(pool)
    warm = Request("warm", PROMPT, SamplingParams(), 0.0)
    kv.allocate(warm, len(PROMPT))
    warm.num_computed_tokens = len(PROMPT)
    kv.publish(warm)
    r = router(decode=("d0",), conditional=False)
    assert r.on_events("d0", 1, pool.drain_events(), last_seq=pool.event_seq)
    for prompt in (PROMPT, PROMPT[:-1], PROMPT + [7], PROMPT[:9]):
        real = len(kv.prefix_hit(Request("q", prompt, SamplingParams(), 0.0)))
        assert r.route_tokens(prompt, now=0.0).decode_cached_blocks == real
    assert real == 2 and len(kv.prefix_hit(Request("q", PROMPT, SamplingParams(), 0.0))) == 63  # one token left


def test_conditional_disaggregation_keeps_a_short_suffix_local_and_sends_a_long_prompt_remote():
    r = router()
    cache(r, "d0", PROMPT)
    r.update_load("d0", free_blocks=900, running=8, queued_prefill_tokens=0, now=0.0)
    r.update_load("d1", free_blocks=10, running=60, queued_prefill_tokens=0, now=0.0)
    short = r.route_tokens(PROMPT + [1, 2, 3], now=0.0)
    assert short.decode == "d0" and short.prefill is None and not short.decision.remote
    assert short.prefill_cached_blocks == 0
    long = r.route_tokens(list(range(5000, 9000)), now=0.0)
    assert long.prefill is not None and long.decision.remote
    assert long.decision.remote_path.cost_s < long.decision.local_path.cost_s


def test_a_burst_of_remote_prefills_does_not_pile_up_forever_in_the_routers_estimate():
    r = router(prefill=("p0",))
    for d in ("d0", "d1"):  # batches so big that every prompt goes remote, however long p0's queue
        r.update_load(d, free_blocks=1000, running=500, queued_prefill_tokens=0, now=0.0)
    long = list(range(5000, 7000))
    for _ in range(20):
        r.route_tokens(long, now=0.0)
    backlog = 20 * len(long) * PER_TOK
    assert r.route_tokens(long, now=0.0).decision.terms["remote.queue_s"] == pytest.approx(backlog)
    # A second later p0 has worked off a second of it at its measured speed.
    later = r.route_tokens(long, now=1.0).decision.terms["remote.queue_s"]
    assert later == pytest.approx(backlog + len(long) * PER_TOK - 1.0)


def test_an_empty_pool_degrades_the_deployment_instead_of_failing_it():
    # No prefill worker: the decode worker prefills, conditional placement or not.
    for conditional in (True, False):
        d = router(prefill=(), conditional=conditional).route_tokens(PROMPT, now=0.0)
        assert d.prefill is None and d.decode in ("d0", "d1")
    # No decode worker: a prefill worker computes the request whole.
    d = router(decode=()).route_tokens(PROMPT, now=0.0)
    assert d.prefill is None and d.decode in ("p0", "p1")
    with pytest.raises(NoWorker, match="no colocated, decode or prefill worker"):
        router(prefill=(), decode=()).route_tokens(PROMPT, now=0.0)


@pytest.mark.parametrize("policy", ["round_robin", "least_loaded", "kv_aware"])
def test_deregistered_and_draining_workers_get_nothing(policy):
    r = router(policy, prefill=("p0", "p1", "p2"), decode=("d0", "d1", "d2"), conditional=False)
    cache(r, "p1", PROMPT)
    cache(r, "d1", PROMPT)
    r.deregister("p1")
    r.drain("d1")
    r.deregister("d2")
    for _ in range(6):
        got = r.route_tokens(PROMPT, now=0.0)
        assert got.prefill in ("p0", "p2") and got.decode == "d0"
    assert r.on_events("p1", 1, []) and r.index.position("p1") is None  # its late events are dropped


def test_a_restart_forgets_the_old_generations_cache_and_measurements():
    r = router(decode=("d0",))
    cache(r, "p0", PROMPT)
    r.observe_prefill("p0", 1000, 1.0)
    r.register("p0", "prefill", 2, 1000)
    # The cache is gone; the speed its pool measured still stands (the same accelerator came back).
    assert r.index.cached("p0") == frozenset() and r.costs.per_token_s("p0") == r.costs.per_token_s("p1") == 1e-3
    r.register("p0", "prefill", 1, 1000)  # a late registration of the dead process changes nothing
    assert r.index.position("p0") == (2, 0)


def test_unknown_policy_and_negative_tolerance_are_refused():
    with pytest.raises(ValueError, match="kv_aware"):
        Router("random", BS, costs())
    with pytest.raises(ValueError, match="cost_tolerance"):
        Router("kv_aware", BS, costs(), cost_tolerance=-0.1)


def test_a_request_computed_whole_goes_to_a_decode_worker_even_without_conditional_placement():
    """A recompute after a failed split: placed by the same policies, never on a prefill worker."""
    r = router(conditional=False)
    cache(r, "d1", PROMPT)
    d = r.route_tokens(PROMPT, now=0.0, whole=True)
    assert d.prefill is None and d.decode == "d1"  # kv_aware: where the prompt is cached
    assert router(prefill=(), conditional=False).route_tokens(PROMPT, now=0.0, whole=True).prefill is None
