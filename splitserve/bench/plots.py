"""Plots of a result: latency CDFs, and for a sweep latency and SLO attainment against request rate."""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402 - must follow the backend choice
import numpy as np  # noqa: E402

from splitserve.workload import slo as metrics  # noqa: E402
from splitserve.bench.results import BenchResult, Run  # noqa: E402

CDF_METRICS = (("TTFT", metrics.ttft), ("TPOT", metrics.tpot), ("E2E latency", metrics.e2e))


def _by_rate(result: BenchResult) -> dict[float | None, list[Run]]:
    groups: dict[float | None, list[Run]] = defaultdict(list)
    for run in result.runs:
        groups[run.rate].append(run)
    return dict(sorted(groups.items(), key=lambda kv: kv[0] or 0.0))


def plot_cdfs(result: BenchResult, path: Path) -> None:
    """One panel per latency metric; for a sweep, one curve per probed rate (its trials pooled)."""
    fig, axes = plt.subplots(1, len(CDF_METRICS) + 1, figsize=(4.2 * (len(CDF_METRICS) + 1), 3.6))
    for rate, runs in _by_rate(result).items():
        ok = [r for run in runs for r in run.records if r.ok]
        label = "run" if rate is None else f"{rate:.3g} req/s"
        series = [[v for v in map(fn, ok) if v is not None] for _, fn in CDF_METRICS]
        series.append([g for r in ok for g in metrics.itls(r)])
        for ax, values in zip(axes, series):
            if values:
                x = np.sort(np.asarray(values)) * 1000
                ax.step(x, np.arange(1, len(x) + 1) / len(x), where="post", label=label)
    slo = result.config.slo
    for ax, (name, _), limit in zip(axes, CDF_METRICS, (slo.ttft_s, slo.tpot_s, None)):
        ax.set_title(name)
        if limit is not None:
            ax.axvline(limit * 1000, color="grey", linestyle="--", linewidth=1, label="SLO")
    axes[-1].set_title("Inter-token latency")
    for ax in axes:
        ax.set_xlabel("ms")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("cumulative fraction")
    axes[0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sweep(result: BenchResult, path: Path) -> None:
    """Left: TTFT and TPOT p50/p90 (median over trials) against rate. Right: attainment per trial and median."""
    assert result.sweep is not None
    groups = {rate: runs for rate, runs in _by_rate(result).items() if rate is not None}
    rates = list(groups)
    fig, (lat, att) = plt.subplots(1, 2, figsize=(10, 3.8))
    for key, fmt in (("ttft", "-o"), ("tpot", "-s")):
        for q, alpha in (("p50", 0.5), ("p90", 1.0)):
            ys = [_median(getattr(getattr(run.summary, key), q) for run in groups[r]) for r in rates]
            ms = [np.nan if y is None else y * 1000 for y in ys]
            lat.plot(rates, ms, fmt, alpha=alpha, label=f"{key.upper()} {q}")
    lat.set_xlabel("request rate (req/s)")
    lat.set_ylabel("ms")
    lat.set_yscale("log")
    lat.legend(fontsize="small")
    lat.grid(alpha=0.3)

    for r in rates:
        ys = [run.summary.attainment for run in groups[r]]
        att.scatter([r] * len(ys), ys, color="tab:blue", alpha=0.4, s=14)
    medians = [_median(run.summary.attainment for run in groups[r]) for r in rates]
    att.plot(rates, medians, "-o", color="tab:blue", label="median")
    att.axhline(result.config.attainment, color="grey", linestyle="--", linewidth=1, label="target")
    if result.sweep.goodput is not None:
        att.axvline(result.sweep.goodput, color="tab:green", linewidth=1, label=f"goodput {result.sweep.goodput:.3g}")
    att.set_xlabel("request rate (req/s)")
    att.set_ylabel("SLO attainment")
    att.set_ylim(-0.02, 1.02)
    att.legend(fontsize="small")
    att.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _median(values) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None
