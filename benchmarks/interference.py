"""Prefill/decode interference under a prompt-heavy trace: colocated, colocated with chunked prefill, 1P1D.

Three deployments of the bundled SmolLM2-135M, each through `splitserve serve` and the same frontend code
path, on this machine's 2 cores:
  colocated   one colocated worker, 2 threads (both cores)
  chunked     the same, with --chunked-prefill --max-num-batched-tokens CHUNK
  1p1d        one prefill and one decode worker, pinned to one core each, 1 thread each
The load is the Azure code trace (../shared/traces/AzureLLMInferenceTrace_code.csv) through `splitserve
bench` (run_bench): its first requests, lengths x LENGTH_SCALE, arrivals scaled to the asked rate. For
each deployment: one fixed-rate run of FIXED_REQUESTS at a common RATE (TTFT and inter-token latency
distributions), then the goodput sweep over the first REQUESTS: the highest rate at which >= 90 % of requests meet both the TTFT
and the TPOT SLO, by bisection over [RATE_LO, RATE_HI], each probed rate judged by the median of TRIALS.

Scales and SLOs, chosen for a quiet 2-core machine (SmolLM2 prefill ~330 tok/s and batch-1 decode ~18
tok/s on one core):
  length x1/8: mean prompt ~340 tokens (~1 s of one-core prefill), longest 930 (~3 s); outputs 1-3 tokens
    (the trace's outputs are short, and the one scale shrinks them too);
  20 requests per trial: a trial at the 1P1D's prefill capacity (~1 req/s) takes ~20-30 s, the whole
    run ~25 min (--quick: 12 requests, 1 trial, ~10 min);
  TTFT SLO 4 s: the longest prompts' one-core prefill (~3 s) plus a queue of about one mean prompt;
  TPOT SLO 0.15 s: about 3x a one-core batch-1 decode step (~55 ms): room for batching, none for a
    whole prompt's prefill stalling a decode step;
  CHUNK 64 tokens: a chunked step of 64 prompt tokens on 2 threads takes ~0.1 s, inside the TPOT SLO.

    python -m benchmarks.interference [--quick] [--rate 0.6] [--rate-lo 0.4] [--rate-hi 2.4] [--trials 3]

Writes results/interference.json, results/interference.png, and bench's own result.json and plots per
deployment and run under results/interference/; the last line printed is a JSON object with
goodput_ratio_vs_colocated (1P1D / colocated goodput; target >= 3) and goodput_ratio_vs_chunked (target
>= 1.5), the goodputs, SLOs and scales.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np

from benchmarks.netns import Service, credentials
from splitserve.workload import slo as metrics
from splitserve.workload.slo import SLO
from splitserve.bench.results import summary_dict
from splitserve.bench import BenchConfig, BenchResult, SweepConfig, TraceLoad, run_bench
from splitserve.runtime.process import free_port
from splitserve.workload.requests import Scaling, at_rate, from_trace, read_trace

RESULTS = Path("results")
TRACE = Path(__file__).resolve().parents[1].parent / "shared" / "traces" / "AzureLLMInferenceTrace_code.csv"
DEPLOYMENTS = ("colocated", "chunked", "1p1d")
LABELS = {"colocated": "colocated, 2 threads", "chunked": "colocated + chunked prefill", "1p1d": "1P1D, pinned"}


def serve_args(deployment: str, chunk: int, split_only: bool = False) -> list[str]:
    if deployment == "colocated":
        return ["--colocated", "1", "--threads", "2"]
    if deployment == "chunked":
        return ["--colocated", "1", "--threads", "2", "--chunked-prefill", "--max-num-batched-tokens", str(chunk)]
    if deployment == "1p1d":
        return ["--prefill", "1", "--decode", "1", "--pin", "--threads", "1", *(["--no-conditional"] if split_only else [])]
    raise ValueError(f"unknown deployment {deployment!r}")


def goodput_ratio(num: dict, den: dict) -> float | None:
    """num's goodput / den's, each the highest rate that passed (0 when even rate_lo failed); None when den's
    is 0. A sweep that passed rate_hi (upper None) only bounds its goodput from below: so does the ratio."""
    return num["goodput"] / den["goodput"] if den["goodput"] > 0 else None


def cdf(values: list[float]) -> tuple[np.ndarray, np.ndarray]:
    x = np.sort(np.asarray(values, dtype=float))
    return x, np.arange(1, len(x) + 1) / max(1, len(x))


def latencies(result: BenchResult) -> dict[str, list[float]]:
    """TTFT and inter-token gaps of the successful requests of a single run."""
    ok = [r for r in result.runs[-1].records if r.ok]
    return {"ttft_s": [v for v in map(metrics.ttft, ok) if v is not None],
            "itl_s": [g for r in ok for g in metrics.itls(r)]}


def run_deployment(name: str, args: argparse.Namespace, scaling: Scaling, fixed_scaling: Scaling, slo: SLO,
                   out: Path) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    model = ["--model", args.model] if args.model else []
    flags = serve_args(name, args.chunk, args.split_only)
    server = Service(f"serve-{name}", ["serve", "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
                                       *flags, *model], None, out / "logs")
    try:
        server.wait_healthy(url)
        httpx.post(url + "/v1/completions", json={"prompt": "warm up", "max_tokens": 4}, timeout=120).raise_for_status()
        base = dict(url=url, tokenizer=args.model, slo=slo, attainment=args.attainment, timeout_s=args.timeout)
        fixed = run_bench(BenchConfig(
            load=TraceLoad(str(args.trace), "azure", fixed_scaling),
            deadline_s=args.fixed_requests / args.rate + args.drain, out_dir=out / name / "fixed", **base))
        # Where the frontend sent each request (past the warm-up): 1P1D's router may prefill on the decode worker.
        with credentials().client() as operator:
            records = operator.get(url + "/debug/requests", params={"limit": 10_000}).json()[1:]
        paths = Counter(r["path"] for r in records)
        print(f"[{name}] rate {args.rate:g}: attainment {fixed.summary.attainment:.2f}, "
              f"TTFT p90 {_s(fixed.summary.ttft.p90)}, TPOT p90 {_s(fixed.summary.tpot.p90)}, paths {dict(paths)}",
              file=sys.stderr)
        sweep = run_bench(BenchConfig(
            load=TraceLoad(str(args.trace), "azure", scaling),
            sweep=SweepConfig(args.rate_lo, args.rate_hi, args.trials, args.resolution),
            deadline_s=args.requests / args.rate_lo + args.drain, out_dir=out / name / "sweep", **base))
        s = sweep.sweep
        assert s is not None
        print(f"[{name}] goodput {s.goodput} req/s (in [{s.lower:g}, {s.upper}])", file=sys.stderr)
    finally:
        server.stop()
    return {
        "serve_args": flags,
        "fixed_rate": {"rate": args.rate, "paths": dict(paths), "summary": summary_dict(fixed.runs[-1]),
                       **latencies(fixed)},
        # s.lower is the highest rate that passed, 0 if none did: the goodput, in [lower, upper].
        "sweep": {"goodput": s.lower, "upper": s.upper,
                  "probes": [{"rate": p.rate, "attainments": list(p.attainments), "median": p.median,
                              "passed": p.passed} for p in s.probes]},
    }


def describe(trace_path: Path, scaling: Scaling) -> dict:
    """What the scaled trace asks of the server: the lengths, and the rate before any rate scaling."""
    w = from_trace(read_trace(trace_path, "azure"), scaling)
    prompts = [r.input_len for r in w.requests]
    outputs = [r.output_len for r in w.requests]
    return {"requests": len(prompts), "prompt_tokens_mean": float(np.mean(prompts)), "prompt_tokens_max": max(prompts),
            "output_tokens_mean": float(np.mean(outputs)), "output_tokens_max": max(outputs),
            "trace_rate_req_s": w.mean_rate}


def at_rate_scaling(trace_path: Path, scaling: Scaling, rate: float) -> Scaling:
    """`scaling` with the time scale that gives a mean of `rate` req/s: the sweep's own rate mapping."""
    return replace(scaling, time_scale=at_rate(read_trace(trace_path, "azure"), scaling, rate).params["time_scale"])


def _s(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f} s"


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ta, ia, ga) = plt.subplots(1, 3, figsize=(15, 4.2))
    slo = doc["slo"]
    for name, d in doc["deployments"].items():
        fixed = d["fixed_rate"]
        for ax, key in ((ta, "ttft_s"), (ia, "itl_s")):
            if fixed[key]:
                x, y = cdf(fixed[key])
                ax.step(x, y, where="post", label=f"{LABELS[name]} (n={len(x)})")
        probes = sorted(d["sweep"]["probes"], key=lambda p: p["rate"])
        ga.plot([p["rate"] for p in probes], [p["median"] for p in probes], "-o", label=f"{LABELS[name]}: "
                f"goodput {d['sweep']['goodput']:.3g}")
    ta.axvline(slo["ttft_s"], color="grey", linestyle="--", linewidth=1, label="TTFT SLO")
    ia.axvline(slo["tpot_s"], color="grey", linestyle="--", linewidth=1, label="TPOT SLO")
    ga.axhline(doc["attainment_target"], color="grey", linestyle="--", linewidth=1, label="target")
    rate = doc["workload"]["fixed"]["rate"]
    ta.set(title=f"TTFT at {rate:g} req/s", xlabel="s", ylabel="cumulative fraction", xscale="log")
    ia.set(title=f"inter-token latency at {rate:g} req/s", xlabel="s", xscale="log")
    ga.set(title=f"SLO attainment vs rate (median of trials)\n1P1D goodput / colocated: "
                 f"{_fmt(doc['goodput_ratio_vs_colocated'])}, / chunked: {_fmt(doc['goodput_ratio_vs_chunked'])}",
           xlabel="req/s", ylim=(-0.02, 1.02))
    for ax in (ta, ia, ga):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="12 requests, 1 trial, a coarse sweep: a smoke test")
    ap.add_argument("--deployments", default=",".join(DEPLOYMENTS))
    ap.add_argument("--trace", type=Path, default=TRACE)
    ap.add_argument("--model", default=None, help="as for `splitserve serve` (default: bundled SmolLM2-135M)")
    ap.add_argument("--length-scale", type=float, default=1 / 8)
    ap.add_argument("--requests", type=int, default=20, help="the trace's first N requests, every sweep trial")
    ap.add_argument("--fixed-requests", type=int, default=40, help="the trace's first N requests, fixed-rate runs")
    ap.add_argument("--rate", type=float, default=0.6, help="req/s of the fixed-rate runs (latency distributions)")
    ap.add_argument("--rate-lo", type=float, default=0.4)
    ap.add_argument("--rate-hi", type=float, default=2.4)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--resolution", type=float, default=0.25, help="req/s: bisection stops at this bracket")
    ap.add_argument("--slo-ttft", type=float, default=4.0)
    ap.add_argument("--slo-tpot", type=float, default=0.15)
    ap.add_argument("--attainment", type=float, default=0.9)
    ap.add_argument("--chunk", type=int, default=64, help="--max-num-batched-tokens of the chunked deployment")
    ap.add_argument("--split-only", action="store_true",
                    help="1P1D: every prompt on the prefill worker (default: serve's router may use the decode worker)")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    ap.add_argument("--drain", type=float, default=60.0, help="seconds a run may take past its last arrival")
    args = ap.parse_args()
    if args.quick:
        args.requests, args.fixed_requests, args.trials = 12, 12, 1
        args.resolution = (args.rate_hi - args.rate_lo) / 4
    names = [d.strip() for d in args.deployments.split(",") if d.strip()]
    for n in names:
        serve_args(n, args.chunk)  # unknown names fail before anything starts

    scaling = Scaling(length_scale=args.length_scale, max_requests=args.requests)
    slo = SLO(args.slo_ttft, args.slo_tpot)
    fixed_scaling = at_rate_scaling(args.trace, replace(scaling, max_requests=args.fixed_requests), args.rate)
    workload = {"trace": str(args.trace), "length_scale": args.length_scale,
                "sweep": {**describe(args.trace, scaling), "rate_lo": args.rate_lo, "rate_hi": args.rate_hi,
                          "trials": args.trials, "resolution": args.resolution,
                          "time_scale": "per probed rate: trace arrivals scaled to that mean rate (bench's at_rate)"},
                "fixed": {**describe(args.trace, fixed_scaling), "rate": args.rate,
                          "time_scale": fixed_scaling.time_scale}}
    print(f"workload: {json.dumps(workload)}; SLO TTFT {args.slo_ttft:g} s, TPOT {args.slo_tpot:g} s, "
          f"attainment {args.attainment:g}; chunk {args.chunk} tokens", file=sys.stderr)
    out = RESULTS / "interference"
    started = time.time()
    deployments = {n: run_deployment(n, args, scaling, fixed_scaling, slo, out) for n in names}

    sweeps = {n: d["sweep"] for n, d in deployments.items()}
    vs = {other: goodput_ratio(sweeps["1p1d"], sweeps[other]) if "1p1d" in sweeps and other in sweeps else None
          for other in ("colocated", "chunked")}
    doc = {
        "goodput_ratio_vs_colocated": vs["colocated"],
        "goodput_ratio_vs_chunked": vs["chunked"],
        "targets": {"goodput_ratio_vs_colocated": ">= 3", "goodput_ratio_vs_chunked": ">= 1.5"},
        "goodput_req_s": {n: s["goodput"] for n, s in sweeps.items()},
        "slo": {"ttft_s": args.slo_ttft, "tpot_s": args.slo_tpot},
        "attainment_target": args.attainment,
        "workload": workload,
        "chunk_tokens": args.chunk,
        "split_only": args.split_only,
        "cpus": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
        "wall_s": time.time() - started,
        "deployments": deployments,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "interference.json").write_text(json.dumps(doc, indent=1))
    plot(doc, RESULTS / "interference.png")
    print(json.dumps({k: doc[k] for k in ("goodput_ratio_vs_colocated", "goodput_ratio_vs_chunked", "goodput_req_s",
                                          "slo", "workload", "chunk_tokens")}))


if __name__ == "__main__":
    main()
