"""Where splitting pays on this 2-core machine: five deployments of equal hardware, loads with real decode,
an SLO that counts the stall, measured goodput beside the planner's prediction (issue 19).

Deployments (benchmarks/interference_measure.py has their `splitserve serve` flags), the bundled SmolLM2-135M:
  colocated          one worker, 2 threads
  replicas           two colocated workers, one core and one thread each
  chunked            one worker, 2 threads, at most --chunk tokens a step
  1p1d               prefill and decode worker pinned to a core each, every prompt split (--no-conditional)
  1p1d_conditional   the same, the router prefilling a prompt on the decode worker when its costs say so
Workloads (benchmarks/interference_workloads.py): prompt_heavy (the seed's: lognormal 1,024 sigma 0.4 / 128
out), mooncake (conversations, prompts x1/32, answers x1/4), azure_code (prompts x1/8, answers kept),
short_prompts (64 / 128: splitting should lose), mixed (70 % ~64-token, 30 % ~1,024-token prompts: conditional's case).
SLO: TTFT <= 8 s, mean TPOT <= 0.25 s and no gap between two tokens over 0.5 s (--slo-*), for >= 90 % of
requests. Goodput: `splitserve bench`'s sweep over the workload's rate bracket, --trials runs per rate judged
by their median attainment; the latencies (TTFT, TPOT, inter-token p99, worst gap per request, in seconds and
in decode steps of the same run from the workers' step logs) are medians over the trials of each rate, with
their spread.

The planner (splitserve/plan/local_deployments.py) simulates each deployment from this machine's calibration
(one for a 1-thread worker, one for a 2-thread worker: --calibration-1t/-2t, made as `splitserve plan
calibrate --threads N` does when missing; the 2-thread one times wall clock, so make it on a quiet machine)
through the same core Scheduler and Router, over the same requests and
sweep, and names the winner per workload: what `splitserve plan` tells a user of this machine. Beside it
(`with_serving_speed` in result.json) the same planner with each deployment at its serving speed: how much
slower than calibrated its engine's steps ran while serving, from the step logs the other workloads' sweeps
kept (benchmarks/interference_speed.py; never the predicted workload's own). And (`with_served_calibration`)
the same planner with both calibrations fitted again to those served steps, shape by shape (`splitserve plan
calibrate --from-step-logs`, splitserve/calibrate/from_steps.py), again from the other workloads' runs only.

    python -m benchmarks.interference [--quick] [--workloads a,b] [--deployments a,b] [--trials 3]
                                      [--requests 20] [--predict-only] [--estimate-only]

Prints the estimated wall time first. Writes results/interference/result.json, results/interference.png and
bench's own files per workload and deployment under results/interference/<workload>/<deployment>/; the last
line printed is a JSON object with planner_winner_agreement, split_stall_ratio_vs_colocated and
best_split_goodput_ratio. The full run needs hours of a quiet machine (the estimate says how many).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

from benchmarks.interference_report import attainment_by_gap, estimate_s, goodput_rejudged, headline, table
from benchmarks.interference_speed import held_out_calibrations, held_out_speed, speed_by_workload, workload_sums
from benchmarks.interference_workloads import DEFAULT_SLO, cases
from splitserve.bench.run_store import load_run, run_path
from splitserve.calibrate.table import Calibration
from splitserve.plan.local_deployments import DEPLOYMENTS, Machine, predict_goodput, winner
from splitserve.plan.local_pick import pick_deployment
from splitserve.runtime.config import DECODE_PREFILL_CHUNK
from splitserve.runtime.frontend.pool_client import PoolConfig
from splitserve.workload.goodput import Bracket
from splitserve.workload.record import RequestRecord
from splitserve.workload.slo import SLO

OUT = Path("results") / "interference"
# 20 requests a run, 3 runs a rate, the bracket bisected to a sixth of its width: ~7 h for the 25 sweeps.
REQUESTS, TRIALS, PARTS = 20, 3, 6
DRAIN_S = 60.0
# The stricter stall bound every sweep's runs are judged again at (half the default SLO's): chunked prefill
# keeps stalls under 0.5 s at 128-token chunks, not under this; a split's decode worker does.
TIGHT_GAP_S = 0.25
# `splitserve plan local`'s default band: every step this fraction slower and faster. A served engine's steps
# ran 0.84-1.27x the calibration here (plan/local_deployments.py), and picks turned on single requests at an
# SLO's edge; the band says which picks are that close.
BAND = 0.1


def calibration(path: Path, threads: int, quick: bool) -> Calibration:
    """This machine's calibration for a worker of `threads` threads: from `path`, or made now and saved there."""
    if path.is_file():
        cal = Calibration.load(path)
        if cal.machine.get("threads") != threads:
            raise SystemExit(f"{path} was calibrated with {cal.machine.get('threads')} threads, not {threads}")
        return cal
    from splitserve.calibrate.profile import calibrate

    print(f"calibrating a {threads}-thread worker (splitserve plan calibrate{' --quick' if quick else ''})...", file=sys.stderr)
    cal = calibrate(None, threads, quick, cpu_time=threads == 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    cal.save(path)
    return cal


def bracket(case, resolution_parts: int) -> Bracket:
    """The bracket `splitserve bench`'s sweep searches (SweepConfig's), so both sides probe alike."""
    return Bracket(case.rate_lo, case.rate_hi, (case.rate_hi - case.rate_lo) / resolution_parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="8 requests, 1 trial, a 2-part bisection: a smoke test")
    ap.add_argument("--workloads", default=None, help="comma-separated (default: all)")
    ap.add_argument("--deployments", default=",".join(DEPLOYMENTS))
    ap.add_argument("--requests", type=int, default=None, help=f"requests per run (default {REQUESTS}; --quick 8), at least a workload's own minimum")
    ap.add_argument("--trials", type=int, default=None, help=f"runs per probed rate (default {TRIALS}; --quick 1)")
    ap.add_argument("--parts", type=int, default=None, help=f"bisection stops at (rate_hi - rate_lo) / PARTS "
                                                            f"(default {PARTS}; --quick 2)")
    ap.add_argument("--attainment", type=float, default=0.9)
    ap.add_argument("--slo-ttft", type=float, default=DEFAULT_SLO.ttft_s)
    ap.add_argument("--slo-tpot", type=float, default=DEFAULT_SLO.tpot_s)
    ap.add_argument("--slo-gap", type=float, default=DEFAULT_SLO.max_gap_s, help="worst gap between two tokens, s")
    ap.add_argument("--chunk", type=int, default=128, help="--max-num-batched-tokens of the chunked deployment")
    ap.add_argument("--drain", type=float, default=DRAIN_S, help="seconds a run may take past its last arrival")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    ap.add_argument("--model", default=None, help="as for `splitserve serve` (default: bundled SmolLM2-135M)")
    # Its own calibrations, made by the first run when missing, so that they are of the engine this table
    # measures (results/sim_accuracy/calibration.json belongs to that benchmark's figures).
    ap.add_argument("--calibration-1t", type=Path, default=None, help="default OUT/calibration-1t.json")
    ap.add_argument("--calibration-2t", type=Path, default=None, help="default OUT/calibration-2t.json")
    ap.add_argument("--out", type=Path, default=OUT, help="where results go (the plot beside it: OUT/../interference.png)")
    ap.add_argument("--quick-calibration", action="store_true", help="the coarse grid if a calibration is made")
    ap.add_argument("--predict-only", action="store_true", help="the planner's table only, no server")
    ap.add_argument("--estimate-only", action="store_true", help="print the wall-time estimate and stop")
    args = ap.parse_args()
    quick = dict(requests=8, trials=1, parts=2) if args.quick else dict(requests=REQUESTS, trials=TRIALS, parts=PARTS)
    for key, value in quick.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    out = args.out
    args.calibration_1t = args.calibration_1t or out / "calibration-1t.json"
    args.calibration_2t = args.calibration_2t or out / "calibration-2t.json"
    every = cases(out, args.requests)
    names = [w.strip() for w in (args.workloads or ",".join(every)).split(",") if w.strip()]
    deployments = [d.strip() for d in args.deployments.split(",") if d.strip()]
    for w in names:
        if w not in every:
            raise SystemExit(f"unknown workload {w!r}: one of {', '.join(every)}")
    for d in deployments:
        if d not in DEPLOYMENTS:
            raise SystemExit(f"unknown deployment {d!r}: one of {', '.join(DEPLOYMENTS)}")
    chosen = {w: every[w] for w in names}
    slo = SLO(args.slo_ttft, args.slo_tpot, args.slo_gap)

    sweeps = {w: (c.rate_lo, c.rate_hi, (c.rate_hi - c.rate_lo) / args.parts, c.num_requests) for w, c in chosen.items()}
    full = {w: (c.rate_lo, c.rate_hi, (c.rate_hi - c.rate_lo) / PARTS, c.num_requests)
            for w, c in cases(out, REQUESTS).items()}
    this_run = estimate_s(sweeps, len(deployments), args.trials)
    print(f"estimated wall time: this run ~{this_run / 3600:.1f} h ({len(chosen)} workloads x {len(deployments)} "
          f"deployments, {args.requests} requests (or a workload's minimum) x {args.trials} trials per rate); the "
          f"full default run ~{estimate_s(full, len(DEPLOYMENTS), TRIALS) / 3600:.1f} h on a quiet machine", file=sys.stderr)
    if args.estimate_only:
        return

    from benchmarks.sim_accuracy import loopback_bandwidth

    machine = Machine(calibration(args.calibration_1t, 1, args.quick_calibration),
                      calibration(args.calibration_2t, 2, args.quick_calibration),
                      loopback_bandwidth(), chunk=args.chunk, decode_prefill_chunk=DECODE_PREFILL_CHUNK,
                      admit_wait_s=PoolConfig.admit_wait_s, admit_waiting=PoolConfig.max_waiting)
    # Every workload's kept sweeps give the serving speed; each prediction uses the other workloads' only.
    sums = workload_sums(out, every, DEPLOYMENTS, machine)
    predicted: dict[str, dict[str, float]] = {}
    predicted_served: dict[str, dict[str, float]] = {}
    predicted_tight: dict[str, dict[str, float]] = {}
    prediction_probes: dict[str, dict[str, list]] = {}
    predicted_band: dict[str, dict[str, tuple[float, float]]] = {}
    predicted_refit: dict[str, dict[str, float]] = {}
    refit_report: dict[str, dict] = {}
    picks: dict[str, dict] = {}
    speeds: dict[str, dict[str, float]] = {}
    tight = SLO(slo.ttft_s, slo.tpot_s, TIGHT_GAP_S)
    for w, case in chosen.items():
        speeds[w] = held_out_speed(sums, w)
        served = replace(machine, serving_speed=speeds[w])
        refitted, refit_report[w] = held_out_calibrations(out, every, w, machine)
        def requests_at(rate: float, trial: int) -> list:
            return case.requests(rate, trial).requests

        # What `splitserve plan local` tells the user: each goodput, and again with every step BAND slower and faster.
        pick = pick_deployment(machine, deployments, requests_at, slo, bracket(case, args.parts), args.trials,
                               args.attainment, BAND)
        predicted[w] = {g.deployment: g.goodput for g in pick.deployments}
        prediction_probes[w] = {g.deployment: [{"rate": p.rate, "median": p.median} for p in g.nominal.probes]
                                for g in pick.deployments}
        predicted_band[w] = {g.deployment: (g.slower, g.faster) for g in pick.deployments}
        picks[w] = {"winner": pick.winner, "robust": pick.robust, "contenders": list(pick.contenders()),
                    "winner_slower": pick.winner_slower, "winner_faster": pick.winner_faster}
        predicted_served[w], predicted_tight[w], predicted_refit[w] = {}, {}, {}
        for d in deployments:
            predicted_tight[w][d] = predict_goodput(machine, d, requests_at, tight, bracket(case, args.parts), args.trials,
                                                    args.attainment).lower
            predicted_served[w][d] = predict_goodput(served, d, requests_at, slo, bracket(case, args.parts),
                                                     args.trials, args.attainment).lower
            predicted_refit[w][d] = predict_goodput(refitted, d, requests_at, slo, bracket(case, args.parts),
                                                    args.trials, args.attainment).lower
        print(f"[{w}] predicted goodput (req/s): {predicted[w]} (at the serving speed of the other workloads' runs "
              f"{predicted_served[w]}; with calibrations fitted to their served steps {predicted_refit[w]}); at a {TIGHT_GAP_S:g} s stall bound {predicted_tight[w]}; with steps "
              f"±{BAND:.0%} {predicted_band[w]}; predicted winner "
              f"{pick.winner or 'none (no deployment passed the lowest rate)'}"
              f"{'' if pick.robust else f' (not robust: contenders {pick.contenders()})'}", file=sys.stderr)

    started = time.time()
    measured: dict[str, dict[str, dict]] = {}
    if not args.predict_only:
        from benchmarks.interference_measure import measure

        for w, case in chosen.items():
            print(f"[{w}] {case.why}", file=sys.stderr)
            measured[w] = {d: measure(case, d, slo, trials=args.trials, resolution=(case.rate_hi - case.rate_lo) / args.parts,
                                      attainment=args.attainment, chunk=args.chunk, drain_s=args.drain,
                                      timeout_s=args.timeout, out=out / w / d, model=args.model)
                           for d in deployments}

    brackets_measured = {w: {d: (m["goodput"], m["upper"]) for d, m in by.items()} for w, by in measured.items()}
    rows = table(brackets_measured, predicted, predicted_band)
    rows_served = table(brackets_measured, predicted_served)
    rows_refit = table(brackets_measured, predicted_refit)
    lowest = {w: {d: m["latency_by_rate"].get(f"{chosen[w].rate_lo:g}", {}) for d, m in by.items()}
              for w, by in measured.items()}
    seed_like = next((w for w, c in chosen.items() if c.seed_like), None)
    head = headline(rows, lowest, seed_like, picks)
    by_gap = {w: attainment_by_gap({d: kept_runs(out / w / d, chosen[w].rate_lo, args.trials) for d in by}, slo)
              for w, by in measured.items()}
    tight_goodput = {w: {d: goodput_rejudged({p["rate"]: kept_runs(out / w / d, p["rate"], args.trials) for p in m["probes"]},
                                             tight, args.attainment)
                         for d, m in by.items()}
                     for w, by in measured.items()}
    tight_rows = table(tight_goodput, predicted_tight)
    tight_head = headline(tight_rows, {}, None)
    if "conditional_wins_mixed" in tight_head:
        head["conditional_wins_mixed_tight_stall"] = tight_head["conditional_wins_mixed"]
    head.update(seed_stall_ratio(out / "seed" / "result.json"))
    doc = {
        **head,
        "slo": {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s, "max_gap_s": slo.max_gap_s, "attainment": args.attainment},
        "workloads": {w: {"why": c.why, "rate_lo": c.rate_lo, "rate_hi": c.rate_hi, "requests": c.num_requests,
                          "load": repr(c.load)} for w, c in chosen.items()},
        "trials": args.trials, "parts": args.parts, "chunk_tokens": args.chunk,
        "decode_prefill_chunk": DECODE_PREFILL_CHUNK,
        "calibrations": {"1t": str(args.calibration_1t), "2t": str(args.calibration_2t)},
        "link_bw": machine.link_bw,
        "table": rows,
        "predicted": predicted, "prediction_probes": prediction_probes,
        # The same planner with every step BAND slower and faster: (goodput slower, goodput faster) per
        # deployment, and per workload whether the pick holds across it and which deployments win somewhere in it.
        "band": BAND, "predicted_band": predicted_band, "picks": picks,
        # The planner again with each deployment's steps slowed (or sped) by what serving did to them on the
        # other workloads: a refinement a user has only after serving loads on the machine.
        "with_serving_speed": {"predicted": predicted_served, "table": rows_served,
                               **{k: v for k, v in headline(rows_served, {}, None).items()
                                  if k in ("planner_winner_agreement", "predictions_holding", "prediction_log_error")}},
        "serving_speed_used": speeds, "serving_speed_by_workload": speed_by_workload(sums),
        # The planner again with both calibrations fitted to the steps the other workloads' sweeps served
        # (`splitserve plan calibrate --from-step-logs`): each step shape at its served time.
        "with_served_calibration": {"predicted": predicted_refit, "table": rows_refit, "fits": refit_report,
                                    **{k: v for k, v in headline(rows_refit, {}, None).items()
                                       if k in ("planner_winner_agreement", "predictions_holding", "prediction_log_error")}},
        "measured": measured,
        "latency_at_rate_lo": lowest,
        "attainment_by_gap_at_rate_lo": by_gap,
        # Each sweep's own runs judged at the stricter stall bound: (highest probed rate passed, lowest failed).
        "goodput_at_tight_stall": {"max_gap_s": TIGHT_GAP_S, "table": tight_rows,
                                   **{k: v for k, v in tight_head.items() if k.startswith("prediction") or k == "planner_winner_agreement"}},
        "cpus": os.cpu_count(), "load_average_at_end": os.getloadavg(),
        "wall_s": time.time() - started, "quick": args.quick,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(doc, indent=1))
    if measured:
        from benchmarks.interference_plot import plot

        plot(doc, out.parent / "interference.png")
    print(json.dumps({**head, "planner_winner_agreement_tight_stall": doc["goodput_at_tight_stall"]["planner_winner_agreement"],
                      "planner_winner_agreement_served_calibration": doc["with_served_calibration"].get("planner_winner_agreement"),
                      "predicted_winners": {w: winner(p) for w, p in predicted.items()},
                      "measured_goodput": {w: {d: m["goodput"] for d, m in by.items()} for w, by in measured.items()},
                      "load_average": os.getloadavg(), "quick": args.quick}))


def seed_stall_ratio(path: Path) -> dict:
    """1P1D's inter-token p99 over colocated's at the issue's own rate (benchmarks.interference_seed, 0.2 req/s),
    when that run is there: the sweep's lowest rate (0.1 req/s) has too few prompts arriving beside a decode
    for a p99 over every gap to show their stalls. The lowest rate's ratio stays, named for it."""
    if not path.is_file():
        return {}
    runs = json.loads(path.read_text())["deployments"]
    p99 = {d: (runs.get(d) or {}).get("latency", {}).get("itl_p99_s") for d in ("1p1d", "colocated")}
    if p99["1p1d"] is None or not p99["colocated"]:
        return {}
    return {"split_stall_ratio_vs_colocated": p99["1p1d"] / p99["colocated"],
            "split_stall_ratio_source": f"{path} (0.2 req/s)"}


def kept_runs(out: Path, rate: float, trials: int) -> list[list[RequestRecord]]:
    """The records of the runs bench kept for `rate` under out/bench/runs (those that exist)."""
    return [kept[0] for trial in range(trials) if (kept := load_run(run_path(out / "bench", rate, trial), None))]


if __name__ == "__main__":
    main()
