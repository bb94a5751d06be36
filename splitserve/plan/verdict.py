"""What the search found, as the user reads it: each mode's best configuration, the verdict with its reasons,
and the cost report."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Literal

from splitserve.plan.evaluate import Evaluated, run_probe
from splitserve.plan.spec import Mode, PlanError, PlanSpec


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


def mode_result(plan: PlanSpec, ev: Evaluated) -> ModeResult | None:
    if ev.best is None or ev.goodput <= 0:
        return None
    c = ev.candidate
    m = ev.best.metrics
    copies = c.copies if plan.rate is None else math.ceil(plan.rate / ev.goodput)
    if plan.rate is not None:
        # Report what the cluster does at the asked rate: each copy takes rate / copies.
        m = run_probe(plan, c.unit, plan.rate / copies, "none").metrics
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
