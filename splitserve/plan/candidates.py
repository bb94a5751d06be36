"""The search space: every colocated, disaggregated and heterogeneous unit the cluster allows (any P:D ratio
it can hold), what a cluster of its copies costs, and the shortlist the closed-form estimate keeps for
simulation."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from splitserve.plan import estimate as est
from splitserve.plan.spec import Mode, PlanError, PlanSpec, fitting_tps
from splitserve.sim.cluster_spec import ClusterSpec, PoolSpec
from splitserve.sim.hardware import Hardware
from splitserve.sim.perf import PerfModel


@dataclass(frozen=True)
class Candidate:
    mode: Mode
    unit: ClusterSpec
    copies: int
    estimate: float  # req/s per unit, closed form
    binding: str  # the estimate's limiting constraint
    capacity: float = math.inf  # req/s per unit its decode work alone allows, whatever the SLO (an upper bound)

    @property
    def gpus(self) -> int:
        return self.copies * self.unit.gpus


def enumerate_candidates(plan: PlanSpec, traffic: est.Traffic, longest: int) -> list[Candidate]:
    fits = {hw.name: fitting_tps(plan, longest, hw) for hw in plan.all_hardware}
    if not any(fits.values()):
        names = ", ".join(hw.name for hw in plan.all_hardware)
        raise PlanError(
            f"{plan.model.name} with a {longest:,}-token request does not fit on {max(plan.tp_options)} x {names} "
            "(tensor parallelism stays within a node)"
        )
    main = plan.hardware.name
    perf = {(hw.name, tp): PerfModel(plan.model, hw, tp, plan.efficiency) for hw in plan.all_hardware for tp in fits[hw.name]}
    base = dict(model=plan.model, hardware=plan.hardware, efficiency=plan.efficiency, block_size=plan.block_size or 16)

    def tag(hw: Hardware) -> Hardware | None:  # pools on the main hardware keep the old description
        return None if hw.name == main and not plan.search_hardware else hw

    cands: list[Candidate] = []
    for hw in plan.colocated_hardware:
        for tp in fits[hw.name]:
            copies = (plan.gpus // tp) if plan.rate is None else 1
            if copies < 1:
                continue
            for chunk in (None, *plan.chunk_options):
                e = est.colocated(perf[hw.name, tp], traffic, plan.slo, plan.max_num_seqs, chunk)
                pool = PoolSpec("colocated", 1, tp, plan.max_num_seqs, chunk or 8192, chunk is not None, hardware=tag(hw))
                cap = est.decode_capacity(perf[hw.name, tp], traffic, plan.max_num_seqs)
                cands.append(Candidate("colocated", ClusterSpec(pools=(pool,), **base), copies, e.rate, e.binding, cap))
    for hw_p, hw_d in plan.pool_pairs:
        net = plan.network_for(hw_p, hw_d)
        if net is None:
            continue
        mode: Mode = "disaggregated" if hw_p.name == hw_d.name else "heterogeneous"
        pre = {tp: est.prefill_worker(perf[hw_p.name, tp], traffic, plan.slo, net.instance_bandwidth(tp, hw_p.gpus_per_node))
               for tp in fits[hw_p.name]}
        for tp_p in fits[hw_p.name]:
            for tp_d in fits[hw_d.name]:
                bw = min(net.instance_bandwidth(tp_p, hw_p.gpus_per_node), net.instance_bandwidth(tp_d, hw_d.gpus_per_node))
                exposed = est.exposed_transfer(perf[hw_p.name, tp_p], traffic, bw, net.latency_s, plan.pipelined)
                dec = est.decode_worker(perf[hw_d.name, tp_d], traffic, plan.slo, plan.max_num_seqs, exposed)
                cap = est.decode_capacity(perf[hw_d.name, tp_d], traffic, plan.max_num_seqs)
                for x, y in pd_ratios(plan.gpus or plan.max_unit_gpus, tp_p, tp_d):
                    unit_gpus = x * tp_p + y * tp_d
                    copies = plan.gpus // unit_gpus if plan.rate is None else 1
                    rp, rd = x * pre[tp_p].rate, y * dec.rate
                    binding = f"prefill pool: {pre[tp_p].binding}" if rp <= rd else f"decode pool: {dec.binding}"
                    unit = ClusterSpec(
                        pools=(PoolSpec("prefill", x, tp_p, plan.max_num_seqs, hardware=hw_p if mode == "heterogeneous" else tag(hw_p)),
                               PoolSpec("decode", y, tp_d, plan.max_num_seqs, hardware=hw_d if mode == "heterogeneous" else tag(hw_d))),
                        network=net, pipelined=plan.pipelined, **base,
                    )
                    cands.append(Candidate(mode, unit, copies, min(rp, rd), binding, y * cap))
    return cands


def pd_ratios(max_gpus: int, tp_p: int, tp_d: int) -> list[tuple[int, int]]:
    """Every prefill:decode worker ratio x:y in lowest terms whose unit (x TP-p + y TP-d workers) fits in
    `max_gpus`: a cluster copies the unit, so 2:2 is two copies of 1:1, while 5:3, 10:3 or 6:1 are
    ratios of their own (a cap of 4 workers per unit could only say 1:3 ... 3:1)."""
    return [(x, y) for x in range(1, max_gpus // tp_p + 1) for y in range(1, (max_gpus - x * tp_p) // tp_d + 1)
            if math.gcd(x, y) == 1]


def cluster_cost(plan: PlanSpec, c: Candidate) -> float:
    """USD per hour of the whole fixed cluster with `c`'s copies on it (GPUs where prices are unknown): the
    GPUs its copies leave idle are paid for too, at the unit's mean price per GPU. (Dividing by the GPUs
    used made a unit using 10 of 16 GPUs look 1.57x better per GPU while serving 0.98x over the cluster.)"""
    unit = plan.unit_cost(c.unit)
    idle = (plan.gpus or 0) - c.copies * c.unit.gpus
    return c.copies * unit + max(0, idle) * unit / c.unit.gpus


def score(plan: PlanSpec, c: Candidate, unit_rate: float) -> float:
    """Higher is better: goodput per GPU of the cluster (fixed cluster) or -GPUs needed (target rate)."""
    if unit_rate <= 0:
        return -math.inf
    cost = plan.unit_cost(c.unit)  # USD/h (the GPU count where prices are unknown): per GPU as before on one type
    if plan.rate is None:
        return unit_rate * c.copies / cluster_cost(plan, c)
    return -math.ceil(plan.rate / unit_rate) * cost + unit_rate / cost * 1e-9


def _shape(c: Candidate) -> tuple:
    return tuple((p.tp, (p.hardware or c.unit.hardware).name) for p in c.unit.pools)


def shortlist(plan: PlanSpec, cands: Sequence[Candidate], mode: Mode) -> list[Candidate]:
    """The `top_k` most promising units of a mode: the best of each tensor-parallel shape first (the closed
    form ranks shapes less reliably than units of one shape), then the next best overall."""
    mine = [c for c in cands if c.mode == mode and c.estimate > 0] or [c for c in cands if c.mode == mode]
    mine.sort(key=lambda c: (score(plan, c, c.estimate), -c.unit.gpus), reverse=True)
    out: list[Candidate] = []
    shapes: set[tuple[int, ...]] = set()
    for c in mine:
        if _shape(c) not in shapes and len(out) < plan.top_k:
            shapes.add(_shape(c))
            out.append(c)
    for c in mine:
        if len(out) >= plan.top_k:
            break
        if c not in out and all(c.unit.describe() != o.unit.describe() for o in out):
            out.append(c)
    if mode == "colocated":
        # Chunked and whole-prompt units are screened by different formulas: the best of each kind is always
        # simulated, or the closed form's bias alone decides which kind is never tried.
        for chunked in (True, False):
            every = sorted((c for c in cands if c.mode == mode), reverse=True,
                           key=lambda c: (score(plan, c, c.estimate), -c.unit.gpus))
            kind = [c for c in every if c.unit.pools[0].chunked_prefill == chunked]
            if kind and not any(o.unit.pools[0].chunked_prefill == chunked for o in out):
                out.append(kind[0])
    return out
