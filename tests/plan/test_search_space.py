"""The search covers what the field deploys (issue 18): chunked colocated units are scored by the steps that
really carry a chunk and always simulated, every P:D ratio the cluster allows is a candidate, and GPUs a
configuration leaves idle count against it."""

import math
from dataclasses import replace

import pytest

from splitserve.plan import estimate as est
from splitserve.plan.candidates import Candidate, cluster_cost, enumerate_candidates, score, shortlist
from splitserve.plan.evaluate import run_probe
from splitserve.plan.search import plan
from splitserve.plan.spec import PlanSpec, WorkloadDef
from splitserve.sim import hardware, models
from splitserve.sim.perf import PerfModel
from splitserve.workload.requests import LengthDist, SyntheticSpec
from splitserve.workload.slo import SLO

H100 = hardware.gpu("h100")
LLAMA_8B = models.model("llama-3.1-8b")


def spec(isl: int = 2048, osl: int = 64, tpot: float = 0.02, **kw) -> PlanSpec:
    wl = WorkloadDef(synthetic=SyntheticSpec(rate=1, input=LengthDist("fixed", isl), output=LengthDist("fixed", osl),
                                             num_requests=60), num_requests=60)
    base = dict(model=LLAMA_8B, hardware=H100, network=hardware.network("rdma-400"), workload=wl, slo=SLO(1.0, tpot),
                gpus=1, tp_options=(1,), chunk_options=(512,), top_k=1, max_requests=600, jobs=1)
    base.update(kw)
    return PlanSpec(**base)


def test_a_chunked_estimate_counts_only_the_steps_that_carry_a_chunk():
    pm = PerfModel(LLAMA_8B, H100, 1)
    t = est.Traffic(2048, 256, 0.0)
    slo = SLO(1.0, 0.015)
    # A step with a full 512-token chunk is slower than the TPOT target (with its margin)...
    assert pm.mixed_step_time(1, 2100, 512, 1024) > slo.tpot_s * est.TPOT_MARGIN
    # ...but only the steps while a prompt is pending carry one: the unit is feasible, and beats whole prompts.
    chunked, whole = est.colocated(pm, t, slo, 256, 512), est.colocated(pm, t, slo, 256, None)
    assert chunked.rate > whole.rate > 0


def test_the_best_chunked_and_unchunked_colocated_units_are_always_shortlisted():
    s = spec(gpus=8, tp_options=(1, 2), chunk_options=(512, 2048), top_k=1)
    cands = enumerate_candidates(s, est.Traffic.of(s.workload.at(1.0).requests), 2200)
    short = shortlist(s, cands, "colocated")
    assert {c.unit.pools[0].chunked_prefill for c in short} == {True, False}


def test_a_chunked_unit_better_than_every_unchunked_one_is_found():
    result = plan(spec())
    assert result.colocated is not None and result.colocated.pools[0]["chunk"] == 512
    rows = [r for r in result.candidates if r["mode"] == "colocated"]
    chunked = [r["goodput_rps"] for r in rows if "chunked" in r["config"]]
    whole = [r["goodput_rps"] or 0.0 for r in rows if "chunked" not in r["config"]]
    assert chunked and whole and max(chunked) > max(whole)
    # Beside the tail rule's verdict, the steady-state rule's figure (means within the targets): never lower.
    assert result.colocated.steady_goodput_rps >= result.colocated.goodput_rps
    assert any(r.startswith("pass rule: 90% of requests") and "steady state" in r for r in result.reasons)


def test_every_pd_ratio_in_lowest_terms_that_fits_the_cluster_is_a_candidate():
    s = spec(gpus=16, tp_options=(1,))
    cands = enumerate_candidates(s, est.Traffic.of(s.workload.at(1.0).requests), 2200)
    ratios = {(c.unit.pools[0].count, c.unit.pools[1].count) for c in cands if c.mode == "disaggregated"}
    assert {(5, 3), (10, 3), (6, 1), (1, 15), (15, 1)} <= ratios  # beyond a 4-worker cap's 1:3 ... 3:1
    assert (2, 2) not in ratios and all(x + y <= 16 for x, y in ratios)  # 2:2 is two copies of 1:1


def test_idle_gpus_count_against_a_configuration():
    s = spec(gpus=16, tp_options=(1,))
    cands = enumerate_candidates(s, est.Traffic.of(s.workload.at(1.0).requests), 2200)
    seven_three = next(c for c in cands if c.mode == "disaggregated" and (c.unit.pools[0].count, c.unit.pools[1].count) == (7, 3))
    assert seven_three.copies == 1 and seven_three.unit.gpus == 10  # 6 of the 16 GPUs idle
    per_gpu = s.price(H100)
    assert cluster_cost(s, seven_three) == pytest.approx(16 * per_gpu)  # the idle GPUs are paid for too
    # The same goodput per GPU used (1 req/s) is worth 10/16 of it per GPU of the cluster.
    colocated = Candidate("colocated", next(c for c in cands if c.mode == "colocated").unit, 16, 1.0, "")
    assert score(s, seven_three, 10.0) == pytest.approx(10 / 16 * score(s, colocated, 1.0))


def test_the_decode_capacity_bound_is_never_below_what_a_unit_sustains():
    """A unit is pruned without simulating it when the rate it needs to beat its mode's best exceeds this
    bound: the bound must hold in simulation (a probe above it overloads: its queue grows, with any TPOT) and be tight
    enough to prune (a probe at 3/4 of it keeps up). Long outputs, short prompts: decode is the limit."""
    s = spec(isl=256, osl=256, slo=SLO(2.0, 1.0), max_num_seqs=64, max_requests=800)
    s = replace(s, mean_output=256.0)
    cands = enumerate_candidates(s, est.Traffic.of(s.workload.at(1.0).requests), 600)
    unit = next(c for c in cands if c.mode == "colocated" and not c.unit.pools[0].chunked_prefill)
    assert 0 < unit.capacity < math.inf
    above, below = run_probe(s, unit.unit, 1.1 * unit.capacity), run_probe(s, unit.unit, 0.75 * unit.capacity)
    assert not above.passed and below.passed
