"""`splitserve plan local`: which `splitserve serve` deployment of this 2-core machine serves a load best.

    splitserve plan calibrate --threads 1 --cpu-time --out cal-1t.json
    splitserve plan calibrate --threads 2 --out cal-2t.json          # on a quiet machine: it times wall clock
    splitserve plan local --calibration-1t cal-1t.json --calibration-2t cal-2t.json \\
        --isl 1024 --isl-dist lognormal --isl-spread 0.4 --osl 128 --num-requests 20 \\
        --slo-ttft 8 --slo-tpot 0.25 --slo-gap 0.5 --rate-lo 0.1 --rate-hi 0.6

Simulates colocated (2 threads), two 1-core replicas, chunked prefill, 1P1D and 1P1D with conditional
placement through the same Scheduler, Router and admission the runtime runs, over the very requests
`splitserve bench --sweep` sends with the same load and sweep flags, and names the winner. Each goodput is
also given with every step --band slower and faster: a winner that holds across the band is one to trust;
otherwise the contenders are named, to measure with `splitserve bench --sweep` before choosing.

Exit codes: 0 a verdict (also when no deployment passes the lowest rate); 2 bad input; 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from splitserve.calibrate.table import Calibration
from splitserve.plan.cli_args import add_traffic_args, duration, workload_from_args
from splitserve.plan.local_deployments import DEPLOYMENTS, Machine
from splitserve.plan.local_pick import LocalPick, pick_deployment
from splitserve.plan.spec import PlanError
from splitserve.workload.goodput import Bracket
from splitserve.workload.slo import SLO

# Loopback TCP measured 4.5 GB/s on this project's machines (benchmarks/sim_accuracy.py's loopback_bandwidth);
# a 1k prompt's KV (45 MiB) then takes ~10 ms, so the pick hardly depends on it.
DEFAULT_LINK_GBPS = 4.0


def add_local_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("local", help="which deployment of this machine serves a load best (simulated)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("this machine")
    g.add_argument("--calibration-1t", type=Path, required=True, help="`splitserve plan calibrate --threads 1` of this machine")
    g.add_argument("--calibration-2t", type=Path, required=True, help="`splitserve plan calibrate --threads 2` of this machine")
    g.add_argument("--deployments", default=",".join(DEPLOYMENTS), help="comma-separated (default: all five)")
    g.add_argument("--chunk", type=int, default=128, help="the chunked deployment's --max-num-batched-tokens (default %(default)s)")
    g.add_argument("--kv-cache-gib", type=float, default=1.0, help="per worker, as `serve` (default %(default)s)")
    g.add_argument("--max-num-seqs", type=int, default=64, help="per worker, as `serve` (default %(default)s)")
    g.add_argument("--link-gbps", type=float, default=DEFAULT_LINK_GBPS,
                   help="GB/s of the KV path between the split workers (default %(default)s: loopback TCP)")
    add_traffic_args(p, 256, 64, "0, as `splitserve bench`")
    p.add_argument_group("size").add_argument("--num-requests", dest="requests", type=int, default=100,
                                              help="requests a run, as `splitserve bench` (default %(default)s)")
    g = p.add_argument_group("SLO and sweep (as `splitserve bench --sweep`)")
    g.add_argument("--slo-ttft", help="time-to-first-token target: 8, 8s or 800ms")
    g.add_argument("--slo-tpot", help="mean time-per-output-token target")
    g.add_argument("--slo-gap", help="the longest gap allowed between two tokens of a request (the stall)")
    g.add_argument("--attainment", type=float, default=0.9, help="fraction of requests within the SLO (default %(default)s)")
    g.add_argument("--rate-lo", type=float, required=True)
    g.add_argument("--rate-hi", type=float, required=True)
    g.add_argument("--trials", type=int, default=3, help="runs per probed rate, judged by their median (default %(default)s)")
    g.add_argument("--resolution", type=float, help="stop when the bracket is this narrow, req/s (default: range/16)")
    g.add_argument("--band", type=float, default=0.1,
                   help="also simulate every step this fraction slower and faster (default %(default)s; 0: off)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON document")
    p.set_defaults(plan_action=run_local)
    return p


def _calibration(path: Path, threads: int) -> Calibration:
    try:
        cal = Calibration.load(path)
    except (OSError, ValueError, KeyError) as e:
        raise PlanError(f"--calibration-{threads}t: cannot read {path}: {e}") from None
    made = cal.machine.get("threads")
    if made is not None and made != threads:
        raise PlanError(f"--calibration-{threads}t: {path} was calibrated with {made} threads, not {threads}")
    return cal


def local_from_args(args: argparse.Namespace) -> tuple[Machine, list[str], SLO, Bracket]:
    """The machine, deployments, SLO and sweep the flags describe; a bad value raises PlanError naming its flag."""
    deployments = [d.strip() for d in args.deployments.split(",") if d.strip()]
    for d in deployments:
        if d not in DEPLOYMENTS:
            raise PlanError(f"--deployments: unknown deployment {d!r}; one of {', '.join(DEPLOYMENTS)}")
    if not deployments:
        raise PlanError("--deployments: name at least one")
    slo = SLO(*(None if v is None else duration(v, n) for v, n in
                ((args.slo_ttft, "slo-ttft"), (args.slo_tpot, "slo-tpot"), (args.slo_gap, "slo-gap"))))
    if not slo.set:
        raise PlanError("give at least one of --slo-ttft, --slo-tpot, --slo-gap")
    if not 0 < args.attainment <= 1:
        raise PlanError(f"--attainment must be in (0, 1], got {args.attainment}")
    if not 0 < args.rate_lo < args.rate_hi:
        raise PlanError(f"--rate-lo and --rate-hi need 0 < lo < hi, got {args.rate_lo} and {args.rate_hi}")
    resolution = args.resolution if args.resolution is not None else (args.rate_hi - args.rate_lo) / 16
    if not resolution > 0:
        raise PlanError(f"--resolution must be positive, got {args.resolution}")
    if args.trials < 1:
        raise PlanError(f"--trials must be at least 1, got {args.trials}")
    if not 0 <= args.band < 1:
        raise PlanError(f"--band must be in [0, 1), got {args.band}")
    for flag, value in (("chunk", args.chunk), ("max-num-seqs", args.max_num_seqs)):
        if value < 1:
            raise PlanError(f"--{flag} must be at least 1, got {value}")
    for flag, value in (("kv-cache-gib", args.kv_cache_gib), ("link-gbps", args.link_gbps)):
        if not value > 0:
            raise PlanError(f"--{flag} must be positive, got {value}")
    machine = Machine(_calibration(args.calibration_1t, 1), _calibration(args.calibration_2t, 2), args.link_gbps * 1e9,
                      kv_cache_bytes=int(args.kv_cache_gib * (1 << 30)), max_num_seqs=args.max_num_seqs, chunk=args.chunk)
    return machine, deployments, slo, Bracket(args.rate_lo, args.rate_hi, resolution)


def local_json(pick: LocalPick, slo: SLO, workload: str) -> dict:
    return {
        "workload": workload,
        "slo": {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s, "max_gap_s": slo.max_gap_s},
        "band": pick.band,
        "deployments": [{"deployment": d.deployment, "goodput": d.goodput, "upper": d.nominal.upper,
                         "slower": d.slower, "faster": d.faster,
                         "probes": [{"rate": p.rate, "attainments": list(p.attainments), "median": p.median}
                                    for p in d.nominal.probes]} for d in pick.deployments],
        "winner": pick.winner, "winner_slower": pick.winner_slower, "winner_faster": pick.winner_faster,
        "robust": pick.robust, "contenders": list(pick.contenders()),
    }


def verdict(pick: LocalPick, lowest: float) -> str:
    """One line: the pick, and how far to trust it."""
    if pick.winner is None:
        faster = pick.winner_faster
        tail = f"; with every step {pick.band:.0%} faster, {faster} would" if faster else ""
        return f"no deployment meets the SLO at {lowest:g} req/s{tail}: lower --rate-lo or loosen the SLO"
    if pick.robust:
        return (f"run {pick.winner}: it wins at the calibration's speed and with every step {pick.band:.0%} "
                f"slower or faster")
    return (f"{pick.winner} wins at the calibration's speed, but the pick turns within ±{pick.band:.0%} of step time "
            f"(slower: {pick.winner_slower or 'none'}, faster: {pick.winner_faster or 'none'}): measure "
            f"{' and '.join(pick.contenders())} with `splitserve bench --sweep` before choosing")


def print_local(pick: LocalPick, lowest: float, out: Console) -> None:
    fmt = lambda g: f"< {lowest:g}" if g == 0 else f"{g:g}"
    table = Table(title="predicted goodput, req/s (the highest rate whose median trial met the SLO)")
    table.add_column("deployment")
    table.add_column("goodput", justify="right")
    table.add_column(f"steps +{pick.band:.0%}", justify="right")
    table.add_column(f"steps -{pick.band:.0%}", justify="right")
    for d in pick.deployments:
        mark = " ★" if d.deployment == pick.winner else ""
        table.add_row(d.deployment + mark, fmt(d.goodput), fmt(d.slower), fmt(d.faster))
    out.print(table)
    out.print(verdict(pick, lowest))


def run_local(args: argparse.Namespace, out: Console, err: Console) -> int:
    machine, deployments, slo, bracket = local_from_args(args)
    wl = workload_from_args(args, mooncake_jitter=0.0)
    if not args.json:
        err.print(f"[dim]simulating {len(deployments)} deployments x 3 speeds on {wl.describe()}...[/]", highlight=False)
    pick = pick_deployment(machine, deployments, lambda rate, trial: wl.trial(rate, trial).requests, slo, bracket,
                           args.trials, args.attainment, args.band)
    if args.json:
        print(json.dumps(local_json(pick, slo, wl.describe())))
    else:
        print_local(pick, bracket.lo, out)
    return 0
