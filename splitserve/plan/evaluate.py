"""A unit simulated: probes at a rate on the real Scheduler, judged by the tail-SLO rule (and the steady-state
rule beside it), and each unit's goodput search (bracketed around its estimate, branch and bound within a
mode, the next rate speculated on idle processes)."""

from __future__ import annotations

import math
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Literal, Sequence

import numpy as np

from splitserve.plan.candidates import Candidate, cluster_cost, score
from splitserve.plan.probes import Prober
from splitserve.plan.spec import MODES, PlanSpec
from splitserve.plan.steady import SteadyWatch, steady_state
from splitserve.sim.cluster import ClusterSim
from splitserve.sim.cluster_spec import ClusterSpec
from splitserve.sim.placement import RouterPolicy
from splitserve.sim.result import SimResult
from splitserve.workload.goodput import Bracket, search_goodput
from splitserve.workload.requests import Workload
from splitserve.workload.slo import attainment, summarize, tpot, ttft


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
    inferred: bool = False  # not simulated: below a rate that passed (see `evaluate`)


def probe_size(plan: PlanSpec, rate: float) -> int:
    lifetime = plan.slo.ttft_s + max(1.0, plan.mean_output) * plan.slo.tpot_s
    n = math.ceil(rate * lifetime * plan.window_lifetimes)
    return max(plan.workload.num_requests, min(plan.max_requests, n))


def judged_range(plan: PlanSpec, n: int) -> range:
    """The indices of the requests attainment is judged on, of `n`: past the warm-up, before the drain."""
    return range(int(n * plan.warmup), max(int(n * plan.warmup) + 1, int(n * plan.cooldown)))


def judged(plan: PlanSpec, records: Sequence) -> list:
    """The records attainment is judged on."""
    return [records[i] for i in judged_range(plan, len(records))]


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


# What a probe stops on (each stop leaves its verdict the full run's): "tail", the search's probes, once more
# than 1 - attainment of the judged requests are certain to miss; "steady", the steady-state probes, once
# that rule is certain to fail (`SteadyWatch`); "none", a full run, for the metrics at an asked rate.
Stop = Literal["tail", "steady", "none"]


def run_probe(plan: PlanSpec, unit: ClusterSpec, rate: float, stop: Stop = "tail") -> Probe:
    wl = plan.workload.at(rate, probe_size(plan, rate))
    policy = RouterPolicy(plan.router, plan.conditional)
    window = judged_range(plan, len(wl.requests))
    watch = SteadyWatch(plan.slo, [wl.requests[i].output_len for i in window]) if stop == "steady" else None
    res = ClusterSim(unit, policy).run(wl.requests, slo=plan.slo, stop_below=plan.attainment if stop == "tail" else None,
                                       judged=window, watch=watch)
    recs = judged(plan, res.records)
    n = len(recs)
    slo = plan.slo
    ttft_miss = sum(1 for r in recs if (v := ttft(r)) is None or v > slo.ttft_s) / n
    tpot_miss = sum(1 for r in recs if r.ok and (v := tpot(r)) is not None and v > slo.tpot_s) / n
    att = attainment(recs, slo)
    g = growth(judged(plan, res.waits))
    metrics = probe_metrics(plan, res, wl, rate) if not res.stopped_early else None
    stable = g <= plan.max_wait_growth * slo.ttft_s
    # A run stopped early is certain to fail the rule it stopped on: the tail rule's attainment (its
    # unfinished requests count as misses here, as they will be), or the steady-state rule.
    passed = att >= plan.attainment and stable and not (res.stopped_early and stop == "tail")
    steady = stable and not res.stopped_early and steady_state(recs, slo)
    return Probe(rate, att, ttft_miss, tpot_miss, res.stopped_early, g, metrics, passed, steady)


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
    # The search tries lo and, if it passes, hi. hi is simulated first: where it passes, lo is taken to pass
    # without a probe (a unit that sustains a rate sustains a lower one), which saves the lower end's
    # probe, a full run, in the usual case; where it fails, lo is probed after it.
    hi_first = passed is None
    ahead: dict[float, Future[Probe]] = {bracket.hi: prober.submit(c.unit, bracket.hi)} if prober.parallel and hi_first else {}

    known: dict[float, bool] = {}  # rate -> passed, as the search saw them
    hi_probe: list[Probe] = []  # hi's, once measured ahead of lo

    def seen(k: dict[float, bool]) -> dict[float, bool]:
        """The outcomes as the search will see them: lo passes once hi has."""
        return {bracket.lo: True, **k} if hi_first and k.get(bracket.hi) else k

    def simulate(rate: float) -> Probe:
        pending = ahead.pop(rate, None) or prober.submit(c.unit, rate)
        # Speculation on idle processes only (a wasted probe then costs CPU, not wall time): the rate the
        # search asks next if this one passes, then if it fails. Passing first: a wasted passing probe
        # runs to its end, a wasted failing one mostly stops early. The search itself is unchanged, so is
        # its answer.
        for outcome in (True, False):
            if pending.done() or prober.idle() < 1:
                break
            nxt = next_rate(bracket, seen({**known, rate: outcome}))
            if nxt is not None and nxt not in ahead:
                ahead[nxt] = prober.submit(c.unit, nxt)
        p = pending.result()
        known[rate] = p.passed
        nxt = next_rate(bracket, seen(known))
        for r in [r for r in ahead if r != nxt]:  # the branch not taken: dropped unless already running
            ahead.pop(r).cancel()
        return p

    def measure(rate: float) -> Probe:
        if passed is not None and rate == passed.rate:
            known[rate] = True
            return passed
        if hi_first and rate == bracket.lo and not hi_probe:
            hi_probe.append(simulate(bracket.hi))
            if hi_probe[0].passed:
                known[rate] = True
                return Probe(rate, 1.0, 0.0, 0.0, False, passed=True, inferred=True)
        if hi_first and rate == bracket.hi:
            return hi_probe[0]
        return simulate(rate)

    found = search_goodput(measure, lambda p: p.passed, bracket)
    for f in ahead.values():
        f.cancel()
    goodput, probes = found.lower, [p for p in found.probes if not p.inferred]
    passing = [p for p in probes if p.passed]
    best = max(passing, key=lambda p: p.rate) if passing else None
    fails = [p for p in probes if not p.passed and p.rate > (best.rate if best else 0)]
    first_fail = min(fails, key=lambda p: p.rate) if fails else None
    return Evaluated(c, goodput, probes, best, first_fail, plan.attainment)


def _bar(plan: PlanSpec, c: Candidate, best: Evaluated) -> float:
    """The unit rate `c` must sustain to beat `best` (inf: it cannot, whatever its goodput)."""
    mine, theirs = plan.unit_cost(c.unit), plan.unit_cost(best.candidate.unit)
    if plan.rate is None:
        return score(plan, best.candidate, best.goodput) * cluster_cost(plan, c) / c.copies * (1 + plan.resolution)
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
        if best is None or score(plan, c, ev.goodput) > score(plan, best.candidate, best.goodput):
            best = ev
    return out


def evaluate_all(plan: PlanSpec, cands: Sequence[Candidate]) -> list[Evaluated]:
    """Each mode's branch and bound, and then the steady-state figure of its best, as one thread per mode;
    their probes share one pool of `jobs` processes (one per core by default; 1: all in this thread)."""
    groups = [[c for c in cands if c.mode == m] for m in MODES]
    groups = [g for g in groups if g]
    with Prober(run_probe, plan, plan.jobs or os.cpu_count() or 1) as prober:

        def one(group: list[Candidate]) -> list[Evaluated]:
            evals = evaluate_mode(plan, group, prober)
            top = max(evals, key=lambda e: score(plan, e.candidate, e.goodput))
            if plan.rate is None:
                top.steady_rate = steady_goodput(plan, top, prober)
            return evals

        if not prober.parallel or len(groups) < 2:
            return [e for g in groups for e in one(g)]
        with ThreadPoolExecutor(len(groups)) as threads:
            return [e for evals in threads.map(one, groups) for e in evals]


STEADY_STEP, STEADY_STEPS = 1.2, 3  # above the tail-rule goodput: +20 %, +44 %, +73 %


def steady_goodput(plan: PlanSpec, ev: Evaluated, prober: Prober[Probe]) -> float:
    """The rate per unit the steady-state rule still allows: upwards from the tail-rule goodput in steps of
    `STEADY_STEP`, each probe run to its end unless the rule's failure is certain sooner (`SteadyWatch`),
    until one fails (a lower bound, to within a step; at most
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
        p = prober.submit(ev.candidate.unit, rate * STEADY_STEP, "steady").result()
        if not p.steady:
            break
        rate = p.rate
    return rate
