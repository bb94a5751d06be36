"""`splitserve bench`: argument parsing and exit codes around run_bench; `splitserve bench compare A B`.

Exit codes: 0 done; 1 the run finished but no request succeeded; 2 bad input (one line on stderr, no
traceback); 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from rich.console import Console

from splitserve.bench.config import BenchConfig, BenchConfigError, SweepConfig, TraceLoad
from splitserve.bench.report import compare, print_result
from splitserve.bench.results import ResultFileError
from splitserve.bench.runner import USER_ERRORS, run_bench
from splitserve.workload.requests import LengthDist, Scaling, SyntheticSpec
from splitserve.workload.slo import SLO

PROG = "splitserve bench"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add `bench` (and its `compare`) to the main CLI; `args.handler(args)` runs it and returns the exit code."""
    configure(subparsers.add_parser("bench", help="measure an OpenAI-compatible endpoint", description=__doc__))


def configure(p: argparse.ArgumentParser) -> None:
    p.set_defaults(handler=run_command, bench_action=_run)
    sub = p.add_subparsers(dest="bench_command", metavar="{compare}")
    cmp = sub.add_parser("compare", help="print two result files side by side with ratios")
    cmp.add_argument("a", metavar="A.json")
    cmp.add_argument("b", metavar="B.json")
    cmp.set_defaults(bench_action=_compare)

    g = p.add_argument_group("target")
    g.add_argument("--url", default="http://127.0.0.1:8000", help="base URL of the server (default %(default)s)")
    g.add_argument("--model", help="model name (default: the first the server lists)")
    g.add_argument("--tokenizer", help="HF model dir, tokenizer.json or .gguf giving the vocabulary "
                   "(default: the model name as a local path or Hugging Face cache entry)")
    g.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                   help="do not send ignore_eos (for servers that reject it; outputs may then end early)")
    g.add_argument("--timeout", type=float, default=300.0, help="seconds per request (default %(default)s)")
    g.add_argument("--deadline", type=float, help="seconds per run, after which requests still out are cancelled")
    g.add_argument("--idle-timeout", type=float, default=120.0,
                   help="before each run, wait up to this many seconds for the server to finish what earlier runs "
                        "left in flight (read from its /metrics; 0: do not wait; default %(default)s)")
    g.add_argument("--retries", type=int, default=0,
                   help="send a request refused with 429/503 again after its Retry-After, up to this many times, as "
                        "the OpenAI client does (latencies count from the first send; default %(default)s: a refusal fails)")

    g = p.add_argument_group("trace load")
    g.add_argument("--trace", help="trace file: Mooncake JSONL (with hash_ids) or Azure CSV")
    g.add_argument("--trace-format", choices=("mooncake", "azure", "auto"), default="auto")
    g.add_argument("--time-scale", type=float, default=1.0,
                   help="multiply trace arrival times (> 1 stretches: fewer requests per second)")
    g.add_argument("--length-scale", type=float, default=1.0,
                   help="multiply prompt and output lengths and the Mooncake block size (512 tokens)")
    g.add_argument("--jitter", type=float, default=0.0,
                   help="spread each arrival over this many seconds of trace time (Mooncake's are quantised to ~3 s)")

    g = p.add_argument_group("synthetic load (when no --trace)")
    g.add_argument("--rate", type=float, default=1.0, help="requests per second (default %(default)s)")
    g.add_argument("--arrival", choices=("poisson", "gamma"), default="poisson")
    g.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma arrivals: squared coefficient of variation of the gaps (1 = Poisson)")
    for name, what, mean in (("isl", "prompt", 256), ("osl", "output", 64)):
        g.add_argument(f"--{name}", type=float, default=mean, help=f"mean {what} length, tokens (default %(default)s)")
        g.add_argument(f"--{name}-dist", choices=("fixed", "uniform", "lognormal"), default="fixed")
        g.add_argument(f"--{name}-spread", type=float, default=0.5,
                       help="uniform: half-width as a fraction of the mean; lognormal: sigma of the log")
    g.add_argument("--shared-prefix-ratio", type=float, default=0.0,
                   help="fraction of each prompt taken from a small pool of shared prefixes")
    g.add_argument("--num-prefixes", type=int, default=4, help="size of that pool (default %(default)s)")

    g = p.add_argument_group("size (both loads)")
    g.add_argument("--num-requests", type=int, help="at most this many requests (synthetic default: 100)")
    g.add_argument("--duration", type=float, help="only requests arriving within this many seconds")
    g.add_argument("--seed", type=int, default=0, help="workload seed (default %(default)s)")
    g.add_argument("--concurrency", type=int, help="closed loop: keep this many requests in flight")

    g = p.add_argument_group("SLO and goodput")
    g.add_argument("--slo-ttft", type=float, help="time-to-first-token target, seconds")
    g.add_argument("--slo-tpot", type=float, help="time-per-output-token target, seconds")
    g.add_argument("--slo-gap", type=float, help="the longest gap allowed between two output tokens of a request "
                                                 "(its worst stall), seconds")
    g.add_argument("--attainment", type=float, default=0.9,
                   help="fraction of requests that must meet both SLOs (default %(default)s)")
    g.add_argument("--sweep", action="store_true", help="find the goodput: bisect the rate in [--rate-lo, --rate-hi]")
    g.add_argument("--rate-lo", type=float)
    g.add_argument("--rate-hi", type=float)
    g.add_argument("--trials", type=int, default=3, help="trials per probed rate, judged by their median (default 3)")
    g.add_argument("--resolution", type=float, help="stop when the bracket is this narrow, req/s (default: range/16)")
    g.add_argument("--stop-certain", action="store_true",
                   help="end a sweep's run as soon as its verdict is a certain fail (not at --rate-lo, whose "
                        "latencies then describe the whole load)")

    g = p.add_argument_group("output")
    g.add_argument("--out", type=Path, help="write result.json and plots to this folder (and each run, as it "
                                            "ends, under runs/)")
    g.add_argument("--resume", action="store_true",
                   help="reuse the runs --out keeps from an earlier bench of the same load cut short")
    g.add_argument("--no-progress", dest="progress", action="store_false")
    g.add_argument("--no-live-table", dest="live_table", action="store_false",
                   help="no live table of latency percentiles while the run goes (it shows only on a terminal)")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    if args.trace is not None:
        scaling = Scaling(args.time_scale, args.length_scale, args.num_requests, args.duration, args.jitter, args.seed)
        load: TraceLoad | SyntheticSpec = TraceLoad(args.trace, args.trace_format, scaling)
    else:
        load = SyntheticSpec(
            rate=args.rate,
            arrival=args.arrival,
            burstiness=args.burstiness,
            input=LengthDist(args.isl_dist, args.isl, args.isl_spread),
            output=LengthDist(args.osl_dist, args.osl, args.osl_spread),
            shared_prefix_ratio=args.shared_prefix_ratio,
            num_prefixes=args.num_prefixes,
            num_requests=100 if args.num_requests is None and args.duration is None else args.num_requests,
            duration_s=args.duration,
            seed=args.seed,
        )
    sweep = None
    if args.sweep:
        if args.rate_lo is None or args.rate_hi is None:
            raise BenchConfigError("--sweep needs --rate-lo and --rate-hi")
        sweep = SweepConfig(args.rate_lo, args.rate_hi, args.trials, args.resolution, args.stop_certain)
    return BenchConfig(
        load=load,
        url=args.url,
        model=args.model,
        tokenizer=args.tokenizer,
        concurrency=args.concurrency,
        slo=SLO(args.slo_ttft, args.slo_tpot, args.slo_gap),
        attainment=args.attainment,
        sweep=sweep,
        timeout_s=args.timeout,
        deadline_s=args.deadline,
        idle_timeout_s=args.idle_timeout,
        retries=args.retries,
        ignore_eos=args.ignore_eos,
        progress=args.progress,
        live_table=args.live_table,
        out_dir=args.out,
        resume=args.resume,
    )


def _run(args: argparse.Namespace) -> int:
    console = Console()
    result = run_bench(config_from_args(args), console)
    print_result(result, console)
    if args.out is not None:
        console.print(f"[dim]results in[/] {args.out}")
    if not any(run.summary.num_ok for run in result.runs):
        print(f"{PROG}: no request succeeded", file=sys.stderr)
        return 1
    return 0


def _compare(args: argparse.Namespace) -> int:
    compare(args.a, args.b, Console())
    return 0


def run_command(args: argparse.Namespace) -> int:
    """Run the parsed command, turning bad input into one line on stderr and exit code 2."""
    try:
        return args.bench_action(args)
    except (*USER_ERRORS, ResultFileError, OSError) as e:  # OSError: e.g. an --out folder we may not write
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__)
    configure(parser)
    args = parser.parse_args(argv)
    return args.handler(args)
