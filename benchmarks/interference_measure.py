"""One deployment of `benchmarks.interference` measured on one workload: `splitserve serve` started with the
deployment's flags, `splitserve bench`'s goodput sweep against it, and every engine step logged (so the
worst gaps can be stated in decode steps of the very run)."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Iterator
from statistics import median

import httpx

from benchmarks.interference_report import latency_figures
from benchmarks.interference_stall import stall_breakdown
from benchmarks.interference_workloads import Case
from benchmarks.netns import Service
from splitserve.bench import BenchConfig, SweepConfig, run_bench
from splitserve.bench.results import Run
from splitserve.runtime.process import free_port
from splitserve.runtime.worker.step_log import read_step_log
from splitserve.workload.slo import SLO


def serve_args(deployment: str, chunk: int) -> list[str]:
    """`splitserve serve` flags of each deployment: all on the same two cores."""
    if deployment == "colocated":
        return ["--colocated", "1", "--threads", "2"]
    if deployment == "replicas":
        return ["--colocated", "2", "--pin", "--threads", "1"]
    if deployment == "chunked":
        return ["--colocated", "1", "--threads", "2", "--max-num-batched-tokens", str(chunk)]
    if deployment == "1p1d":
        return ["--prefill", "1", "--decode", "1", "--pin", "--threads", "1", "--no-conditional"]
    if deployment == "1p1d_conditional":
        return ["--prefill", "1", "--decode", "1", "--pin", "--threads", "1"]
    raise ValueError(f"unknown deployment {deployment!r}")


def decode_step_s(step_dir: Path) -> float | None:
    """The median seconds of a step that only decodes (one token per sequence), over every worker that
    decodes: the unit a stall is counted in."""
    seconds = []
    for path in glob.glob(str(step_dir / "steps-*.jsonl")):
        header, steps = read_step_log(path)
        if header["role"] == "prefill":
            continue
        seconds += [s["s"] for s in steps if s["b"] and all(b[0] == 1 for b in s["b"])]
    return median(seconds) if seconds else None


@contextlib.contextmanager
def served(deployment: str, flags: list[str], out: Path, model: str | None) -> Iterator[str]:
    """`splitserve serve` with the deployment's flags, warmed up, logging every engine step to out/steps; yields
    its URL and stops it on the way out."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = Service(f"serve-{deployment}", ["serve", "--host", "127.0.0.1", "--port", str(port), "--log-level",
                                             "warning", "--step-log-dir", str(out / "steps"), *flags,
                                             *(["--model", model] if model else [])], None, out / "logs")
    try:
        server.wait_healthy(url)
        httpx.post(url + "/v1/completions", json={"prompt": "warm up", "max_tokens": 4}, timeout=120).raise_for_status()
        yield url
    finally:
        server.stop()


def measure(case: Case, deployment: str, slo: SLO, *, trials: int, resolution: float, attainment: float,
            chunk: int, drain_s: float, timeout_s: float, out: Path, model: str | None = None) -> dict:
    """The deployment's goodput sweep on `case` and the latencies of its runs at each probed rate.

    Resumable, since the whole table takes hours: a sweep finished under the same settings is read back from
    out/measured.json without starting a server, and a sweep cut short reuses the runs bench kept."""
    settings = {"load": repr(case.load), "rate_lo": case.rate_lo, "rate_hi": case.rate_hi, "slo": repr(slo),
                "trials": trials, "resolution": resolution, "attainment": attainment, "flags": serve_args(deployment, chunk),
                "drain_s": drain_s, "timeout_s": timeout_s, "model": model}
    done = out / "measured.json"
    if done.is_file() and (kept := json.loads(done.read_text())).get("settings") == settings:
        print(f"  [{case.name}/{deployment}] measured earlier: goodput {kept['goodput']:g} req/s ({done})", file=sys.stderr)
        return kept
    with served(deployment, settings["flags"], out, model) as url:
        result = run_bench(BenchConfig(
            load=case.load, url=url, tokenizer=model, slo=slo, attainment=attainment, timeout_s=timeout_s,
            sweep=SweepConfig(case.rate_lo, case.rate_hi, trials, resolution, stop_certain=True),
            deadline_s=case.deadline_s(trials, drain_s), out_dir=out / "bench", resume=True))
    steps = out / "steps"
    s = result.sweep
    assert s is not None
    step = decode_step_s(steps)
    stopped = [run for run in result.runs if any(r.error_kind == "stopped" for r in run.records)]
    by_rate: dict[float, list[Run]] = defaultdict(list)
    for run in result.runs:
        if run not in stopped:  # a stopped run's latencies cover only the requests done before the stop
            by_rate[run.rate].append(run)
    stalls = stall_breakdown(by_rate.get(case.rate_lo, []), steps, step)
    print(f"  [{case.name}/{deployment}] goodput {s.lower:g} req/s (failed at {s.upper}), decode step "
          f"{'n/a' if step is None else f'{step * 1e3:.0f} ms'}; worst gaps at {case.rate_lo:g} req/s put down to "
          f"{ {c: v['requests'] for c, v in stalls['causes'].items() if v['requests']} }", file=sys.stderr)
    measured = {
        "settings": settings,
        "serve_args": settings["flags"],
        "goodput": s.lower, "upper": s.upper,  # passed, failed (None: the top of the bracket passed)
        "probes": [{"rate": p.rate, "attainments": list(p.attainments), "median": p.median, "passed": p.passed}
                   for p in s.probes],
        "latency_by_rate": {f"{rate:g}": latency_figures([run.records for run in runs], step)
                            for rate, runs in sorted(by_rate.items())},
        "stall_by_rate": {f"{rate:g}": stall_breakdown(runs, steps, step) for rate, runs in sorted(by_rate.items())},
        "decode_step_s": step,
        # Runs cut short once their verdict was certain (never at rate_lo): left out of latency_by_rate.
        "stopped_runs": [{"rate": run.rate, "trial": run.trial} for run in stopped],
        "commit": _commit(),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "load_average_at_end": os.getloadavg(),
    }
    done.write_text(json.dumps(measured, indent=1))
    return measured


def _commit() -> str | None:
    """The checkout's commit, so sweeps measured in different sessions say what code each ran."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
