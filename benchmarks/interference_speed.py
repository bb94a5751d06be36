"""How fast each deployment's engine ran while it served, against the calibrated model: the serving speed
the planner's prediction of one workload takes from the other workloads' runs.

The calibration (`splitserve plan calibrate`) times an engine alone. Served, it shares the two cores with
the frontend's process (HTTP, tokens streamed one by one) and, in a 1-core deployment, with the other
worker; on this machine a 2-thread worker's steps then took 1.02-1.27x the calibrated model, a 1-core
worker's decode steps 0.84-0.98x and its prefills 0.95-1.16x (the step logs of every kept sweep,
`serving_speed_by_workload` in result.json). Near saturation a 15 % error in step time is a
far larger one in goodput, so the planner runs each deployment at its serving speed: per deployment,
worker role and step kind, the sum of the real step seconds over the sum of the modelled ones for the
same batches. For a workload's prediction only the *other* workloads' step logs count (leave one out):
no prediction sees the runs it is judged against.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Iterable, Mapping

from splitserve.calibrate.from_steps import calibrate_from_steps
from splitserve.calibrate.table import step_kind
from splitserve.plan.local_deployments import Machine, speed_key
from splitserve.runtime.worker.step_log import read_step_log

Sums = dict[str, tuple[float, float]]  # speed key -> (real seconds, modelled seconds)


def step_sums(steps_dir: Path, deployment: str, machine: Machine) -> Sums:
    """Real and modelled seconds of every logged step of one deployment's sweep, by role and step kind."""
    cal = machine.two_threads if deployment in ("colocated", "chunked") else machine.one_thread
    perf = cal.perf()
    sums: dict[str, list[float]] = {}
    for path in sorted(steps_dir.glob("steps-*.jsonl")):
        header, steps = read_step_log(path)
        for s in steps:
            batch = [(n, cached, bool(samples)) for n, cached, samples in s["b"]]
            key = speed_key(deployment, header["role"], step_kind(n for n, _, _ in batch))
            acc = sums.setdefault(key, [0.0, 0.0])
            acc[0] += s["s"]
            acc[1] += perf.step(batch).seconds
    return {k: (real, model) for k, (real, model) in sums.items()}


def workload_sums(out: Path, workloads: Iterable[str], deployments: Iterable[str], machine: Machine) -> dict[str, Sums]:
    """Per workload, the sums of every deployment whose sweep kept step logs under OUT/workload/deployment/steps."""
    found: dict[str, Sums] = {}
    for w in workloads:
        for d in deployments:
            steps = out / w / d / "steps"
            if steps.is_dir():
                found.setdefault(w, {}).update(step_sums(steps, d, machine))
    return found


MIN_MODELLED_S = 5.0  # less modelled step time than this for a key over the other workloads: too few steps to tell


def held_out_speed(sums: Mapping[str, Sums], workload: str) -> dict[str, float]:
    """The serving speed for predicting `workload`: real over modelled seconds pooled over the other workloads."""
    pooled: dict[str, list[float]] = {}
    for w, by_key in sums.items():
        if w == workload:
            continue
        for key, (real, model) in by_key.items():
            acc = pooled.setdefault(key, [0.0, 0.0])
            acc[0] += real
            acc[1] += model
    return {k: round(real / model, 4) for k, (real, model) in pooled.items() if model >= MIN_MODELLED_S}


def speed_by_workload(sums: Mapping[str, Sums]) -> dict[str, dict[str, float]]:
    """Each workload's own measured speed per key (for the report: how much it varies between loads)."""
    return {w: {k: round(real / model, 4) for k, (real, model) in by_key.items() if model > 0}
            for w, by_key in sums.items()}


# A served calibration per worker size: which deployments' workers run on one core, which on both.
ONE_CORE = ("replicas", "1p1d", "1p1d_conditional")
TWO_THREADS = ("colocated", "chunked")


def held_out_calibrations(out: Path, workloads: Iterable[str], workload: str, machine: Machine) -> tuple[Machine, dict]:
    """The machine with each calibration fitted again to the steps the *other* workloads' sweeps served
    (`splitserve plan calibrate --from-step-logs`: per step shape, not one factor per step kind), and what
    was fitted: per worker size the step logs' count and the fit's errors, or why the profiled one stayed."""
    fitted, report = {}, {}
    for size, deployments, base in (("1t", ONE_CORE, machine.one_thread), ("2t", TWO_THREADS, machine.two_threads)):
        dirs = [out / w / d / "steps" for w in workloads if w != workload for d in deployments
                if (out / w / d / "steps").is_dir() and any((out / w / d / "steps").glob("steps-*.jsonl"))]
        try:
            cal = calibrate_from_steps(base, dirs) if dirs else None
        except ValueError as e:
            cal, report[size] = None, {"kept_profiled": str(e)}
        if cal is None:
            report.setdefault(size, {"kept_profiled": "no other workload's step logs"})
            fitted[size] = base
            continue
        fitted[size] = cal
        report[size] = {"step_logs": len(cal.machine["step_logs"]), "steps": cal.machine["steps"], "points": len(cal.points),
                        "median_rel_err": round(cal.median_rel_err, 4), "p90_rel_err": round(cal.p90_rel_err, 4)}
    return replace(machine, one_thread=fitted["1t"], two_threads=fitted["2t"]), report
