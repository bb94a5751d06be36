"""How well calibrations time the steps workers served: per workload and 2-thread deployment of a
`benchmarks.interference` results folder, the median signed and absolute relative error of each
calibration's step time against every logged step, by step kind.

    python -m benchmarks.served_step_error results/interference_avx2 \\
        old=results/interference_avx2/calibration-2t.json grid2=results/interference_avx2/grid2/calibration-2t.json

A calibration profiled alone times a served 2-thread worker's steps low (it shares the cores with the
frontend and the client); the figures say by how much, per step kind, for each calibration given. The
signed error is (modelled - served) / served: -0.18 means the calibration times the steps 18 % short.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from statistics import median

from splitserve.calibrate.from_steps import served_steps, step_log_files
from splitserve.calibrate.table import Calibration, step_kind
from splitserve.sim.hardware import PresetError

TWO_THREADS = ("colocated", "chunked")


def step_errors(steps_dir: Path, calibrations: dict[str, Calibration]) -> dict[str, dict[str, tuple[float, float]]]:
    """{calibration: {step kind: (median signed, median absolute) relative error of its step times}}."""
    perfs = {name: cal.perf() for name, cal in calibrations.items()}
    errs: dict[str, dict[str, list[float]]] = {name: {"prefill": [], "decode": []} for name in calibrations}
    for batch, seconds in served_steps(step_log_files([steps_dir])):
        if not batch or seconds <= 0:
            continue  # nothing to compare a time against
        kind = step_kind(n for n, _, _ in batch)
        for name, pm in perfs.items():
            errs[name][kind].append((pm.step(batch).seconds - seconds) / seconds)
    return {name: {kind: (round(median(v), 3), round(median(abs(x) for x in v), 3)) for kind, v in by.items() if v}
            for name, by in errs.items()}


def load_calibrations(specs: list[str]) -> dict[str, Calibration]:
    """NAME=FILE arguments as calibrations; SystemExit naming the argument that is not one."""
    cals = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"calibration {spec!r}: expected NAME=FILE, e.g. old=results/interference_avx2/calibration-2t.json")
        try:
            cals[name] = Calibration.load(path)
        except PresetError as e:  # its message names the file and what is wrong with it
            raise SystemExit(f"calibration {spec!r}: {e}") from None
    return cals


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", type=Path, help="a benchmarks.interference --out folder")
    ap.add_argument("calibrations", nargs="+", metavar="NAME=FILE", help="2-thread calibrations to compare")
    args = ap.parse_args(argv)
    if not args.results.is_dir():
        raise SystemExit(f"results {args.results}: not a folder (a benchmarks.interference --out folder)")
    cals = load_calibrations(args.calibrations)
    for w in sorted(d for d in args.results.iterdir() if d.is_dir()):
        for d in TWO_THREADS:
            if (w / d / "steps").is_dir():
                print(w.name, d, json.dumps(step_errors(w / d / "steps", cals)))


if __name__ == "__main__":
    main()
