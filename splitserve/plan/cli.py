"""`splitserve plan`: should this deployment disaggregate? Simulated on the real scheduler.

    splitserve plan --model llama-3.1-70b --gpu h100 --gpus 16 --network rdma-400 \\
        --isl 4096 --osl 256 --slo-ttft 2 --slo-tpot 0.05
    splitserve plan ... --sweep prompt-length --out results/plan
    splitserve plan ... --prefill-gpu h100 --decode-gpu a100 --price A100=1.5   # hardware per pool, own prices
    splitserve plan ... --search-gpus h100,h200,a100      # every type per pool: the cheapest per token wins
    splitserve plan calibrate --out calibration.json     # fit the model to the engine on this machine
    splitserve plan report results/plan/plan.json --out results/plan
    splitserve plan local --calibration-1t A.json --calibration-2t B.json ...   # which deployment of this machine

Exit codes: 0 done; 2 bad input or an SLO no configuration meets (one line on stderr); 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from rich.console import Console

from splitserve.calibrate.table import Calibration
from splitserve.workload.slo import SLO
from splitserve.plan import report
from splitserve.plan.cli_args import add_traffic_args, duration, workload_from_args
from splitserve.plan.local_cli import add_local_parser
from splitserve.plan.search import plan
from splitserve.plan.spec import PlanError, PlanSpec
from splitserve.plan.sweep import AXES, sweep
from splitserve.sim.cluster_spec import InfeasibleConfig
from splitserve.sim.hardware import DEFAULT_PRICES, PresetError, gpu, load_prices, network, parse_prices
from splitserve.sim.kernel_efficiency import kernel_table
from splitserve.sim.models import model as model_preset
from splitserve.sim.perf import Efficiency
from splitserve.workload.requests import WorkloadError

PROG = "splitserve plan"
USER_ERRORS = (PlanError, PresetError, WorkloadError, InfeasibleConfig)
DTYPES = {"bf16": 2, "fp16": 2, "fp8": 1, "fp32": 4}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add `plan` (with `calibrate` and `report`) to the main CLI; `args.handler(args)` returns the exit code."""
    configure(subparsers.add_parser("plan", help="simulate a cluster: disaggregate or not?", description=__doc__,
                                    formatter_class=argparse.RawDescriptionHelpFormatter))


def configure(p: argparse.ArgumentParser) -> None:
    p.set_defaults(handler=run_command, plan_action=_plan)
    sub = p.add_subparsers(dest="plan_command", metavar="{calibrate,report,local}")
    cal = sub.add_parser("calibrate", help="profile the real engine here and fit the performance model")
    cal.add_argument("--model", default=None, help="HF checkpoint dir or .gguf (default: the bundled SmolLM2-135M)")
    cal.add_argument("--threads", type=int, default=1, help="torch threads, as each worker will run (default %(default)s)")
    cal.add_argument("--quick", action="store_true", help="a small grid (seconds, rough)")
    cal.add_argument("--cpu-time", action="store_true", help="time steps by the thread's CPU time (one thread only): "
                     "the engine's own cost on a machine shared with other work")
    cal.add_argument("--out", type=Path, default=Path("calibration.json"), help="where to write it (default %(default)s)")
    cal.add_argument("--from-step-logs", type=Path, nargs="+", metavar="PATH",
                     help="fit to the steps workers ran while serving (`serve --step-log-dir` files or folders, "
                          "workers of --base's thread count) instead of profiling: served steps share the cores with "
                          "the frontend and run slower than alone")
    cal.add_argument("--base", type=Path, help="with --from-step-logs: the calibration whose hardware and model to keep")
    cal.add_argument("--refit", type=Path, metavar="CALIBRATION", help="fit a calibration's timed points again with this "
                     "version's model instead of profiling (one made before the model gained a part)")
    cal.set_defaults(plan_action=_calibrate)
    rep = sub.add_parser("report", help="plots and an HTML page from saved plan or sweep JSON")
    rep.add_argument("files", nargs="+", type=Path, metavar="RESULT.json")
    rep.add_argument("--out", type=Path, required=True, help="folder for the plots and HTML")
    rep.set_defaults(plan_action=_report)
    add_local_parser(sub)

    g = p.add_argument_group("deployment")
    g.add_argument("--model", help="model preset (llama-3.1-8b, llama-3.1-70b, llama-3.1-405b, qwen3-32b, mistral-7b, "
                   "smollm2-135m) or a path to a Hugging Face config.json")
    g.add_argument("--gpu", help="GPU preset: h100, h200, a100, l40s, b200")
    g.add_argument("--calibration", type=Path, help="a file from `splitserve plan calibrate`: its hardware, fitted "
                   "efficiencies and (without --model) its model")
    g.add_argument("--gpus", type=int, help="cluster size: find the best goodput per GPU on this many GPUs")
    g.add_argument("--rate", type=float, help="target requests/s: find the fewest GPUs that serve it")
    g.add_argument("--network", default="rdma-400", help="KV link: rdma-400, rdma-200, eth-100, eth-25, nvlink (default %(default)s)")
    g.add_argument("--no-pipelining", dest="pipelined", action="store_false", help="send KV after the prefill, not layer by layer")
    g.add_argument("--dtype", choices=tuple(DTYPES), default="bf16", help="weights and KV cache (default %(default)s)")
    g.add_argument("--gpu-hour-cost", type=float, help="USD per GPU-hour of --gpu (default: the preset's rough cloud price)")
    g.add_argument("--prefill-gpu", help="GPU preset of the prefill pool (default: --gpu)")
    g.add_argument("--decode-gpu", help="GPU preset of the decode pool (default: --gpu)")
    g.add_argument("--search-gpus", help="comma-separated GPU presets (e.g. h100,a100,l40s): try every type for each pool "
                   "and for colocated, rank by goodput per dollar")
    g.add_argument("--price", action="append", default=[], metavar="GPU=USD",
                   help="USD per GPU-hour, e.g. --price H100=2.5 (repeatable; defaults: " +
                   ", ".join(f"{k}={v:g}" for k, v in DEFAULT_PRICES.items()) + ")")
    g.add_argument("--prices-file", type=Path, help="prices as JSON {\"h100\": 2.5, ...} or name=price lines")
    g.add_argument("--router", choices=("least_loaded", "kv_aware", "round_robin"), default="kv_aware",
                   help="the core Router's placement policy, as `splitserve serve --router-policy` (default %(default)s)")
    g.add_argument("--no-conditional", dest="conditional", action="store_false",
                   help="with --router: always prefill on the prefill pool (no local prefill on the decode worker)")

    add_traffic_args(p, 2048, 256, "3 for Mooncake, else 0")

    g = p.add_argument_group("SLO")
    g.add_argument("--slo-ttft", help="time-to-first-token target: 2, 2s or 600ms (plain: seconds)")
    g.add_argument("--slo-tpot", help="time-per-output-token target: 0.05, 0.05s or 50ms")
    g.add_argument("--attainment", type=float, default=0.9, help="fraction of requests within both (default %(default)s)")

    g = p.add_argument_group("search")
    g.add_argument("--tp", default="1,2,4,8", help="tensor parallel sizes to try (default %(default)s)")
    g.add_argument("--chunks", default="512,2048", help="chunked-prefill token budgets to try colocated (default %(default)s)")
    g.add_argument("--max-num-seqs", type=int, default=256, help="running-batch cap per worker (default %(default)s)")
    g.add_argument("--max-unit-gpus", type=int, default=32, help="with --rate and no --gpus: the most GPUs of one "
                   "disaggregated unit, so the P:D ratios tried (default %(default)s)")
    g.add_argument("--top-k", type=int, default=4, help="configurations per mode to simulate (default %(default)s)")
    g.add_argument("--requests", type=int, default=400, help="requests per simulated probe (default %(default)s)")
    g.add_argument("--jobs", type=int, default=0, help="simulation processes (default: one per core)")
    g.add_argument("--block-size", type=int, help="KV block tokens (default: 16, larger for long prompts)")
    g.add_argument("--sweep", choices=AXES, help="plan along one axis and plot the verdict")
    g.add_argument("--sweep-values", help="comma-separated values for --sweep (default: a standard range)")

    g = p.add_argument_group("output")
    g.add_argument("--json", action="store_true", help="print the result as one JSON document")
    g.add_argument("--out", type=Path, help="write JSON, plots and an HTML page to this folder")
    g.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def _ints(text: str, name: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise PlanError(f"--{name} takes comma-separated integers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise PlanError(f"--{name} needs positive integers, got {text!r}")
    return vals


def spec_from_args(args: argparse.Namespace) -> PlanSpec:
    eff = Efficiency()
    if args.calibration is not None:
        cal = Calibration.load(args.calibration)
        hw, eff = cal.hardware, cal.efficiency
        m = model_preset(args.model) if args.model else cal.model
    else:
        if not args.model:
            raise PlanError("give --model (a preset or a config.json)")
        if not args.gpu:
            if getattr(args, "search_gpus", None):
                args.gpu = args.search_gpus.split(",")[0]
            elif getattr(args, "prefill_gpu", None) and getattr(args, "decode_gpu", None):
                args.gpu = args.prefill_gpu
            else:
                raise PlanError("give --gpu (h100, h200, a100, l40s, b200) or --calibration FILE")
        hw, m = gpu(args.gpu), model_preset(args.model)
        m = m.with_dtype(DTYPES[args.dtype])
        eff = kernel_table(args.gpu).efficiency  # published kernel figures for the preset, where found
    if args.slo_ttft is None or args.slo_tpot is None:
        raise PlanError("give both --slo-ttft and --slo-tpot (seconds, or with a unit: 600ms, 2s)")
    slo = SLO(duration(args.slo_ttft, "slo-ttft"), duration(args.slo_tpot, "slo-tpot"))
    if args.block_size is not None and args.block_size < 1:
        raise PlanError(f"--block-size must be >= 1, got {args.block_size}")
    wl = workload_from_args(args, mooncake_jitter=3.0)
    prices = load_prices(args.prices_file) if getattr(args, "prices_file", None) else {}
    prices.update(parse_prices(getattr(args, "price", None) or ()))
    pick = lambda name: None if not name else hw if name.strip().lower() == str(args.gpu or "").strip().lower() else gpu(name)
    search = tuple(gpu(n) for n in (getattr(args, "search_gpus", None) or "").split(",") if n.strip())
    return PlanSpec(
        prefill_hardware=pick(getattr(args, "prefill_gpu", None)), decode_hardware=pick(getattr(args, "decode_gpu", None)),
        search_hardware=search, prices=tuple(sorted(prices.items())),
        model=m, hardware=hw, network=network(args.network, hw), workload=wl, slo=slo,
        gpus=args.gpus, rate=args.rate, attainment=args.attainment, gpu_hour_cost=args.gpu_hour_cost, efficiency=eff,
        pipelined=args.pipelined, tp_options=_ints(args.tp, "tp"), chunk_options=_ints(args.chunks, "chunks"),
        max_num_seqs=args.max_num_seqs, max_unit_gpus=args.max_unit_gpus, top_k=args.top_k, jobs=args.jobs,
        router=args.router, conditional=args.conditional, block_size=args.block_size,
    )


def _plan(args: argparse.Namespace, out: Console, err: Console) -> int:
    spec = spec_from_args(args)
    say = None if (args.quiet or args.json) else (lambda msg: err.print(f"[dim]{msg}[/]", highlight=False))
    if args.sweep:
        values = [v.strip() for v in args.sweep_values.split(",") if v.strip()] if args.sweep_values else None
        result = sweep(spec, args.sweep, values, progress=say)
        return _emit(args, out, report.sweep_json(result), lambda: report.print_sweep(result, out),
                     lambda d: report.write_sweep(result, d))
    result = plan(spec, progress=say)
    return _emit(args, out, report.plan_json(result), lambda: report.print_plan(result, out),
                 lambda d: report.write_plan(result, d))


def _emit(args: argparse.Namespace, out, doc: dict, show, write) -> int:  # type: ignore[no-untyped-def]
    """JSON on stdout with --json, else the rich tables; and the files under --out."""
    if args.json:
        print(report.dumps(doc))
    else:
        show()
    if args.out:
        files = write(args.out)
        if not args.json:
            out.print(f"wrote {', '.join(str(f) for f in files)}")
    return 0


def _calibrate(args: argparse.Namespace, out: Console, err: Console) -> int:
    if args.refit and args.from_step_logs:
        raise PlanError("--refit and --from-step-logs are two sources of points: give one")
    if args.refit:
        from splitserve.calibrate.fit import refit

        if args.base is not None:
            raise PlanError("--base goes with --from-step-logs")
        cal = refit(Calibration.load(args.refit))
    elif args.from_step_logs:
        cal = _calibrate_from_steps(args)
    else:
        from splitserve.calibrate.profile import calibrate

        if args.base is not None:
            raise PlanError("--base goes with --from-step-logs")
        if args.threads is not None and args.threads < 1:
            raise PlanError("--threads must be >= 1")
        err.print(f"[dim]profiling the engine ({'quick' if args.quick else 'full'} grid, {args.threads} thread(s))...[/]")
        try:
            cal = calibrate(args.model, args.threads, args.quick, on_point=lambda pt: err.print(
                f"[dim]  {pt.kind}: {len(pt.batch)} seq, {sum(n for n, _, _ in pt.batch)} tokens, {pt.seconds * 1e3:.1f} ms[/]"),
                cpu_time=args.cpu_time)
        except (FileNotFoundError, ValueError) as e:
            raise PlanError(f"cannot calibrate: {e}") from None
    cal.save(args.out)
    e = cal.efficiency
    out.print(f"{cal.hardware.describe()}")
    prefix = "" if e.prefix_attention is None else f" (over a cached prefix {e.prefix_attention:.2f})"
    out.print(f"fitted: compute {e.compute:.2f}, attention {e.attention:.2f}{prefix}, memory {e.memory:.2f}, KV reads {e.kv_memory:.2f} of peak; overheads "
              f"{e.step_overhead_s * 1e3:.2f} ms/step, {e.seq_overhead_s * 1e3:.3f} ms/seq, {e.token_overhead_s * 1e3:.4f} ms/token")
    out.print(f"step-time error over {len(cal.points)} points: median {cal.median_rel_err:.1%}, p90 {cal.p90_rel_err:.1%}")
    out.print(f"wrote {args.out}")
    return 0


def _calibrate_from_steps(args: argparse.Namespace) -> Calibration:
    from splitserve.calibrate.from_steps import calibrate_from_steps

    if args.base is None:
        raise PlanError("--from-step-logs needs --base: the profiled calibration of the same thread count")
    try:
        return calibrate_from_steps(Calibration.load(args.base), args.from_step_logs)
    except ValueError as e:
        raise PlanError(f"cannot calibrate from step logs: {e}") from None


def _report(args: argparse.Namespace, out: Console, err: Console) -> int:
    from splitserve.plan.verdict import PlanResult

    for f in args.files:
        res = report.load(f)
        target = args.out if len(args.files) == 1 else args.out / f.stem
        files = report.write_plan(res, target) if isinstance(res, PlanResult) else report.write_sweep(res, target)
        out.print(f"wrote {', '.join(str(x) for x in files)}")
    return 0


def run_command(args: argparse.Namespace) -> int:
    out, err = Console(), Console(stderr=True)
    try:
        return args.plan_action(args, out, err)
    except USER_ERRORS as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    configure(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)
