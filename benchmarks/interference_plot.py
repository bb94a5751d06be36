"""results/interference.png: per workload, each deployment's measured goodput (bar, with the bracket the sweep
left: passed .. failed) beside the planner's prediction (marker); and the worst gap per request at each
workload's lowest rate, in decode steps."""

from __future__ import annotations

from pathlib import Path

LABELS = {"colocated": "colocated 2t", "replicas": "2 x 1-core", "chunked": "chunked", "1p1d": "1P1D",
          "1p1d_conditional": "1P1D cond."}


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(doc["measured"])
    fig, axes = plt.subplots(1, len(workloads) + 1, figsize=(4 * (len(workloads) + 1), 4), squeeze=False)
    for ax, w in zip(axes[0], workloads):
        rows = [r for r in doc["table"] if r["workload"] == w]
        xs = range(len(rows))
        lo = [r["measured_goodput"] for r in rows]
        hi = [r["measured_upper"] if r["measured_upper"] is not None else r["measured_goodput"] for r in rows]
        ax.bar(xs, lo, color="tab:blue", alpha=0.7, label="measured (passed)")
        ax.errorbar(xs, lo, yerr=[[0] * len(lo), [h - l for h, l in zip(hi, lo)]], fmt="none", ecolor="k", capsize=3)
        ax.plot(xs, [r["predicted_goodput"] for r in rows], "r^", label="predicted")
        ax.set_xticks(list(xs), [LABELS.get(r["deployment"], r["deployment"]) for r in rows], rotation=35, fontsize=7)
        best = rows[0]["measured_winner"] if any(lo) else "none passed"
        ax.set(title=f"{w}\nwinner {best}, planner {rows[0]['predicted_winner']}",
               ylabel="goodput, req/s")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax = axes[0][-1]
    for w in workloads:
        lat = doc["latency_at_rate_lo"][w]
        names = [d for d in lat if lat[d].get("worst_gap_p50_steps") is not None]
        ax.plot([LABELS.get(d, d) for d in names], [lat[d]["worst_gap_p50_steps"] for d in names], "-o", label=w)
    ax.set(title="median worst gap per request\n(decode steps, lowest rate)", yscale="log")
    ax.tick_params(axis="x", rotation=35, labelsize=7)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
