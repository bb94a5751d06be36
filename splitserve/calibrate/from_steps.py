"""A calibration fitted to the steps an engine ran while it served (`serve --step-log-dir`), not to a grid
timed with the machine to itself.

The grid (`profile.py`) times an engine alone. Served, the same engine shares its cores with the frontend,
its own HTTP thread, the other worker of a 1-core deployment and, in a benchmark, the client. On this
project's AVX2-only machine a 2-thread worker's 128-token chunk steps ran 1.2-1.4x what the grid's fit
predicts and its small decode batches 1.1-1.6x (`benchmarks.interference`'s step logs), which is the whole
difference between passing and failing a 0.5 s stall bound. A user who has served has those steps, each with
its batch and its wall time: this fits the same performance model (`fit.py`) to them, so that the planner
times each step shape as it runs served, not as it runs alone.

Served steps are many (thousands of decodes) and most are alike, while the fit's grid search holds a row per
point. So steps are grouped by shape — kind, sequences, new tokens and context read, each on a doubling
scale — and each group of at least `min_steps` gives one point: its median step (a real batch and its time).
The step logs must come from workers of one thread count, the base calibration's: a log does not say.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Iterable, Sequence

from splitserve.calibrate.fit import fit
from splitserve.calibrate.table import Batch, Calibration, Point, step_kind
from splitserve.runtime.worker.step_log import read_step_log

# The fit's grid search holds 16^4 rows per point: a few hundred points keep it to a few hundred MB.
MAX_POINTS = 200


def shape(batch: Batch) -> tuple[str, int, int, int]:
    """The group a step falls in: its kind, then sequences, new tokens and context tokens read, each by its
    power of two (context in 64-token units), so steps whose costs differ by less than 2x share a group."""
    new = sum(n for n, _, _ in batch)
    context = sum(c for _, c, _ in batch)
    return step_kind(n for n, _, _ in batch), len(batch).bit_length(), new.bit_length(), (context // 64).bit_length()


def points_from_steps(steps: Iterable[tuple[Batch, float]], min_steps: int = 3) -> list[Point]:
    """One point per shape group seen at least `min_steps` times: the group's median step, by time. At most
    MAX_POINTS, the most populous groups first."""
    groups: dict[tuple, list[tuple[float, Batch]]] = defaultdict(list)
    for batch, seconds in steps:
        if batch and seconds > 0:
            groups[shape(batch)].append((seconds, batch))
    kept = sorted((g for g in groups.values() if len(g) >= min_steps), key=len, reverse=True)[:MAX_POINTS]
    points = []
    for group in kept:
        seconds, batch = sorted(group, key=lambda x: x[0])[len(group) // 2]
        points.append(Point(step_kind(n for n, _, _ in batch), batch, seconds))
    return points


def step_log_files(paths: Sequence[Path]) -> list[Path]:
    """The step logs named: files as given, directories by their steps-*.jsonl."""
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files += sorted(p.glob("steps-*.jsonl"))
        elif p.is_file():
            files.append(p)
        else:
            raise ValueError(f"no step log at {p}")
    if not files:
        raise ValueError(f"no steps-*.jsonl under {', '.join(map(str, paths))}")
    return files


def served_steps(files: Iterable[Path]) -> list[tuple[Batch, float]]:
    """Every step the step-log files recorded: (batch as the performance model takes it, wall seconds)."""
    steps: list[tuple[Batch, float]] = []
    for f in files:
        _, records = read_step_log(f)
        steps += [([(int(n), int(c), bool(s)) for n, c, s in r["b"]], float(r["s"])) for r in records]
    return steps


def calibrate_from_steps(base: Calibration, paths: Sequence[Path], min_steps: int = 3) -> Calibration:
    """`base`'s hardware and model, its performance model fitted again to the served steps of the step logs
    under `paths` (files or directories)."""
    files = step_log_files(paths)
    steps = served_steps(files)
    points = points_from_steps(steps, min_steps)
    kinds = {p.kind for p in points}
    if len(points) < 4 or kinds != {"prefill", "decode"}:
        raise ValueError(f"{len(steps)} logged steps give {len(points)} step shapes seen {min_steps}+ times "
                         f"({', '.join(sorted(kinds)) or 'none'}): a fit needs prefill and decode steps of several shapes")
    eff, med, p90 = fit(base.model, base.hardware, points)
    machine = {**base.machine, "clock": "served wall time (step logs)", "step_logs": [str(f) for f in files],
               "steps": len(steps), "base_efficiency": asdict(base.efficiency)}
    return Calibration(base.hardware, base.model, eff, points, med, p90, machine)
