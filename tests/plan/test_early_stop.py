"""A probe that stops early gives the verdict its full run would have given (issue 18's search speed): the
search's probes stop once the tail rule is certain to fail, the steady-state probes once that rule is, and
neither may ever turn a pass into a fail or the other way round, at any load."""

from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from splitserve.plan import estimate as est
from splitserve.plan.candidates import enumerate_candidates
from splitserve.plan.evaluate import run_probe
from splitserve.plan.spec import PlanSpec, WorkloadDef
from splitserve.sim import hardware, models
from splitserve.workload.requests import LengthDist, SyntheticSpec
from splitserve.workload.slo import SLO

H100 = hardware.gpu("h100")
LLAMA_8B = models.model("llama-3.1-8b")


def spec(seed: int, isl: int = 1024, osl: int = 64, ttft: float = 0.5, tpot: float = 0.02) -> PlanSpec:
    wl = WorkloadDef(synthetic=SyntheticSpec(rate=1, input=LengthDist("lognormal", isl), output=LengthDist("lognormal", osl),
                                             num_requests=80, seed=seed), num_requests=80)
    s = PlanSpec(model=LLAMA_8B, hardware=H100, network=hardware.network("rdma-400"), workload=wl, slo=SLO(ttft, tpot),
                 gpus=4, tp_options=(1,), chunk_options=(512,), max_num_seqs=32, max_requests=240, jobs=1)
    return replace(s, mean_output=float(osl))


def unit(s: PlanSpec, mode: str):
    cands = enumerate_candidates(s, est.Traffic.of(s.workload.at(1.0).requests), 4 * 1024 + 4 * 64)
    c = next(c for c in cands if c.mode == mode and c.unit.gpus <= 2 and c.estimate > 0)
    return c.unit, c.estimate


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), load=st.floats(0.3, 4.0), mode=st.sampled_from(["colocated", "disaggregated"]),
       ttft=st.sampled_from([0.2, 0.5, 2.0]), tpot=st.sampled_from([0.01, 0.02, 0.05]))
def test_a_probe_stopped_early_gives_the_full_runs_verdict(seed, load, mode, ttft, tpot):
    s = spec(seed, ttft=ttft, tpot=tpot)
    u, guess = unit(s, mode)
    rate = load * guess
    full, tail, steady = (run_probe(s, u, rate, stop) for stop in ("none", "tail", "steady"))
    assert not full.stopped_early
    assert tail.passed == full.passed
    assert steady.steady == full.steady
    for p in (tail, steady):  # a run that was not stopped is the full run
        if not p.stopped_early:
            assert (p.attainment, p.growth, p.passed, p.steady) == (full.attainment, full.growth, full.passed, full.steady)


def test_both_stops_save_work_on_an_overloaded_unit():
    """Not vacuous: far above its capacity a unit's probes do stop, the tail one on its misses, the
    steady one on its mean TTFT (a queue that keeps growing), both before the full run's end."""
    s = spec(1, ttft=0.5, tpot=0.05)
    u, guess = unit(s, "colocated")
    full, tail, steady = (run_probe(s, u, 4 * guess, stop) for stop in ("none", "tail", "steady"))
    assert not full.passed and not full.steady
    assert tail.stopped_early and steady.stopped_early
    assert tail.metrics is None and steady.metrics is None and full.metrics is not None
