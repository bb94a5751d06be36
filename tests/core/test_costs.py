"""CostModel: each term, the measurements it learns from, and the direction of the remote/local decision."""

import pytest

from splitserve.core.costs import CostModel
from splitserve.sim.hardware import gpu, network
from splitserve.sim.models import model
from splitserve.sim.perf import PerfModel

PER_TOK = 1e-4  # s per prompt token
KV = 100_000  # bytes per token
LAYERS = 10


def make(**kw) -> CostModel:
    args = dict(kv_bytes_per_token=KV, num_layers=LAYERS, link_bytes_per_s=10e9, prefill_s_per_token=PER_TOK,
                decode_step_s=0.02)
    args.update(kw)
    return CostModel(**args)


def decide(cm, prompt=2048, d_cached=0, p_cached=0, d_running=8, p_queued=0, d_queued=0):
    return cm.decide(prompt_tokens=prompt, decode_worker="d", decode_cached_tokens=d_cached,
                     decode_queued_tokens=d_queued, decode_running=d_running, prefill_worker="p",
                     prefill_cached_tokens=p_cached, prefill_queued_tokens=p_queued)


def test_terms_are_what_the_docstring_says():
    cm = make(remote_overhead_s=0.003, link_latency_s=1e-5)
    r = cm.remote("p", new_tokens=1000, queued_tokens=500, transfer_tokens=1000)
    x = 1e-5 + 1000 * KV / LAYERS / 10e9  # one layer's transfer
    assert r.terms == pytest.approx({"queue_s": 0.05, "prefill_s": 0.1, "overhead_s": 0.003, "transfer_s": x})
    assert r.ttft_s == pytest.approx(0.153) and r.ready_s == r.cost_s == pytest.approx(0.153 + x)
    loc = cm.local("d", new_tokens=1000, queued_tokens=500, running=4)
    assert loc.terms == pytest.approx({"queue_s": 0.01 + 0.05, "prefill_s": 0.1, "interference_s": 0.4})
    assert loc.ttft_s == loc.ready_s == pytest.approx(0.16) and loc.cost_s == pytest.approx(0.56)
    assert cm.local("d", 1000, 0, running=0).terms["queue_s"] == 0  # an idle worker starts at once


def test_a_decode_worker_that_caps_prompt_tokens_while_decoding_prefills_locally_over_several_steps():
    cm = make()
    cm.join_pool("d", "decode", chunk_while_decoding=32)
    # 1000 tokens in 32-token chunks: 32 steps, each also a 0.02 s decode step, where the first is counted.
    loc = cm.local("d", new_tokens=1000, queued_tokens=0, running=4)
    assert loc.terms["prefill_s"] == pytest.approx(0.1 + 31 * 0.02)
    assert cm.local("d", new_tokens=1000, queued_tokens=0, running=0).terms["prefill_s"] == pytest.approx(0.1)  # idle: whole
    assert cm.local("d", new_tokens=20, queued_tokens=0, running=4).terms["prefill_s"] == pytest.approx(20 * PER_TOK)
    # A long prompt the uncapped model would keep local goes remote once the chunks' steps are counted.
    uncapped = make()
    assert not decide(uncapped, prompt=1000, d_running=1, p_queued=5000).remote
    assert decide(cm, prompt=1000, d_running=1, p_queued=5000).remote


def test_pipelining_exposes_one_layer_when_the_link_keeps_up_and_the_whole_transfer_otherwise():
    whole = 2000 * KV / 10e9
    assert make(pipelined=False).transfer_s(2000, prefill_s=0.2) == pytest.approx(whole)
    assert make().transfer_s(2000, prefill_s=0.2) == pytest.approx(whole / LAYERS)
    # A link slower than the compute: the backlog grows layer by layer and most of it is exposed.
    slow = make(link_bytes_per_s=0.1e9)
    assert slow.transfer_s(2000, prefill_s=0.2) == pytest.approx(2.0 - 9 * 0.02)
    assert make().transfer_s(0, prefill_s=0.2) == 0


def test_measurements_replace_priors_per_worker():
    cm = make(alpha=0.5)
    assert cm.per_token_s("p") == PER_TOK and cm.prefill_s("p", 100) == pytest.approx(100 * PER_TOK)
    cm.observe_prefill("p", 2000, 0.4)
    assert cm.per_token_s("p") == pytest.approx(2e-4)  # one size measured: no intercept to tell apart
    assert cm.per_token_s("q") == PER_TOK
    cm.observe_decode_step("d", 0.05)
    assert cm.step_s("d") == pytest.approx(0.05)
    cm.forget("p")
    assert cm.per_token_s("p") == PER_TOK
    cm.observe_transfer(1e9, 1.0)  # the link turned out 10x slower than configured
    assert make(pipelined=False).transfer_s(1000, 0) * 10 == pytest.approx(cm.transfer_s(1000, 1e9) * LAYERS)


def test_prefill_fit_separates_per_step_overhead_from_per_token_cost():
    """Two identical workers, one serving long new prompts, one short follow-up suffixes: both fits find
    the same 20 ms + 2 ms/token line, where ratios through the origin would differ sevenfold."""
    line = lambda tokens: 0.02 + 2e-3 * tokens  # noqa: E731
    cm = make(alpha=0.2)
    for n in (400, 900, 300, 1200, 600) * 4:
        cm.observe_prefill("new", n, line(n))
    for n in (8, 30, 12, 50, 20) * 4:
        cm.observe_prefill("followups", n, line(n))
    for w in ("new", "followups"):
        assert cm.prefill_fit(w) == pytest.approx((0.02, 2e-3))
        assert cm.prefill_s(w, 100) == pytest.approx(line(100))
    assert cm.prefill_s("new", 0) == 0
    # A window of 3 steps counts as 3 samples of its mean step: the same line.
    cm.observe_prefill("new", 3 * 500, 3 * line(500), steps=3)
    assert cm.prefill_fit("new") == pytest.approx((0.02, 2e-3))


def test_prefill_fit_falls_back_to_the_ratio_when_the_intercept_would_be_negative():
    cm = make(alpha=0.5)
    cm.observe_prefill("p", 100, 0.1)
    cm.observe_prefill("p", 1000, 3.0)  # superlinear: the line would cross zero at a positive size
    fixed, per_tok = cm.prefill_fit("p")
    assert fixed == 0 and per_tok == pytest.approx((0.5 * 0.1 + 3.0) / (0.5 * 100 + 1000))


def test_short_uncached_suffix_prefills_locally():
    d = decide(make(), d_cached=2000)  # the decode worker holds all but 48 tokens
    assert not d.remote
    assert d.terms["remote.prefill_s"] > d.local_path.cost_s  # P would recompute the whole prompt


def test_saturated_prefill_pool_prefills_locally():
    d = decide(make(), p_queued=1_000_000)
    assert not d.remote and d.terms["remote.queue_s"] == pytest.approx(100.0)
    assert d.remote_path.cost_s > d.local_path.cost_s


def test_slow_link_prefills_locally():
    d = decide(make(link_bytes_per_s=1e7, pipelined=False))
    assert not d.remote and d.terms["remote.transfer_s"] > d.terms["local.interference_s"]


def test_long_uncached_prompt_on_fast_link_goes_remote_because_local_would_stall_the_batch():
    cm = make()
    d = decide(cm)
    assert d.remote and d.chosen is d.remote_path
    assert d.terms["local.interference_s"] == pytest.approx(8 * 2048 * PER_TOK)
    assert d.terms["remote.transfer_s"] < 0.01 * d.terms["local.interference_s"]
    # With half the prompt cached on D, the interference weight is what tips it: a deployment that ignores
    # others' stalls prefills the other half locally rather than recompute all of it on P.
    assert decide(make(), d_cached=1024).remote
    assert not decide(make(interference_weight=0.0), d_cached=1024).remote


def test_without_a_prefill_worker_the_decision_is_local():
    d = make().decide(prompt_tokens=100, decode_worker="d", decode_cached_tokens=0, decode_queued_tokens=0,
                      decode_running=3)
    assert not d.remote and d.remote_path is None and d.chosen is d.local_path


def test_from_perf_uses_the_roofline_model_and_decides_sensibly_for_llama_8b():
    perf = PerfModel(model("llama-3.1-8b"), gpu("h100"))
    cm = CostModel.from_perf(perf, network("rdma-400").instance_bandwidth(1))
    assert cm.prefill_s_per_token == pytest.approx(perf.prefill_time(2048) / 2048)
    assert cm.kv_bytes_per_token == 131072 and cm.num_layers == 32
    assert decide(cm, prompt=4096, d_running=32).remote
    assert not decide(cm, prompt=4096, d_cached=4064, d_running=32).remote
    assert not decide(CostModel.from_perf(perf, network("eth-25").instance_bandwidth(1), pipelined=False),
                      prompt=4096, d_running=1).remote


def test_alike_workers_share_their_pool_fit_and_an_unmeasured_pool_borrows_a_measured_one():
    cm = make()
    for w, pool in (("p0", "prefill"), ("p1", "prefill"), ("d0", "decode")):
        cm.join_pool(w, pool)
    cm.set_alike("prefill", True)
    cm.observe_prefill("p0", 1000, 0.01)  # 10k tokens/s, where the prior guessed 1/PER_TOK
    assert cm.per_token_s("p1") == cm.per_token_s("p0") == pytest.approx(1e-5)  # p1 never measured
    # The decode pool has measured nothing: a measured pool of the same model beats the configured prior.
    assert cm.per_token_s("d0") == pytest.approx(1e-5)


def test_an_idle_unlike_workers_own_estimate_decays_to_its_pools():
    cm = make(half_life_s=10.0)
    for w in ("p0", "p1"):
        cm.join_pool(w, "prefill")
    cm.set_alike("prefill", False)
    cm.observe_prefill("p0", 1000, 1.0, now=0.0)  # one slow reading (1 ms/token), never repeated
    for t in range(1, 20):
        cm.observe_prefill("p1", 1000, 0.1, now=float(t))  # 0.1 ms/token
    assert cm.per_token_s("p0", now=0.0) == pytest.approx(1e-3)
    pool = cm.pool_fit("prefill")[1]
    assert cm.per_token_s("p0", now=10.0) == pytest.approx(0.5 * 1e-3 + 0.5 * pool)
    # Idle long enough, it looks like its pool again, so it is tried (and measured) again.
    assert cm.per_token_s("p0", now=100.0) == pytest.approx(pool, rel=0.01)
