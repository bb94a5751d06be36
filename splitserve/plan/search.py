"""The planner: the best colocated and the best disaggregated configuration, by simulation, and the verdict.

Search (fixed cluster of N GPUs):
1. Enumerate units. Colocated: one replica of tensor parallel size tp (with or without chunked prefill, a
   few chunk sizes). Disaggregated: x prefill workers of TP p and y decode workers of TP d for every ratio
   x:y in lowest terms with x p + y d <= N (`pd_ratios`). A cluster is as many copies of its unit as N holds,
   the GPUs left over idle and counted (`cluster_cost`): each copy
   is simulated alone on its share of the traffic (a random split of Poisson arrivals is Poisson), which
   keeps simulations small. Every probe lasts several request lifetimes so that batches fill up, and is
   judged past its warm-up.
2. Screen every unit with the closed-form estimate (`estimate.py`); keep the `top_k` best of each mode,
   and the best chunked and unchunked colocated unit whatever their rank.
3. Simulate each kept unit on the real Scheduler and search its goodput: the highest request rate at which
   at least `attainment` of the requests meet both TTFT and TPOT (bench's `attainment`) and waiting does not
   keep growing (overload), bracketed around the estimate and bisected to `resolution`. Within a mode,
   later candidates are first probed at the rate they need to beat the best so far (branch and bound).
4. Compare goodput per GPU of the cluster; the verdict says which mode wins and why (which SLO fails first above the
   goodput, where the time goes, utilisation of each pool, the transfer's share).
With a target rate instead (`rate`), each unit needs ceil(rate / its goodput) copies: the fewest GPUs wins.

Limits: with a target rate and no cluster size, a unit has at most `max_unit_gpus` GPUs; copies are
independent (no cross-unit balancing);
tensor parallelism stays within a node (tp <= gpus per node).
"""

from __future__ import annotations

import time
from dataclasses import asdict, replace
from typing import Callable

from splitserve.plan import estimate as est
from splitserve.plan.candidates import enumerate_candidates, score, shortlist
from splitserve.plan.evaluate import Evaluated, evaluate_all
from splitserve.plan.spec import (
    MODES,
    PlanError,
    PlanSpec,
    auto_block_size,
    check_context,
    check_slo,
)
from splitserve.plan.verdict import PlanResult, cost_report, mode_result, verdict


def plan(spec: PlanSpec, progress: Callable[[str], None] | None = None) -> PlanResult:
    t0 = time.perf_counter()
    say = progress or (lambda _msg: None)
    sample = spec.workload.at(1.0).requests
    if not sample:
        raise PlanError("the workload has no requests")
    traffic = est.Traffic.of(sample)
    spec = replace(spec, mean_output=traffic.mean_output, block_size=spec.block_size or auto_block_size(traffic.mean_input))
    lengths = [r.input_len + r.output_len for r in spec.workload.at(1.0, spec.max_requests).requests]
    check_context(spec, lengths)
    longest = max(lengths) + 1
    check_slo(spec, traffic, longest)
    cands = enumerate_candidates(spec, traffic, longest)
    short = {mode: shortlist(spec, cands, mode) for mode in MODES}
    todo = [c for mode in MODES for c in short[mode]]
    say(f"screened {len(cands)} configurations; simulating {len(todo)}")
    evals = evaluate_all(spec, todo)
    best: dict[str, Evaluated | None] = {}
    for mode in MODES:
        mine = [e for e in evals if e.candidate.mode == mode]
        mine.sort(key=lambda e: score(spec, e.candidate, e.goodput), reverse=True)
        best[mode] = mine[0] if mine else None
    colo = mode_result(spec, best["colocated"]) if best["colocated"] else None
    dis = mode_result(spec, best["disaggregated"]) if best["disaggregated"] else None
    het = mode_result(spec, best["heterogeneous"]) if best["heterogeneous"] else None
    # The verdict weighs colocated against the better disaggregated option (homogeneous or heterogeneous).
    dis_best, dis_ev = dis, best["disaggregated"]
    if het is not None and (dis is None or score(spec, best["heterogeneous"].candidate, best["heterogeneous"].goodput)
                            > score(spec, best["disaggregated"].candidate, best["disaggregated"].goodput)):
        dis_best, dis_ev = het, best["heterogeneous"]
    v, adv, reasons = verdict(spec, colo, dis_best, best["colocated"], dis_ev)
    costs, cost_lines = cost_report(spec, colo, dis, het)
    reasons += cost_lines
    table = [
        {
            "mode": e.candidate.mode,
            "config": e.candidate.unit.describe(),
            "copies": e.candidate.copies,
            "unit_gpus": e.candidate.unit.gpus,
            "estimate_rps": e.candidate.estimate,
            "goodput_rps": e.goodput if e.below is None else None,
            "rps_per_gpu": e.goodput / e.candidate.unit.gpus if e.below is None else None,
            "below_rps": e.below,
            "binding": e.binding,
            "probes": len(e.probes),
        }
        for e in evals
    ]
    inputs = {
        "model": spec.model.name,
        "gpu": spec.hardware.name,
        "network": spec.network.name,
        "gpus": spec.gpus,
        "rate": spec.rate,
        "workload": spec.workload.describe(),
        "mean_input": traffic.mean_input,
        "mean_output": traffic.mean_output,
        "prefix_hit_rate_possible": traffic.hit_rate,
        "slo_ttft_s": spec.slo.ttft_s,
        "slo_tpot_s": spec.slo.tpot_s,
        "attainment": spec.attainment,
        "gpu_hour_cost": spec.cost_per_gpu_hour,
        "pipelined": spec.pipelined,
        "requests_per_probe": spec.workload.num_requests,
        "block_size": spec.block_size,
        "kv_bytes_per_token": spec.model.kv_bytes_per_token(),
        "placement": f"core Router {spec.router}" + (", conditional disaggregation" if spec.conditional else ""),
        "efficiency": asdict(spec.efficiency),
    }
    inputs["prefill_gpu"] = (spec.prefill_hardware or spec.hardware).name
    inputs["decode_gpu"] = (spec.decode_hardware or spec.hardware).name
    inputs["search_gpus"] = [h.name for h in spec.search_hardware]
    inputs["prices"] = {h.name: spec.price(h) for h in spec.all_hardware}
    return PlanResult(inputs, colo, dis, v, adv, reasons, table, time.perf_counter() - t0, het, costs)
