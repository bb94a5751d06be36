"""The output folder of a run: result.json and the plots."""

from __future__ import annotations

from pathlib import Path

from splitserve.bench.results import BenchResult, write_json


def write_outputs(result: BenchResult, out_dir: Path) -> list[Path]:
    """result.json and the plots; returns the files written."""
    from splitserve.bench.plots import plot_cdfs, plot_sweep  # matplotlib is slow to import: only when asked

    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "result.json", out_dir / "latency_cdf.png"]
    write_json(result, written[0])
    plot_cdfs(result, written[1])
    if result.sweep is not None:
        written.append(out_dir / "sweep.png")
        plot_sweep(result, written[2])
    return written
