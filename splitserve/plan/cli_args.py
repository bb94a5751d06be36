"""The flags `splitserve plan` and `splitserve plan local` share: the traffic to plan for and SLO durations."""

from __future__ import annotations

import argparse

from splitserve.plan.spec import PlanError, WorkloadDef
from splitserve.workload.requests import LengthDist, Scaling, SyntheticSpec, read_trace

_UNITS = {"ms": 1e-3, "s": 1.0, "": 1.0}


def duration(text: str, name: str) -> float:
    """Seconds from `600ms`, `0.6s` or `0.6` (seconds): SLOs are quoted either way."""
    t = text.strip().lower()
    unit = "ms" if t.endswith("ms") else "s" if t.endswith("s") else ""
    try:
        value = float(t[: len(t) - len(unit)].strip())
    except ValueError:
        raise PlanError(f"--{name} takes a duration such as 600ms, 0.6s or 0.6 (seconds), got {text!r}") from None
    if not value > 0:
        raise PlanError(f"--{name} must be positive, got {text!r}")
    return value * _UNITS[unit]


def add_traffic_args(p: argparse.ArgumentParser, isl: float, osl: float, jitter_default: str) -> None:
    """The load flags, named as `splitserve bench` names them; `isl`/`osl` are the default mean lengths."""
    g = p.add_argument_group("traffic (a trace, or a synthetic load as in `splitserve bench`)")
    g.add_argument("--trace", help="Mooncake JSONL or Azure CSV; its first --requests requests, stretched to each probed rate")
    g.add_argument("--trace-format", choices=("mooncake", "azure", "auto"), default="auto")
    g.add_argument("--length-scale", type=float, default=1.0, help="multiply the trace's lengths")
    g.add_argument("--jitter", type=float, help=f"spread trace arrivals over this many seconds (default: {jitter_default})")
    for name, what, mean in (("isl", "prompt", isl), ("osl", "output", osl)):
        g.add_argument(f"--{name}", type=float, default=mean, help=f"mean {what} length (default %(default)s)")
        g.add_argument(f"--{name}-dist", choices=("fixed", "uniform", "lognormal"), default="fixed")
        g.add_argument(f"--{name}-spread", type=float, default=0.5)
    g.add_argument("--shared-prefix-ratio", type=float, default=0.0, help="fraction of each prompt from a few shared prefixes")
    g.add_argument("--num-prefixes", type=int, default=4)
    g.add_argument("--arrival", choices=("poisson", "gamma"), default="poisson")
    g.add_argument("--burstiness", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)


def workload_from_args(args: argparse.Namespace, mooncake_jitter: float) -> WorkloadDef:
    """The traffic the flags describe, `args.requests` requests a probe; a bad value raises a user error now."""
    if args.requests < 10:
        raise PlanError(f"--requests must be at least 10, got {args.requests}")
    if args.trace is not None:
        trace = read_trace(args.trace, args.trace_format)
        jitter = args.jitter if args.jitter is not None else (mooncake_jitter if trace.format == "mooncake" else 0.0)
        return WorkloadDef(trace=trace, scaling=Scaling(length_scale=args.length_scale, jitter_s=jitter, seed=args.seed),
                           num_requests=args.requests)
    syn = SyntheticSpec(
        rate=1.0, arrival=args.arrival, burstiness=args.burstiness,
        input=LengthDist(args.isl_dist, args.isl, args.isl_spread),
        output=LengthDist(args.osl_dist, args.osl, args.osl_spread),
        shared_prefix_ratio=args.shared_prefix_ratio, num_prefixes=args.num_prefixes,
        num_requests=args.requests, seed=args.seed,
    )
    wl = WorkloadDef(synthetic=syn, num_requests=args.requests)
    wl.at(1.0)  # validate the synthetic parameters now
    return wl
