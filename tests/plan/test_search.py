"""Planner pieces: candidate enumeration, the closed-form screen, the goodput search, the target-rate mode."""

import math

import pytest

from splitserve.workload.slo import SLO
from splitserve.plan import estimate as est
from splitserve.plan.candidates import enumerate_candidates, shortlist
from splitserve.plan.evaluate import Probe, goodput_bracket
from splitserve.plan.search import plan
from splitserve.plan.spec import PlanError, PlanSpec, WorkloadDef
from splitserve.sim import hardware, models
from splitserve.sim.perf import PerfModel
from splitserve.workload.goodput import search_goodput
from splitserve.workload.requests import LengthDist, RequestSpec, SyntheticSpec

H100 = hardware.gpu("h100")


def spec(**kw) -> PlanSpec:
    wl = WorkloadDef(synthetic=SyntheticSpec(rate=1, input=LengthDist("fixed", 1024), output=LengthDist("fixed", 32), num_requests=60),
                     num_requests=60)
    base = dict(model=models.model("llama-3.1-8b"), hardware=H100, network=hardware.network("rdma-400"), workload=wl,
                slo=SLO(1.0, 0.04), gpus=8, tp_options=(1, 2), chunk_options=(512,), top_k=2, max_requests=800, jobs=1)
    base.update(kw)
    return PlanSpec(**base)


def test_candidates_fit_the_cluster_and_each_mode_is_shortlisted():
    s = spec()
    traffic = est.Traffic.of(s.workload.at(1.0).requests)
    cands = enumerate_candidates(s, traffic, 2048)
    assert all(c.unit.gpus * c.copies <= 8 for c in cands)
    assert {c.mode for c in cands} == {"colocated", "disaggregated"}
    assert {p.tp for c in cands for p in c.unit.pools} == {1, 2}
    for mode in ("colocated", "disaggregated"):
        short = shortlist(s, cands, mode)
        assert len(short) == 2 and all(c.mode == mode for c in short)
        assert len({tuple(p.tp for p in c.unit.pools) for c in short}) == 2  # different shapes first


def test_traffic_sees_the_prefix_hit_rate():
    reqs = [RequestSpec(0.0, 100, 4, (1, 2, 3, 4), 25), RequestSpec(0.0, 100, 4, (1, 2, 3, 9), 25), RequestSpec(0.0, 100, 4, (5,), 25)]
    t = est.Traffic.of(reqs)
    assert t.hit_rate == pytest.approx(75 / 300)
    assert t.mean_input == 100 and t.uncached_input == pytest.approx(75)


def test_the_screen_finds_the_binding_constraint():
    t = est.Traffic(4096, 256, 0.0)
    pm = PerfModel(models.model("llama-3.1-70b"), H100, 4)
    assert est.decode_worker(pm, t, SLO(2, 0.05), 256, 0.0).binding.startswith("KV cache memory")
    assert est.decode_worker(pm, t, SLO(2, 0.021), 256, 0.0).binding.startswith("TPOT")
    link = hardware.network("eth-25").instance_bandwidth(4)
    assert est.prefill_worker(pm, t, SLO(2, 0.05), link).binding.startswith("network")
    assert est.prefill_worker(pm, t, SLO(0.2, 0.05), 1e12).rate == 0.0


def test_the_goodput_search_brackets_the_guess_and_bisects():
    true = 7.3

    def measure(rate):
        return Probe(rate, 1.0 if rate <= true else 0.5, 0.0, 0.0, False, passed=rate <= true)

    def passed(p):
        return p.passed

    for guess in (0.5, 7.0, 40.0):
        found = search_goodput(measure, passed, goodput_bracket(guess, 0.03))
        assert true * 0.96 <= found.lower <= true, (guess, found)
        assert len(found.probes) <= 14
    assert search_goodput(lambda r: Probe(r, 0.0, 1.0, 0.0, True), passed, goodput_bracket(1.0, 0.05)).lower == 0.0
    # From a probe that already passed (branch and bound): the bracket starts at it and only goes up.
    done = Probe(5.0, 1.0, 0.0, 0.0, False, passed=True)
    found = search_goodput(measure, passed, goodput_bracket(6.0, 0.03, done))
    assert found.probes[0].rate == 5.0 and min(p.rate for p in found.probes) == 5.0
    assert true * 0.96 <= found.lower <= true


def test_a_target_rate_asks_for_more_gpus_when_it_grows():
    small = plan(spec(gpus=None, rate=10.0, top_k=1))
    big = plan(spec(gpus=None, rate=100.0, top_k=1))
    for mode in ("colocated", "disaggregated"):
        a, b = getattr(small, mode), getattr(big, mode)
        assert a is not None and b is not None
        assert b.gpus >= a.gpus
        assert b.goodput_rps == pytest.approx(100.0, rel=0.01)  # reported at the asked rate
        assert b.metrics["ttft"]["p90"] <= 1.0 * 1.2
    assert big.colocated.gpus > small.colocated.gpus
    assert "at 100 req/s disaggregated needs" in big.reasons[0]


def test_bad_plan_inputs():
    with pytest.raises(PlanError, match="--gpus N"):
        spec(gpus=None)
    with pytest.raises(PlanError, match="both --slo-ttft and --slo-tpot"):
        spec(slo=SLO(1.0, None))
    with pytest.raises(PlanError, match="impossible"):
        plan(spec(slo=SLO(0.005, 0.04)))


def test_cost_and_per_gpu_numbers_are_consistent():
    r = plan(spec(gpu_hour_cost=2.0))
    for m in (r.colocated, r.disaggregated):
        assert m.rps_per_gpu == pytest.approx(m.goodput_rps / m.gpus)
        tokens_per_hour = m.tokens_per_s_per_gpu * 3600
        assert m.cost_per_m_tokens == pytest.approx(2.0 / tokens_per_hour * 1e6)
    assert r.verdict in ("colocate", "disaggregate") and r.reasons
    assert math.isfinite(r.advantage)
