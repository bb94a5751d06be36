"""The seed's claims, computed by the simulator: disaggregation's advantage shrinks and turns into a loss as
prompts get short, as the link slows (long prompts, no pipelining, 25 GbE), as the cluster shrinks and as
the prefix hit rate rises. Only directions are asserted; the numbers come from the planner's search."""

from dataclasses import replace
from functools import lru_cache

import pytest

from splitserve.workload.slo import SLO
from splitserve.plan.search import plan
from splitserve.plan.spec import PlanSpec, WorkloadDef
from splitserve.plan.sweep import point_spec
from splitserve.sim import hardware, models
from splitserve.workload.requests import LengthDist, SyntheticSpec

# Llama-3.1-70B on 16 H100s, 4k-token prompts and 128-token answers, TTFT 2 s and TPOT 50 ms: prompt-heavy
# traffic at scale. Small probes and one tensor-parallel size keep each search to a few seconds.
BASE = PlanSpec(
    models.model("llama-3.1-70b"), hardware.gpu("h100"), hardware.network("rdma-400"),
    WorkloadDef(synthetic=SyntheticSpec(rate=1, input=LengthDist("fixed", 4096), output=LengthDist("fixed", 128), num_requests=100),
                num_requests=100),
    SLO(2.0, 0.05), gpus=16, tp_options=(4,), chunk_options=(512,), top_k=2, max_requests=1000, jobs=2,
)


@lru_cache(maxsize=None)
def advantage(axis: str, value: str, pipelined: bool = True) -> tuple[str, float]:
    spec, _ = point_spec(replace(BASE, pipelined=pipelined), axis, value)
    r = plan(spec)
    assert r.colocated is not None
    return r.verdict, (r.disaggregated.rps_per_gpu / r.colocated.rps_per_gpu if r.disaggregated else 0.0)


def test_long_prompts_on_a_fast_link_at_scale_disaggregate():
    verdict, adv = advantage("prompt-length", "4096")
    assert verdict == "disaggregate" and adv > 1.05


def test_short_prompts_turn_it_into_a_loss():
    short_verdict, short = advantage("prompt-length", "256")
    assert short_verdict == "colocate" and short < 1 < advantage("prompt-length", "4096")[1]


def test_a_slow_unpipelined_link_turns_it_into_a_loss():
    fast_verdict, fast = advantage("bandwidth", "rdma-400", pipelined=False)
    slow_verdict, slow = advantage("bandwidth", "eth-25", pipelined=False)
    assert fast_verdict == "disaggregate" and slow_verdict == "colocate"
    assert slow < 1 < fast


def test_a_small_cluster_turns_it_into_a_loss():
    small_verdict, small = advantage("cluster-size", "8")
    assert small_verdict == "colocate" and small < 1 < advantage("cluster-size", "16")[1]
    assert advantage("cluster-size", "4") == ("colocate", 0.0)  # TP4 prefill + TP4 decode does not even fit


def test_mostly_cached_prefixes_turn_it_into_a_loss():
    cached_verdict, cached = advantage("prefix-hit-rate", "0.95")
    assert cached_verdict == "colocate" and cached < 1 < advantage("prefix-hit-rate", "0")[1]


@pytest.mark.parametrize("axis, value", [("prompt-length", "4096"), ("cluster-size", "16"), ("prefix-hit-rate", "0")])
def test_the_base_point_is_the_same_plan_on_every_axis(axis, value):
    assert advantage(axis, value) == advantage("prompt-length", "4096")
