"""The issue's own load, run as the issue ran it: does the split keep every request's worst stall within two
decode steps? (issue 19, "isolation that holds")

The seed's load (prompts lognormal mean 1,024 sigma 0.4, 128-token answers, 16 requests, Poisson at 0.2 req/s)
against each chosen deployment of `benchmarks.interference` (default 1P1D and colocated), --trials runs of their
own seeds each. Per deployment: TTFT, TPOT, inter-token p99 and the worst gap per request, in seconds and in the
run's own decode steps (median of the decode-only steps the workers logged), with what caused each request's
worst gap (`benchmarks.interference_stall`), and the share of requests within the SLO at stall bounds from
0.15 to 1 s. The goodput sweep measures at its bracket's rates; this is the one
rate the issue states its target at.

    python -m benchmarks.interference_seed [--deployments 1p1d,colocated] [--trials 3] [--rate 0.2] [--requests 16]
                                           [--reanalyse]

Writes results/interference/seed/result.json; its last line is a JSON object with each deployment's
`worst_gap_max_batch_steps` (the largest worst gap of any request, in decode steps at the batch size the worker
ran during that gap), `worst_gap_max_steps` (the same gap in the run's median decode step, mostly batch 1),
`worst_gap_p50_steps`, and `steps_ended_max` (the most decode steps that ended within any request's worst gap:
two at best for the hand-off from prefill to decode; the target's figure, <= 2). `--reanalyse` computes all of
it again from the runs and step logs an earlier invocation kept, without a server.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

from benchmarks.interference_measure import decode_step_s, serve_args, served
from benchmarks.interference_report import attainment_by_gap, latency_figures
from benchmarks.interference_stall import stall_breakdown
from benchmarks.interference_workloads import DEFAULT_SLO, cases
from splitserve.bench import BenchConfig, run_bench
from splitserve.bench.results import Run
from splitserve.bench.run_store import load_run, run_path
from splitserve.bench.runner import workload_at
from splitserve.plan.local_deployments import DEPLOYMENTS
from splitserve.workload.slo import summarize, worst_gap

OUT = Path("results") / "interference" / "seed"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--deployments", default="1p1d,colocated")
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--rate", type=float, default=0.2, help="req/s (the issue's: 0.2)")
    ap.add_argument("--requests", type=int, default=16, help="per run (the issue's: 16)")
    ap.add_argument("--chunk", type=int, default=128, help="--max-num-batched-tokens of the chunked deployment")
    ap.add_argument("--drain", type=float, default=60.0, help="seconds a run may take past its last arrival")
    ap.add_argument("--model", default=None)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--reanalyse", action="store_true", help="from the runs and step logs kept under --out, no server")
    args = ap.parse_args()
    deployments = [d.strip() for d in args.deployments.split(",") if d.strip()]
    for d in deployments:
        if d not in DEPLOYMENTS:
            raise SystemExit(f"unknown deployment {d!r}: one of {', '.join(DEPLOYMENTS)}")
    if args.trials < 1 or not args.rate > 0 or args.requests < 1:
        raise SystemExit("--trials and --requests must be >= 1 and --rate > 0")
    seed = cases(args.out, args.requests)["prompt_heavy"]
    started = time.time()
    doc: dict = {"load": repr(seed.load), "rate": args.rate, "requests": args.requests, "trials": args.trials,
                 "slo": repr(DEFAULT_SLO), "deployments": {}}
    for d in deployments:
        out = args.out / d
        runs = kept(out, args.trials) if args.reanalyse else measured(d, seed, args, out)
        step = decode_step_s(out / "steps")
        figures = latency_figures([run.records for run in runs], step)
        # The target is about every request: the largest worst gap over every run, not the median run's.
        worst = max((w for run in runs for r in run.records if r.ok and (w := worst_gap(r)) is not None), default=None)
        figures["worst_gap_all_runs_s"] = worst
        figures["worst_gap_all_runs_steps"] = worst / step if worst is not None and step else None
        stalls = stall_breakdown(runs, out / "steps", step)
        doc["deployments"][d] = {"serve_args": serve_args(d, args.chunk), "latency": figures, "stalls": stalls,
                                 "attainment_by_gap": attainment_by_gap({d: [run.records for run in runs]}, DEFAULT_SLO)[d]}
        print(f"[{d}] decode step {'n/a' if step is None else f'{step * 1e3:.0f} ms'}; worst gap per request p50 "
              f"{figures.get('worst_gap_p50_steps')} steps, largest {figures['worst_gap_all_runs_steps']} steps "
              f"({stalls['gap_batch_steps_max']} steps at its batch); at most {stalls['steps_ended_max']} decode "
              f"steps ended within one ({stalls['requests_over_2_steps']} requests over 2); "
              f"causes { {c: v['requests'] for c, v in stalls['causes'].items() if v['requests']} }", file=sys.stderr)
    if not args.reanalyse:
        doc.update(wall_s=time.time() - started, load_average_at_end=os.getloadavg(), cpus=os.cpu_count())
    elif (args.out / "result.json").is_file():  # the measuring invocation's own record of its machine stays
        earlier = json.loads((args.out / "result.json").read_text())
        doc.update({k: earlier[k] for k in ("wall_s", "load_average_at_end", "cpus") if k in earlier})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "result.json").write_text(json.dumps(doc, indent=1))
    print(json.dumps({d: {"worst_gap_max_batch_steps": v["stalls"]["gap_batch_steps_max"],
                          "worst_gap_max_steps": v["latency"]["worst_gap_all_runs_steps"],
                          "steps_ended_max": v["stalls"]["steps_ended_max"],
                          "worst_gap_p50_steps": v["latency"].get("worst_gap_p50_steps"),
                          "itl_p99_s": v["latency"].get("itl_p99_s"), "decode_step_s": v["latency"].get("decode_step_s")}
                      for d, v in doc["deployments"].items()}))


def measured(d: str, seed, args: argparse.Namespace, out: Path) -> list[Run]:
    """--trials runs of the seed's load on deployment `d`, each on its own seed, on one server."""
    runs: list[Run] = []
    # Every trial is run afresh: an earlier run's step logs would only be laid over gaps not theirs.
    for old in (out / "steps").glob("steps-*.jsonl"):
        old.unlink()
    with served(d, serve_args(d, args.chunk), out, args.model) as url:
        for trial in range(args.trials):
            load = replace(seed.load, rate=args.rate, seed=seed.load.seed + trial)
            result = run_bench(BenchConfig(load=load, url=url, tokenizer=args.model, slo=DEFAULT_SLO, timeout_s=120.0,
                                           deadline_s=workload_at(load, None, None, 0).requests[-1].arrival_s + args.drain,
                                           out_dir=out / f"trial-{trial}"))
            runs += result.runs
    return runs


def kept(out: Path, trials: int) -> list[Run]:
    """The runs an earlier invocation kept under `out` (bench's run files), to analyse again."""
    runs = []
    for trial in range(trials):
        path = run_path(out / f"trial-{trial}", None, 0)
        if (kept := load_run(path, None)) is None:
            raise SystemExit(f"no kept run at {path}: run without --reanalyse first")
        records, started = kept
        runs.append(Run(None, trial, None, records, summarize(records, DEFAULT_SLO), started))
    return runs


if __name__ == "__main__":
    main()
