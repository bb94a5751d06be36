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

import math
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Literal, Sequence

import numpy as np

from splitserve.workload.slo import SLO, attainment, summarize, tpot, ttft
from splitserve.sim.cluster import ClusterSim
from splitserve.sim.cluster_spec import ClusterSpec, PoolSpec
from splitserve.sim.placement import RouterPolicy
from splitserve.sim.result import SimResult
from splitserve.sim.hardware import Hardware, Network, hour_price
from splitserve.core.model_spec import ModelSpec
from splitserve.sim.perf import Efficiency, PerfModel
from splitserve.workload.goodput import Bracket, search_goodput
from splitserve.workload.requests import Scaling, SyntheticSpec, Trace, Workload, at_rate, synthetic
from splitserve.plan import estimate as est
from splitserve.plan.probes import Prober

Mode = Literal["colocated", "disaggregated", "heterogeneous"]
MODES: tuple[str, ...] = ("colocated", "disaggregated", "heterogeneous")


class PlanError(ValueError):
    """Bad planner input or an SLO no configuration can meet; the message says which."""


# ---------------------------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class WorkloadDef:
    """The traffic to plan for: a trace (its first `num_requests`, stretched to each probed rate) or a
    synthetic distribution (bench's definitions, shared)."""

    trace: Trace | None = None
    scaling: Scaling = Scaling()
    synthetic: SyntheticSpec | None = None
    num_requests: int = 400

    def __post_init__(self) -> None:
        if (self.trace is None) == (self.synthetic is None):
            raise PlanError("give a trace or a synthetic workload, not both")
        if self.num_requests < 10:
            raise PlanError(f"simulate at least 10 requests per probe, got {self.num_requests}")

    def at(self, rate: float, n: int | None = None) -> Workload:
        n = n or self.num_requests
        if self.synthetic is not None:
            return synthetic(replace(self.synthetic, rate=rate, num_requests=n, duration_s=None))
        return at_rate(self.trace, replace(self.scaling, max_requests=n, max_duration_s=None), rate)

    def describe(self) -> str:
        if self.synthetic is not None:
            s = self.synthetic
            text = f"synthetic: prompts {s.input.kind} {s.input.mean:g}, outputs {s.output.kind} {s.output.mean:g}"
            if s.shared_prefix_ratio:
                text += f", {s.shared_prefix_ratio:.0%} shared prefix ({s.num_prefixes} prefixes)"
            return text + f", {s.arrival} arrivals"
        extra = f", lengths x{self.scaling.length_scale:g}" if self.scaling.length_scale != 1 else ""
        return f"{self.trace.format} trace {os.path.basename(self.trace.path)} (first {self.num_requests} requests{extra})"


@dataclass(frozen=True)
class PlanSpec:
    model: ModelSpec
    hardware: Hardware
    network: Network
    workload: WorkloadDef
    slo: SLO
    gpus: int | None = None  # cluster size; with `rate`, an upper bound
    rate: float | None = None  # target req/s: find the fewest GPUs
    attainment: float = 0.9
    gpu_hour_cost: float | None = None  # None: the hardware preset's
    efficiency: Efficiency = Efficiency()
    pipelined: bool = True
    tp_options: tuple[int, ...] = (1, 2, 4, 8)
    chunk_options: tuple[int, ...] = (512, 2048)
    max_num_seqs: int = 256
    max_unit_gpus: int = 32  # with `rate` and no `gpus`: the largest disaggregated unit (P:D ratio) tried
    top_k: int = 4
    resolution: float = 0.05  # relative width of the final rate bracket
    jobs: int = 0  # processes for simulations; 0 = one per CPU core
    block_size: int | None = None  # KV block tokens; None: 16, larger for long prompts (fewer block operations)
    # A probe lasts `window_lifetimes` request lifetimes at the SLO (TTFT + output x TPOT), so that the
    # cluster fills up: its request count is rate x that, within [workload.num_requests, max_requests].
    # Attainment is judged on the requests arriving between `warmup` and `cooldown` of the probe.
    window_lifetimes: float = 2.0
    max_requests: int = 4000
    max_wait_growth: float = 0.25  # x TTFT target: a probe whose median wait grows more, first to last third, is overloaded
    warmup: float = 0.25
    cooldown: float = 0.9
    mean_output: float = 0.0  # filled in by `plan` from the workload
    # Placement: the core Router with this policy, as `splitserve serve` places (its defaults), and its
    # conditional disaggregation (prefill on the decode worker when the cost model says so).
    router: str = "kv_aware"
    conditional: bool = True
    # Issue #7: hardware per pool. `prefill_hardware`/`decode_hardware` (None: `hardware`) fix the
    # disaggregated pools' GPUs; `search_hardware` instead tries every type for each pool (and for colocated).
    # Units are then ranked by goodput per dollar (`prices`: USD per GPU-hour by preset key, over the presets').
    prefill_hardware: Hardware | None = None
    decode_hardware: Hardware | None = None
    search_hardware: tuple[Hardware, ...] = ()
    prices: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        if self.slo.ttft_s is None or self.slo.tpot_s is None:
            raise PlanError("the planner needs both --slo-ttft and --slo-tpot")
        if not (self.slo.ttft_s > 0 and self.slo.tpot_s > 0):
            raise PlanError("SLO targets must be positive seconds")
        if self.gpus is None and self.rate is None:
            raise PlanError("give --gpus N (cluster size) or --rate R (requests per second to serve)")
        if self.gpus is not None and self.gpus < 1:
            raise PlanError(f"--gpus must be >= 1, got {self.gpus}")
        if self.rate is not None and not self.rate > 0:
            raise PlanError(f"--rate must be positive, got {self.rate}")
        if not 0 < self.attainment <= 1:
            raise PlanError(f"attainment must be in (0, 1], got {self.attainment}")

    @property
    def cost_per_gpu_hour(self) -> float:
        return self.gpu_hour_cost if self.gpu_hour_cost is not None else self.price(self.hardware)

    def price(self, hw: Hardware) -> float:
        """USD per GPU-hour of `hw` (0: unknown). `gpu_hour_cost` applies to the main `hardware` only."""
        if hw.name == self.hardware.name and self.gpu_hour_cost is not None:
            return self.gpu_hour_cost
        return hour_price(hw, dict(self.prices))

    @property
    def colocated_hardware(self) -> tuple[Hardware, ...]:
        return self.search_hardware or (self.hardware,)

    @property
    def pool_pairs(self) -> list[tuple[Hardware, Hardware]]:
        """(prefill, decode) hardware pairs to try."""
        if self.search_hardware:
            return [(p, d) for p in self.search_hardware for d in self.search_hardware]
        return [(self.prefill_hardware or self.hardware, self.decode_hardware or self.hardware)]

    @property
    def all_hardware(self) -> list[Hardware]:
        out: dict[str, Hardware] = {}
        for hw in (*self.colocated_hardware, *(h for pair in self.pool_pairs for h in pair)):
            out.setdefault(hw.name, hw)
        return list(out.values())

    def network_for(self, hw_p: Hardware, hw_d: Hardware) -> Network | None:
        """The KV link between the pools; NVLink only joins GPUs of one kind in one node (None otherwise)."""
        if not self.network.intra_node:
            return self.network
        if hw_p.name != hw_d.name:
            return None
        return replace(self.network, name=f"NVLink ({hw_p.name})", bandwidth=hw_p.link_bw)

    def unit_cost(self, unit: ClusterSpec) -> float:
        """USD per hour of one unit; its GPU count where any price is unknown (ranking by GPUs, as before)."""
        prices = [self.price(p.hardware or unit.hardware) for p in unit.pools]
        if all(v > 0 for v in prices):
            return sum(p.gpus * v for p, v in zip(unit.pools, prices))
        return float(unit.gpus)


# ---------------------------------------------------------------------------------------------- candidates


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


def _fitting_tps(plan: PlanSpec, longest: int, hw: Hardware | None = None) -> list[int]:
    """Tensor-parallel sizes at which the weights and the KV cache of the longest request fit on `hw`
    (memory capacity: no configuration whose KV cache does not fit is proposed)."""
    hw = hw or plan.hardware
    out = []
    for tp in plan.tp_options:
        if tp > hw.gpus_per_node or (plan.gpus is not None and tp > plan.gpus):
            continue
        if PerfModel(plan.model, hw, tp, plan.efficiency).kv_capacity_tokens() >= longest:
            out.append(tp)
    return out


def enumerate_candidates(plan: PlanSpec, traffic: est.Traffic, longest: int) -> list[Candidate]:
    fits = {hw.name: _fitting_tps(plan, longest, hw) for hw in plan.all_hardware}
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


def _score(plan: PlanSpec, c: Candidate, unit_rate: float) -> float:
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
    mine.sort(key=lambda c: (_score(plan, c, c.estimate), -c.unit.gpus), reverse=True)
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
                           key=lambda c: (_score(plan, c, c.estimate), -c.unit.gpus))
            kind = [c for c in every if c.unit.pools[0].chunked_prefill == chunked]
            if kind and not any(o.unit.pools[0].chunked_prefill == chunked for o in out):
                out.append(kind[0])
    return out


# ---------------------------------------------------------------------------------------------- simulation


@dataclass
class Probe:
    rate: float  # req/s offered to one unit
    attainment: float
    ttft_miss: float  # fraction of requests over the TTFT target (or failed)
    tpot_miss: float
    stopped_early: bool
    growth: float = 0.0  # seconds the median wait grew from the first to the last third of the judged requests
    metrics: dict | None = None  # filled for the probe reported (see `probe_metrics`)
    passed: bool = False  # attainment reached and latency not growing (a stable queue)
    steady: bool = False  # mean TTFT and mean TPOT within the targets, a stable queue (see `steady_state`)


def probe_size(plan: PlanSpec, rate: float) -> int:
    lifetime = plan.slo.ttft_s + max(1.0, plan.mean_output) * plan.slo.tpot_s
    n = math.ceil(rate * lifetime * plan.window_lifetimes)
    return max(plan.workload.num_requests, min(plan.max_requests, n))


def judged(plan: PlanSpec, records: Sequence) -> list:
    """The records attainment is judged on: past the warm-up, before the drain."""
    n = len(records)
    return list(records[int(n * plan.warmup) : max(int(n * plan.warmup) + 1, int(n * plan.cooldown))])


def probe_metrics(plan: PlanSpec, res: SimResult, wl: Workload, rate: float) -> dict:
    s = summarize(judged(plan, res.records))
    mean_in = float(np.mean([r.input_len for r in wl.requests]))
    mean_out = float(np.mean([r.output_len for r in wl.requests]))
    transferred = sum(1 for r in res.records if r.ok) if res.cluster.disaggregated else 0
    return {
        "rate": rate,
        "requests": len(wl.requests),
        "ttft": {"p50": s.ttft.p50, "p90": s.ttft.p90, "p99": s.ttft.p99},
        "tpot": {"p50": s.tpot.p50, "p90": s.tpot.p90, "p99": s.tpot.p99},
        "e2e_p50": s.e2e.p50,
        "tokens_per_s": rate * (mean_in + mean_out),
        "output_tokens_per_s": rate * mean_out,
        "mean_input": mean_in,
        "mean_output": mean_out,
        "pools": [asdict(p) for p in res.pools],
        "phases": res.phases.as_dict(),
        "prefix_hit_rate": res.prefix_hit_rate,
        "transfer_bytes_per_request": res.transfer_bytes / transferred if transferred else 0.0,
        "transfer_exposed_s": res.transfer_exposed_s,
        "sim_wall_s": res.sim_wall_s,
    }


def run_probe(plan: PlanSpec, unit: ClusterSpec, rate: float, full: bool = False) -> Probe:
    wl = plan.workload.at(rate, probe_size(plan, rate))
    policy = RouterPolicy(plan.router, plan.conditional)
    res = ClusterSim(unit, policy).run(wl.requests, slo=plan.slo, stop_below=None if full else plan.attainment)
    recs = judged(plan, res.records)
    n = len(recs)
    slo = plan.slo
    ttft_miss = sum(1 for r in recs if (v := ttft(r)) is None or v > slo.ttft_s) / n
    tpot_miss = sum(1 for r in recs if r.ok and (v := tpot(r)) is not None and v > slo.tpot_s) / n
    att = attainment(recs, slo)
    g = growth(judged(plan, res.waits))
    metrics = probe_metrics(plan, res, wl, rate) if full or not res.stopped_early else None
    stable = g <= plan.max_wait_growth * slo.ttft_s
    passed = att >= plan.attainment and stable
    steady = stable and not res.stopped_early and steady_state(recs, slo)
    return Probe(rate, att, ttft_miss, tpot_miss, res.stopped_early, g, metrics, passed, steady)


def steady_state(recs: Sequence, slo: SLO) -> bool:
    """The average-based rule many planners use: mean TTFT and mean TPOT within the targets (failed requests
    at most 1 %). Reported beside the tail rule (`attainment` of requests within both), which is stricter:
    Poisson bursts put a tail of requests over the target long before the means get there."""
    ttfts = [v for r in recs if (v := ttft(r)) is not None]
    tpots = [v for r in recs if r.ok and (v := tpot(r)) is not None]
    if not ttfts or len(ttfts) < 0.99 * len(recs):
        return False
    return float(np.mean(ttfts)) <= slo.ttft_s and (not tpots or float(np.mean(tpots)) <= slo.tpot_s)


def growth(waits: Sequence[float | None]) -> float:
    """How much waiting grew over the probe (seconds): the median wait (queueing before the prefill, and for
    a decode slot after the KV) of the last third of the judged requests minus that of the first third. A
    stable system shows none; an overloaded one keeps queueing, which a short probe can otherwise hide
    inside the TPOT budget. Waits, not latencies, so that a trace's changing lengths are not a trend."""
    k = len(waits) // 3
    if k < 5:
        return 0.0
    first, last = waits[:k], waits[-k:]
    if any(v is None for v in last) or any(v is None for v in first):
        return math.inf
    return float(np.median(last) - np.median(first))


@dataclass
class Evaluated:
    candidate: Candidate
    goodput: float  # req/s per unit (0: not even the lowest probe passed)
    probes: list[Probe]
    best: Probe | None  # the highest passing probe, with metrics
    first_fail: Probe | None  # the lowest failing probe above it
    target: float = 0.9
    below: float | None = None  # not searched: it failed at this rate, which it needed to beat the best
    steady_rate: float = 0.0  # per unit, the steady-state rule's (`steady_goodput`; the best of each mode only)

    @property
    def steady_goodput(self) -> float:
        """The highest probed rate per unit that met the steady-state rule (a lower bound: the search probes
        around the tail rule's limit, not this one's)."""
        return max((p.rate for p in self.probes if p.steady), default=0.0)

    @property
    def binding(self) -> str:
        f = self.first_fail
        if self.below is not None:
            if not self.probes and self.below > self.candidate.capacity:
                return (f"cannot beat the best of its mode (needs {self.below:.3g} req/s per unit; its decode work alone "
                        f"allows at most {self.candidate.capacity:.3g})")
            return "cannot beat the best of its mode" + (f" (fails at {self.below:.3g} req/s per unit)" if self.below else "")
        if f is None:
            return "not reached within the probed rates"
        if f.attainment >= self.target:
            return f"overload: waiting keeps growing (+{f.growth:.2f} s over the probe at {f.rate:.3g} req/s per unit) though the SLO still holds"
        which = "TTFT" if f.ttft_miss >= f.tpot_miss else "TPOT"
        return f"{which} ({f.ttft_miss:.0%} of requests miss TTFT, {f.tpot_miss:.0%} miss TPOT at {f.rate:.3g} req/s per unit)"


# The bracket around a closed-form guess moves at most this many times (x2 up, /3 down) before bisecting.
BRACKET_STEPS = 6


def goodput_bracket(guess: float, resolution: float, passed: Probe | None = None) -> Bracket:
    """Where a unit's goodput is sought: around the closed-form `guess` (or upwards from a probe that already
    `passed`), bisected on a log scale to a relative `resolution`: the guess is good to a factor, not to
    a req/s."""
    guess = guess if guess > 0 and math.isfinite(guess) else 1.0
    lo, hi = (passed.rate, max(guess, passed.rate * 1.3)) if passed is not None else (guess * 0.7, guess * 1.3)
    return Bracket(lo, hi, resolution, relative=True, grow_steps=BRACKET_STEPS, shrink_steps=BRACKET_STEPS)


class _Unknown(Exception):
    def __init__(self, rate: float) -> None:
        self.rate = rate


def next_rate(bracket: Bracket, known: dict[float, bool]) -> float | None:
    """The rate the goodput search over `bracket` measures next, given the outcomes `known` so far (None:
    it is done): the search replayed, so that speculation follows it exactly."""

    def replay(rate: float) -> bool:
        if rate not in known:
            raise _Unknown(rate)
        return known[rate]

    try:
        search_goodput(replay, lambda ok: ok, bracket)
    except _Unknown as u:
        return u.rate
    return None


def _inline(plan: PlanSpec) -> Prober[Probe]:
    return Prober(run_probe, plan, jobs=1)


def evaluate(plan: PlanSpec, c: Candidate, passed: Probe | None = None, prober: Prober[Probe] | None = None) -> Evaluated:
    """The highest rate whose probe passes (attainment at target, stable), with the probes that found it."""
    guess = c.estimate if c.estimate > 0 else 0.05
    prober = prober or _inline(plan)
    bracket = goodput_bracket(guess, plan.resolution, passed)
    # On a pool both ends of the bracket run at once: hi is probed whenever lo passes, the usual case (when
    # lo fails, hi's probe fails too and stops early).
    ahead: dict[float, Future[Probe]] = (
        {r: prober.submit(c.unit, r) for r in (bracket.lo, bracket.hi)} if prober.parallel and passed is None else {})

    known: dict[float, bool] = {}  # rate -> passed, as the search saw them

    def measure(rate: float) -> Probe:
        if passed is not None and rate == passed.rate:
            known[rate] = True
            return passed
        pending = ahead.pop(rate, None) or prober.submit(c.unit, rate)
        # Speculation on idle processes only (a wasted probe then costs CPU, not wall time): the rate the
        # search asks next if this one passes, then if it fails. Passing first: a wasted passing probe
        # runs to its end, a wasted failing one mostly stops early. The search itself is unchanged, so is
        # its answer.
        for outcome in (True, False):
            if pending.done() or prober.idle() < 1:
                break
            nxt = next_rate(bracket, {**known, rate: outcome})
            if nxt is not None and nxt not in ahead:
                ahead[nxt] = prober.submit(c.unit, nxt)
        p = pending.result()
        known[rate] = p.passed
        nxt = next_rate(bracket, known)
        for r in [r for r in ahead if r != nxt]:  # the branch not taken: dropped unless already running
            ahead.pop(r).cancel()
        return p

    found = search_goodput(measure, lambda p: p.passed, bracket)
    for f in ahead.values():
        f.cancel()
    goodput, probes = found.lower, list(found.probes)
    passing = [p for p in probes if p.passed]
    best = max(passing, key=lambda p: p.rate) if passing else None
    fails = [p for p in probes if not p.passed and p.rate > (best.rate if best else 0)]
    first_fail = min(fails, key=lambda p: p.rate) if fails else None
    if best is not None and best.metrics is None:
        best = prober.submit(c.unit, best.rate, full=True).result()
    return Evaluated(c, goodput, probes, best, first_fail, plan.attainment)


def _bar(plan: PlanSpec, c: Candidate, best: Evaluated) -> float:
    """The unit rate `c` must sustain to beat `best` (inf: it cannot, whatever its goodput)."""
    mine, theirs = plan.unit_cost(c.unit), plan.unit_cost(best.candidate.unit)
    if plan.rate is None:
        return _score(plan, best.candidate, best.goodput) * cluster_cost(plan, c) / c.copies * (1 + plan.resolution)
    best_cost = math.ceil(plan.rate / best.goodput) * theirs
    copies = math.ceil(best_cost / mine - 1e-9) - 1  # the most copies that still cost less
    return plan.rate / copies if copies >= 1 else math.inf


def evaluate_mode(plan: PlanSpec, cands: Sequence[Candidate], prober: Prober[Probe] | None = None) -> list[Evaluated]:
    """Branch and bound: search the first candidate's goodput; each later one is first probed at the rate
    it would need to beat the best so far, and searched only if it sustains it. The later candidates' bar
    probes are submitted together, against the first best found (side by side on a pool); one that passes
    a bar a later best has raised since is probed again at the new bar, as one after the other would."""
    prober = prober or _inline(plan)
    out: list[Evaluated] = []
    best: Evaluated | None = None
    bars: dict[int, tuple[float, Future[Probe] | None]] = {}
    for i, c in enumerate(cands):
        if best is None or best.goodput <= 0:
            ev = evaluate(plan, c, prober=prober)
        else:
            if not bars:
                for j in range(i, len(cands)):
                    bar = _bar(plan, cands[j], best)
                    # No probe where the bar is out of reach: at any rate, or beyond its decode capacity.
                    bars[j] = (bar, None if math.isinf(bar) or bar > cands[j].capacity else prober.submit(cands[j].unit, bar))
            bar, pending = bars[i]
            p = pending.result() if pending is not None else None
            if p is not None and p.passed and (raised := _bar(plan, c, best)) > bar:  # a later best raised the bar
                bar = raised
                p = None if math.isinf(bar) or bar > c.capacity else prober.submit(c.unit, bar).result()
            if p is None:
                out.append(Evaluated(c, 0.0, [], None, None, plan.attainment, below=0.0 if math.isinf(bar) else bar))
                continue
            if not p.passed:
                out.append(Evaluated(c, 0.0, [p], None, p, plan.attainment, below=bar))
                continue
            ev = evaluate(plan, c, passed=p, prober=prober)
        out.append(ev)
        if best is None or _score(plan, c, ev.goodput) > _score(plan, best.candidate, best.goodput):
            best = ev
    return out


def _parallel(plan: PlanSpec, cands: Sequence[Candidate]) -> list[Evaluated]:
    """Each mode's branch and bound, and then the steady-state figure of its best, as one thread per mode;
    their probes share one pool of `jobs` processes (one per core by default; 1: all in this thread)."""
    groups = [[c for c in cands if c.mode == m] for m in MODES]
    groups = [g for g in groups if g]
    with Prober(run_probe, plan, plan.jobs or os.cpu_count() or 1) as prober:

        def one(group: list[Candidate]) -> list[Evaluated]:
            evals = evaluate_mode(plan, group, prober)
            top = max(evals, key=lambda e: _score(plan, e.candidate, e.goodput))
            if plan.rate is None:
                top.steady_rate = steady_goodput(plan, top, prober)
            return evals

        if not prober.parallel or len(groups) < 2:
            return [e for g in groups for e in one(g)]
        with ThreadPoolExecutor(len(groups)) as threads:
            return [e for evals in threads.map(one, groups) for e in evals]


# ---------------------------------------------------------------------------------------------- results


@dataclass
class ModeResult:
    mode: Mode
    config: str
    pools: list[dict]  # role, workers, tp per pool of one unit
    copies: int
    gpus: int  # GPUs used
    goodput_rps: float  # the whole cluster
    rps_per_gpu: float
    tokens_per_s_per_gpu: float  # prompt + output
    output_tokens_per_s_per_gpu: float
    cost_per_m_tokens: float | None
    cost_per_m_output_tokens: float | None
    binding: str  # which SLO fails first above the goodput
    estimate_binding: str  # the closed form's limiting constraint
    metrics: dict  # at the goodput (per unit): percentiles, pools, phases, transfer
    probes: list[tuple[float, float]]  # (rate per unit, attainment)
    cost_per_hour: float | None = None  # USD, the GPUs used
    cost_per_m_input_tokens: float | None = None
    utilisation: list[dict] = field(default_factory=list)  # per pool: role, hardware, GPUs, compute and bandwidth util
    rps_per_cluster_gpu: float | None = None  # goodput over every GPU of the cluster, idle ones included
    steady_goodput_rps: float | None = None  # the whole cluster under the steady-state rule (at least)


@dataclass
class PlanResult:
    inputs: dict
    colocated: ModeResult | None
    disaggregated: ModeResult | None  # homogeneous: both pools on one GPU type
    verdict: Literal["disaggregate", "colocate"]
    advantage: float | None  # disaggregated / colocated, goodput per GPU (fixed cluster) or GPUs saved (rate)
    reasons: list[str]
    candidates: list[dict] = field(default_factory=list)
    wall_s: float = 0.0
    heterogeneous: ModeResult | None = None  # prefill and decode pools on different GPU types
    costs: list[dict] = field(default_factory=list)  # per mode: $/M tokens, saving against colocated, reason

    def to_json(self) -> dict:
        return asdict(self)


def _mode_result(plan: PlanSpec, ev: Evaluated) -> ModeResult | None:
    if ev.best is None or ev.goodput <= 0:
        return None
    c = ev.candidate
    m = ev.best.metrics
    copies = c.copies if plan.rate is None else math.ceil(plan.rate / ev.goodput)
    if plan.rate is not None:
        # Report what the cluster does at the asked rate: each copy takes rate / copies.
        m = run_probe(plan, c.unit, plan.rate / copies, full=True).metrics
    gpus = copies * c.unit.gpus
    rate = m["rate"] * copies
    per_gpu_tokens = m["tokens_per_s"] * copies / gpus
    per_gpu_out = m["output_tokens_per_s"] * copies / gpus
    prices = [plan.price(p.hardware or c.unit.hardware) for p in c.unit.pools]
    hourly = copies * sum(p.gpus * v for p, v in zip(c.unit.pools, prices)) if all(v > 0 for v in prices) else None
    cost = hourly / gpus if hourly else None  # mean USD per GPU-hour
    per_gpu_in = m["mean_input"] * m["rate"] * copies / gpus
    util = [{"role": p.role, "hardware": (p.hardware or c.unit.hardware).name, "gpus": p.gpus * copies,
             "compute_util": q["compute_util"], "bandwidth_util": q["bandwidth_util"], "busy": q["busy"]}
            for p, q in zip(c.unit.pools, m["pools"])]
    return ModeResult(
        mode=c.mode,
        config=c.unit.describe() + (f", x{copies} copies" if copies > 1 else ""),
        pools=[{"role": p.role, "workers": p.count, "tp": p.tp, "chunk": p.max_num_batched_tokens if p.chunked_prefill else None,
                "hardware": (p.hardware or c.unit.hardware).name} for p in c.unit.pools],
        copies=copies,
        gpus=gpus,
        goodput_rps=ev.goodput * copies if plan.rate is None else rate,
        rps_per_gpu=(ev.goodput * copies if plan.rate is None else rate) / gpus,
        tokens_per_s_per_gpu=per_gpu_tokens,
        output_tokens_per_s_per_gpu=per_gpu_out,
        cost_per_m_tokens=cost / 3600 / per_gpu_tokens * 1e6 if cost and per_gpu_tokens else None,
        cost_per_m_output_tokens=cost / 3600 / per_gpu_out * 1e6 if cost and per_gpu_out else None,
        binding=ev.binding,
        estimate_binding=c.binding,
        metrics=m,
        probes=[(p.rate, p.attainment) for p in ev.probes],
        cost_per_hour=hourly,
        cost_per_m_input_tokens=cost / 3600 / per_gpu_in * 1e6 if cost and per_gpu_in else None,
        utilisation=util,
        rps_per_cluster_gpu=ev.goodput * copies / plan.gpus if plan.rate is None and plan.gpus else None,
        steady_goodput_rps=ev.steady_rate * copies if plan.rate is None else None,
    )


STEADY_STEP, STEADY_STEPS = 1.2, 3  # above the tail-rule goodput: +20 %, +44 %, +73 %


def steady_goodput(plan: PlanSpec, ev: Evaluated, prober: Prober[Probe]) -> float:
    """The rate per unit the steady-state rule still allows: upwards from the tail-rule goodput in steps of
    `STEADY_STEP`, each a full probe, until one fails (a lower bound, to within a step; at most
    `STEADY_STEPS` probes, for the winner of each mode only: the search itself stays on the tail rule)."""
    rate = max(ev.steady_goodput, ev.goodput if ev.best is not None and ev.best.steady else 0.0)
    if rate <= 0:
        return 0.0
    # The steady rule also needs a stable queue: no rate at or above one the search found overloaded (a
    # probe that ran to its end with waiting growing) can meet it, so none is probed (in case C of issue
    # 18 that was both modes' only steady-state probe, a fifth of the search's CPU time).
    unstable = min((p.rate for p in ev.probes if not p.stopped_early and p.growth > plan.max_wait_growth * plan.slo.ttft_s),
                   default=math.inf)
    for _ in range(STEADY_STEPS):
        if rate * STEADY_STEP >= unstable:
            break
        p = prober.submit(ev.candidate.unit, rate * STEADY_STEP, full=True).result()
        if not p.steady:
            break
        rate = p.rate
    return rate


def _pct(x: float) -> str:
    return f"{x:.0%}"


def _pool_line(m: dict) -> str:
    parts = []
    for p in m["pools"]:
        parts.append(f"{p['role']} {_pct(p['compute_util'])} of peak FLOP/s, {_pct(p['bandwidth_util'])} of peak bandwidth, busy {_pct(p['busy'])}")
    return "; ".join(parts)


def _phase_line(m: dict) -> str:
    ph = m["phases"]
    total = sum(ph.values()) or 1.0
    return ", ".join(f"{k.removesuffix('_s')} {v * 1e3:.0f} ms ({v / total:.0%})" for k, v in ph.items() if v > 0)


def verdict(plan: PlanSpec, colo: ModeResult | None, dis: ModeResult | None, colo_ev: Evaluated | None, dis_ev: Evaluated | None) -> tuple[str, float | None, list[str]]:
    reasons: list[str] = []
    if colo is None and dis is None:
        why = []
        for name, ev in (("colocated", colo_ev), ("disaggregated", dis_ev)):
            if ev is not None:
                why.append(f"{name} {ev.candidate.unit.describe()}: {ev.candidate.binding}")
        raise PlanError(
            f"no configuration meets TTFT {plan.slo.ttft_s:g} s and TPOT {plan.slo.tpot_s:g} s for {plan.attainment:.0%} of requests"
            + (" (" + "; ".join(why) + ")" if why else "")
        )
    if dis is None:
        reasons.append("no disaggregated configuration meets the SLO" + (f": {dis_ev.candidate.binding}" if dis_ev else " (none fits the cluster)"))
        adv, v = None, "colocate"
    elif colo is None:
        reasons.append("no colocated configuration meets the SLO" + (f": {colo_ev.candidate.binding}" if colo_ev else ""))
        adv, v = None, "disaggregate"
    elif (plan.search_hardware or dis.mode == "heterogeneous") and colo.cost_per_m_tokens and dis.cost_per_m_tokens:
        # GPU types differ: a GPU is not a unit of cost, a dollar is.
        adv = colo.cost_per_m_tokens / dis.cost_per_m_tokens
        v = "disaggregate" if adv >= 1.05 else "colocate"
        reasons.append(f"{dis.mode} costs ${dis.cost_per_m_tokens:.3g} per M tokens, colocated ${colo.cost_per_m_tokens:.3g}"
                       f" ({adv:.2f}x tokens per dollar)" + ("" if v == "disaggregate" or adv < 1 else ": within 5 %, not worth a second pool"))
    elif plan.rate is None:
        # Over the whole cluster: GPUs a configuration leaves idle are not free.
        adv = dis.rps_per_cluster_gpu / colo.rps_per_cluster_gpu
        v = "disaggregate" if adv >= 1.05 else "colocate"
        more = f"{adv:.2f}x the goodput per GPU" if adv >= 1 else f"{1 - adv:.0%} less goodput per GPU"
        reasons.append(f"disaggregated serves {more} of the cluster ({dis.rps_per_cluster_gpu:.3g} vs "
                       f"{colo.rps_per_cluster_gpu:.3g} req/s per GPU; per GPU used {dis.rps_per_gpu:.3g} vs "
                       f"{colo.rps_per_gpu:.3g}, using {dis.gpus} and {colo.gpus} of {plan.gpus})"
                       + ("" if v == "disaggregate" or adv < 1 else ": within 5 %, not worth a second pool"))
    else:
        adv = colo.gpus / dis.gpus
        v = "disaggregate" if dis.gpus < colo.gpus else "colocate"
        reasons.append(f"at {plan.rate:g} req/s disaggregated needs {dis.gpus} GPUs, colocated {colo.gpus}")
    steady = [(n, r) for n, r in (("colocated", colo), ("disaggregated", dis)) if r is not None and r.steady_goodput_rps]
    reasons.append(
        f"pass rule: {plan.attainment:.0%} of requests (Poisson arrivals) within both TTFT and TPOT, queue stable"
        + ("; steady state (mean TTFT and TPOT within the targets), at least: "
           + ", ".join(f"{n} {r.steady_goodput_rps:.3g} req/s (tail rule {r.goodput_rps:.3g})" for n, r in steady)
           if steady else ""))
    for name, r in (("colocated", colo), (dis.mode if dis is not None else "disaggregated", dis)):
        if r is None:
            continue
        m = r.metrics
        reasons.append(f"{name} ({r.config}) is limited by {r.binding}; screen: {r.estimate_binding}")
        reasons.append(f"{name} time per request: {_phase_line(m)}")
        reasons.append(f"{name} utilisation: {_pool_line(m)}")
    if dis is not None:
        m = dis.metrics
        mb = m["transfer_bytes_per_request"] / 1e6
        e2e = m["e2e_p50"] or 0.0
        reasons.append(
            f"KV transfer: {mb:,.1f} MB per request over {plan.network.name} "
            f"({'pipelined' if plan.pipelined else 'not pipelined'}), {m['transfer_exposed_s'] * 1e3:.1f} ms exposed"
            + (f" ({m['transfer_exposed_s'] / e2e:.1%} of median end-to-end)" if e2e else "")
        )
    hit = (colo or dis).metrics["prefix_hit_rate"]
    if hit > 0.05:
        reasons.append(f"prefix cache serves {hit:.0%} of prompt tokens: less prefill work to separate")
    if colo is not None and dis is not None and colo.cost_per_m_output_tokens and dis.cost_per_m_output_tokens:
        reasons.append(f"cost per million output tokens: colocated ${colo.cost_per_m_output_tokens:.3g}, disaggregated ${dis.cost_per_m_output_tokens:.3g}")
    return v, adv, reasons


def auto_block_size(mean_input: float) -> int:
    """16 tokens, doubled per doubling of the mean prompt beyond 2k (at most 128): a block's bookkeeping in
    the pure-Python scheduler dominates simulation time for long prompts, and a block of internal
    fragmentation per request is noise at those lengths."""
    bs = 16
    while bs < 128 and mean_input > bs * 128:
        bs *= 2
    return bs


def check_context(plan: PlanSpec, lengths: Sequence[int]) -> None:
    """Refuse at once a workload whose requests (prompt + output) do not fit the model's context often
    enough to miss the attainment anywhere: every server refuses them, whatever the configuration (found
    by simulating every one, this took a minute and named TTFT as the reason)."""
    limit = plan.model.max_position_embeddings
    over = [n for n in lengths if n > limit]
    if len(over) > (1 - plan.attainment) * len(lengths):
        raise PlanError(
            f"{len(over) / len(lengths):.0%} of requests need more than {plan.model.name}'s context of {limit:,} tokens "
            f"(prompt + output up to {max(over):,}): at most {1 - plan.attainment:.0%} may fail the SLO"
        )


def check_slo(plan: PlanSpec, traffic: est.Traffic, longest: int) -> None:
    """Refuse targets that no configuration can meet even serving one request at a time (on any GPU type)."""
    errors = []
    for hw in plan.all_hardware:
        try:
            _check_slo(plan, traffic, longest, hw)
            return
        except PlanError as e:
            errors.append(e)
    raise errors[0]


def _check_slo(plan: PlanSpec, traffic: est.Traffic, longest: int, hw: Hardware) -> None:
    tps = _fitting_tps(plan, longest, hw)
    if not tps:
        raise PlanError(
            f"{plan.model.name} with a {longest:,}-token request does not fit on {max(plan.tp_options)} x {hw.name} "
            "(tensor parallelism stays within a node)"
        )
    perf = [PerfModel(plan.model, hw, tp, plan.efficiency) for tp in tps]
    iu = int(traffic.uncached_input)
    prefill = min(p.prefill_time(iu, int(traffic.mean_input) - iu) for p in perf)
    if prefill > plan.slo.ttft_s:
        raise PlanError(
            f"TTFT {plan.slo.ttft_s:g} s is impossible: a lone {iu:,}-token prefill of {plan.model.name} takes "
            f"{prefill:.3g} s even on TP{max(tps)} x {hw.name}"
        )
    if traffic.mean_output > 1:
        step = min(p.decode_step_time(1, traffic.mean_input + traffic.mean_output / 2) for p in perf)
        if step > plan.slo.tpot_s:
            raise PlanError(
                f"TPOT {plan.slo.tpot_s * 1e3:g} ms is impossible: a lone decode step of {plan.model.name} takes "
                f"{step * 1e3:.3g} ms even on TP{max(tps)} x {hw.name}"
            )


def _gpus_of(r: ModeResult, role: str) -> str:
    return ", ".join(f"{u['gpus']} x {u['hardware']}" for u in r.utilisation if u["role"] == role)


def cost_report(plan: PlanSpec, colo: ModeResult | None, dis: ModeResult | None, het: ModeResult | None) -> tuple[list[dict], list[str]]:
    """Cost per million tokens of the best of each mode at the same SLO (and load, with `rate`), the saving
    against colocated, and where it comes from: which pool is smaller, which hardware is cheaper for its phase."""
    rows: list[dict] = []
    reasons: list[str] = []
    base = colo.cost_per_m_tokens if colo is not None else None
    for name, r in (("colocated", colo), ("disaggregated", dis), ("heterogeneous", het)):
        if r is None or r.cost_per_m_tokens is None:
            continue
        saving = 1 - r.cost_per_m_tokens / base if base and name != "colocated" else None
        why = ""
        if name != "colocated" and colo is not None:
            pre = sum(u["gpus"] for u in r.utilisation if u["role"] == "prefill")
            dec = sum(u["gpus"] for u in r.utilisation if u["role"] == "decode")
            parts = [f"prefill pool {_gpus_of(r, 'prefill')}, decode pool {_gpus_of(r, 'decode')} "
                     f"({'prefill' if pre < dec else 'decode' if dec < pre else 'neither'} pool is the smaller) "
                     f"against colocated {_gpus_of(colo, 'colocated')}"]
            hw = {h.name: h for h in plan.all_hardware}
            chw = hw.get(colo.utilisation[0]["hardware"])
            for role, what, attr, unit, scale in (("prefill", "FLOP/s", "flops", "PFLOP/s-hour", 1e15),
                                                  ("decode", "bandwidth", "mem_bw", "TB/s-hour", 1e12)):
                h = hw.get(next(u["hardware"] for u in r.utilisation if u["role"] == role))
                if h is None or chw is None or not plan.price(h) or not plan.price(chw):
                    continue
                mine, theirs = plan.price(h) / (getattr(h, attr) / scale), plan.price(chw) / (getattr(chw, attr) / scale)
                if h.name != chw.name:
                    cmp = "cheaper" if mine < theirs else "dearer"
                    gpu_cmp = "cheaper" if plan.price(h) < plan.price(chw) else "dearer"
                    parts.append(f"{role} on {h.name}: ${plan.price(h):.2f} per GPU-hour, {gpu_cmp} than {chw.name}'s "
                                 f"${plan.price(chw):.2f}; ${mine:.3g} per {unit} of peak {what} (the {role} phase's "
                                 f"resource), {cmp} than ${theirs:.3g}")
            if saving is not None:
                per_gpu = r.rps_per_gpu / colo.rps_per_gpu
                parts.append(f"{per_gpu:.2f}x colocated's goodput per GPU")
            why = "; ".join(parts)
        rows.append({"mode": name, "config": r.config, "cost_per_hour": r.cost_per_hour,
                     "cost_per_m_tokens": r.cost_per_m_tokens, "cost_per_m_input_tokens": r.cost_per_m_input_tokens,
                     "cost_per_m_output_tokens": r.cost_per_m_output_tokens, "saving_vs_colocated": saving, "reason": why})
        line = (f"cost {name}: ${r.cost_per_m_tokens:.3g} per M tokens (in+out), ${r.cost_per_m_input_tokens or 0:.3g} per M input, "
                f"${r.cost_per_m_output_tokens or 0:.3g} per M output tokens (${r.cost_per_hour:,.2f}/h)")
        if saving is not None:
            line += f"; {'saves' if saving >= 0 else 'costs'} {abs(saving):.0%} against colocated: {why}"
        reasons.append(line)
    return rows, reasons


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
    evals = _parallel(spec, todo)
    best: dict[str, Evaluated | None] = {}
    for mode in MODES:
        mine = [e for e in evals if e.candidate.mode == mode]
        mine.sort(key=lambda e: _score(spec, e.candidate, e.goodput), reverse=True)
        best[mode] = mine[0] if mine else None
    colo = _mode_result(spec, best["colocated"]) if best["colocated"] else None
    dis = _mode_result(spec, best["disaggregated"]) if best["disaggregated"] else None
    het = _mode_result(spec, best["heterogeneous"]) if best["heterogeneous"] else None
    # The verdict weighs colocated against the better disaggregated option (homogeneous or heterogeneous).
    dis_best, dis_ev = dis, best["disaggregated"]
    if het is not None and (dis is None or _score(spec, best["heterogeneous"].candidate, best["heterogeneous"].goodput)
                            > _score(spec, best["disaggregated"].candidate, best["disaggregated"].goodput)):
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

