"""The pure parts of `benchmarks.interference`: latency figures of a set of runs, the wall-time estimate, the
measured-vs-predicted table and the headline numbers. No server, no clock."""

from __future__ import annotations

import math
from dataclasses import replace
from statistics import median
from typing import Sequence

import numpy as np

from splitserve.plan.local_deployments import SPLIT, winner, within_spread
from splitserve.workload.record import RequestRecord
from splitserve.workload.slo import SLO, attainment, itls, tpot, ttft, worst_gap

COLOCATED_FAMILY = ("colocated", "replicas", "chunked")
SERVER_START_S = 30.0  # one `serve` start with its warm-up request, loaded machine
# Stall bounds the verdict is re-judged at (seconds of a request's worst gap between two tokens): from about
# two batch-1 decode steps here to twice the default SLO's 0.5 s.
GAP_BOUNDS = (0.15, 0.25, 0.5, 1.0)
# A run's last requests finish about this long after the last arrival (~128 answer tokens at ~0.1-0.15 s a
# token); the run's deadline allows more, but a run ends when its last request does.
TAIL_S = 20.0


def _pct(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


def latency_figures(runs: Sequence[Sequence[RequestRecord]], decode_step_s: float | None = None) -> dict:
    """TTFT, mean TPOT, inter-token gaps and the worst gap per request over the successful requests of each
    run: each figure the median over runs, with its spread (min, max) beside it. With the median decode
    step, the worst gaps in decode steps too."""
    per_run: list[dict[str, float | None]] = []
    for records in runs:
        ok = [r for r in records if r.ok]
        gaps = [g for r in ok for g in itls(r)]
        worst = [w for r in ok if (w := worst_gap(r)) is not None]
        per_run.append({
            "ttft_p50_s": _pct([t for r in ok if (t := ttft(r)) is not None], 50),
            "ttft_p90_s": _pct([t for r in ok if (t := ttft(r)) is not None], 90),
            "tpot_p50_s": _pct([t for r in ok if (t := tpot(r)) is not None], 50),
            "tpot_p90_s": _pct([t for r in ok if (t := tpot(r)) is not None], 90),
            "itl_p50_s": _pct(gaps, 50), "itl_p99_s": _pct(gaps, 99),
            "worst_gap_p50_s": _pct(worst, 50), "worst_gap_p90_s": _pct(worst, 90),
            "worst_gap_max_s": max(worst) if worst else None,
            "ok": len(ok), "requests": len(records),
        })
    out: dict = {}
    for key in per_run[0] if per_run else ():
        vals = [r[key] for r in per_run if r[key] is not None]
        out[key] = median(vals) if vals else None
        out[key + "_spread"] = [min(vals), max(vals)] if vals else None
    if decode_step_s:
        out["decode_step_s"] = decode_step_s
        for key in ("worst_gap_p50_s", "worst_gap_max_s"):
            if out.get(key) is not None:
                out[key.replace("_s", "_steps")] = out[key] / decode_step_s
    return out


def attainment_by_gap(runs: dict[str, Sequence[Sequence[RequestRecord]]], slo: SLO,
                      bounds: Sequence[float] = GAP_BOUNDS) -> dict[str, dict[str, float]]:
    """Per deployment, the median over its runs of the share of requests within `slo` with its stall bound
    set to each of `bounds` (TTFT and TPOT kept): the same runs judged again, so a verdict that turns on
    how long a stall the user tolerates shows where it turns."""
    return {d: {f"{b:g}": median(attainment(records, replace(slo, max_gap_s=b)) for records in rs)
                for b in bounds}
            for d, rs in runs.items() if rs}


def goodput_rejudged(runs_by_rate: dict[float, Sequence[Sequence[RequestRecord]]], slo: SLO,
                     target: float) -> tuple[float, float | None]:
    """A sweep's kept runs judged at another SLO: (highest probed rate passed below the lowest failed one, or 0;
    that lowest failed rate, or None). Exact only at an SLO at least as strict as the sweep's own: a run it
    stopped early was certain to fail that, so it fails any stricter one too; at a looser SLO it would
    not be."""
    passed = {rate: median(attainment(r, slo) for r in runs) >= target for rate, runs in runs_by_rate.items() if runs}
    failed = min((rate for rate, ok in passed.items() if not ok), default=None)
    lower = max((rate for rate, ok in passed.items() if ok and (failed is None or rate < failed)), default=0.0)
    return lower, failed


def run_seconds(requests: int, rate: float, drain_s: float) -> float:
    """How long one run of `requests` at `rate` lasts: the arrivals, then the last requests draining."""
    return requests / rate + drain_s


def planned_rates(lo: float, hi: float, resolution: float) -> list[float]:
    """The rates a sweep will probably probe when its goodput lies mid-bracket: lo, hi, then bisection."""
    steps = max(0, math.ceil(math.log2((hi - lo) / resolution))) if hi > lo else 0
    return [lo, hi] + [(lo + hi) / 2] * steps


def estimate_s(sweeps: dict[str, tuple[float, float, float, int]], deployments: int, trials: int) -> float:
    """The wall time of a measured sweep per workload (lo, hi, resolution, requests per run) and deployment."""
    per_deployment = sum(trials * sum(run_seconds(requests, r, TAIL_S) for r in planned_rates(lo, hi, res)) + SERVER_START_S
                         for lo, hi, res, requests in sweeps.values())
    return per_deployment * deployments


def table(measured: dict[str, dict[str, tuple[float, float | None]]], predicted: dict[str, dict[str, float]],
          band: dict[str, dict[str, tuple[float, float]]] | None = None) -> list[dict]:
    """Per workload and deployment: measured goodput bracket, predicted goodput, relative error; and per
    workload the measured and predicted winners, and whether the planner's pick is within the measured spread
    of the winner. `measured[w][d]` is (highest rate passed, lowest failed or None); `band[w][d]`, where
    given, the predicted goodput with every step slower and faster (plan local's band)."""
    rows = []
    for w, by_dep in measured.items():
        pred = predicted.get(w, {})
        best = winner({d: lo for d, (lo, _) in by_dep.items()})
        pick = winner({d: pred[d] for d in by_dep if d in pred}) if any(d in pred for d in by_dep) else None
        for d, (lo, hi) in by_dep.items():
            p = pred.get(d)
            ends = (band or {}).get(w, {}).get(d)
            span = None if ends is None or p is None else (min(p, *ends), max(p, *ends))
            rows.append({
                "workload": w, "deployment": d, "measured_goodput": lo, "measured_upper": hi,
                "predicted_goodput": p, "error": (p - lo) / lo if p is not None and lo > 0 else None,
                "prediction_holds": None if p is None else prediction_holds(p, lo, hi),
                "predicted_band": None if span is None else list(span),
                "band_holds": None if span is None else band_holds(*span, lo, hi),
                "measured_winner": best, "predicted_winner": pick,
                # None when no deployment passed even the lowest rate: nothing to agree with.
                "agrees": None if not any(g for g, _ in by_dep.values()) else pick is not None and within_spread(by_dep, pick),
            })
    return rows


PREDICTION_TOLERANCE = 0.15  # the bound on the planner's goodput error


def prediction_holds(predicted: float, lo: float, hi: float | None) -> bool:
    """A predicted goodput agrees with a measured bracket (`lo` the highest rate passed, `hi` the lowest
    failed, None when none failed) when it is within 15 % of `lo` or inside the bracket: the measurement
    cannot tell the rates between apart. A `lo` of 0 (not even the lowest rate passed) is matched only by a
    prediction below that lowest rate."""
    inside = predicted >= lo and (hi is None or predicted < hi)
    return inside or (lo > 0 and abs(predicted - lo) <= PREDICTION_TOLERANCE * lo)


def band_holds(slower: float, faster: float, lo: float, hi: float | None) -> bool:
    """Whether some goodput in the predicted band [slower, faster] holds against the measured bracket as
    prediction_holds judges one: within 15 % of `lo`, or in [lo, hi)."""
    reaches = faster >= lo * (1 - PREDICTION_TOLERANCE)
    below_top = slower <= lo * (1 + PREDICTION_TOLERANCE) or hi is None or slower < hi
    return reaches and below_top


def prediction_log_error(rows: list[dict]) -> dict:
    """How far the predictions sit from the measurements, not only whether each is within 15 %: the mean
    |ln(predicted / measured)| over cells where both passed the lowest rate (0.22 is a factor 1.25 either way),
    and how many cells one passed and the other did not. A change to the model that moves a cell across the
    15 % line by one request shows here as the small change it is."""
    both = [abs(math.log(r["predicted_goodput"] / r["measured_goodput"])) for r in rows
            if r.get("predicted_goodput") and r["measured_goodput"] > 0]
    one = sum(1 for r in rows if r.get("predicted_goodput") is not None
              and (r["predicted_goodput"] > 0) != (r["measured_goodput"] > 0))
    return {"prediction_log_error": sum(both) / len(both) if both else None, "prediction_log_error_cells": len(both),
            "prediction_pass_mismatches": one}


def headline(rows: list[dict], latency: dict[str, dict[str, dict]], seed_like: str | None,
             picks: dict[str, dict] | None = None) -> dict:
    """The benchmark's last line: the planner's agreement over workloads, and on the seed-like workload the
    1P1D p99 inter-token gap over colocated's (at the sweep's lowest rate, which every deployment runs) and
    the best split deployment's goodput over the best colocated one's. With `picks` (plan local's verdict
    per workload: robust, contenders), how often a pick held across the step-time band and how often the
    measured winner was among the contenders the planner named."""
    agree = {r["workload"]: r["agrees"] for r in rows if r["agrees"] is not None}
    held = [r["prediction_holds"] for r in rows if r.get("prediction_holds") is not None]
    in_band = [r["band_holds"] for r in rows if r.get("band_holds") is not None]
    out: dict = {"planner_winner_agreement": sum(agree.values()) / len(agree) if agree else None,
                 "workloads_judged": len(agree),
                 "predictions_holding": f"{sum(held)} of {len(held)}",
                 "split_stall_ratio_vs_colocated": None, "best_split_goodput_ratio": None}
    if in_band:
        out["predictions_holding_in_band"] = f"{sum(in_band)} of {len(in_band)}"
    out.update(prediction_log_error(rows))
    if picks:
        judged = {w: p for w, p in picks.items() if w in agree}
        out["robust_picks"] = f"{sum(p['robust'] for p in judged.values())} of {len(judged)}"
        measured = {w: {r["deployment"]: (r["measured_goodput"], r["measured_upper"]) for r in rows if r["workload"] == w}
                    for w in judged}
        hits = [any(c in measured[w] and within_spread(measured[w], c) for c in p["contenders"]) for w, p in judged.items()]
        out["planner_contender_agreement"] = sum(hits) / len(hits) if hits else None
    mixed = {r["deployment"]: r["measured_goodput"] for r in rows if r["workload"] == "mixed"}
    if "1p1d_conditional" in mixed and len(mixed) > 1:
        # Conditional placement's own case: does it beat both always splitting and never splitting?
        others = [g for d, g in mixed.items() if d != "1p1d_conditional"]
        out["conditional_wins_mixed"] = mixed["1p1d_conditional"] > max(others)
    if seed_like is None:
        return out
    lat = latency.get(seed_like, {})
    split_p99 = (lat.get("1p1d") or {}).get("itl_p99_s")
    colo_p99 = (lat.get("colocated") or {}).get("itl_p99_s")
    if split_p99 is not None and colo_p99:
        out["split_stall_ratio_vs_colocated"] = out["split_stall_ratio_at_rate_lo"] = split_p99 / colo_p99
    goodput = {r["deployment"]: r["measured_goodput"] for r in rows if r["workload"] == seed_like}
    split = [goodput[d] for d in SPLIT if d in goodput]
    colo = [goodput[d] for d in COLOCATED_FAMILY if d in goodput]
    if split and colo and max(colo) > 0:
        out["best_split_goodput_ratio"] = max(split) / max(colo)
    elif split and colo:
        out["best_split_goodput_ratio_note"] = (f"no colocated deployment passed the sweep's lowest rate; best split "
                                                f"goodput {max(split):g} req/s")
    return out
