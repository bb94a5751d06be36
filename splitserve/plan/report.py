"""Planner output: rich tables for the terminal, JSON documents, plots, and a self-contained HTML page."""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import math

import numpy as np
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from splitserve.plan.spec import PlanError
from splitserve.plan.verdict import ModeResult, PlanResult
from splitserve.plan.sweep import AxisPoint, AxisSweep


# ---------------------------------------------------------------------------------------------- JSON


def _clean(x: Any) -> Any:
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return _clean(dataclasses.asdict(x))
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if hasattr(x, "item") and callable(x.item):  # numpy scalars
        return _clean(x.item())
    return x


def plan_json(result: PlanResult) -> dict:
    return {"kind": "plan", **_clean(result)}


def sweep_json(result: AxisSweep) -> dict:
    d = _clean(result)
    for p in d["points"]:
        p["verdict"] = p["result"]["verdict"] if p["result"] else "none"
    return {"kind": "sweep", **d}


def dumps(doc: dict) -> str:
    return json.dumps(doc, indent=1)


def _plan_from(d: dict) -> PlanResult:
    modes = {k: ModeResult(**{**d[k], "probes": [tuple(p) for p in d[k]["probes"]]}) if d.get(k) else None
             for k in ("colocated", "disaggregated", "heterogeneous")}
    return PlanResult(d["inputs"], modes["colocated"], modes["disaggregated"], d["verdict"], d["advantage"],
                      d["reasons"], d.get("candidates", []), d.get("wall_s", 0.0), modes["heterogeneous"], d.get("costs", []))


def load(path: str | Path) -> PlanResult | AxisSweep:
    """A plan or sweep document written by `--json` or `--out`."""
    p = Path(path)
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
        if d.get("kind") == "plan":
            return _plan_from(d)
        if d.get("kind") == "sweep":
            pts = [AxisPoint(x["value"], x["x"], _plan_from(x["result"]) if x["result"] else None, x.get("error"))
                   for x in d["points"]]
            return AxisSweep(d["axis"], d["label"], pts, d.get("inputs", {}), d.get("wall_s", 0.0))
    except FileNotFoundError:
        raise PlanError(f"result file not found: {p}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise PlanError(f"{p}: not a plan or sweep result ({e})") from None
    raise PlanError(f"{p}: not a plan or sweep result (no 'kind')")


# ---------------------------------------------------------------------------------------------- terminal


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1e3:,.0f}" if v >= 0.1 else f"{v * 1e3:,.1f}"


def _money(v: float | None) -> str:
    return "-" if v is None else f"${v:,.3g}"


def _rows(r: ModeResult | None) -> list[str]:
    if r is None:
        return ["none meets the SLO"] + [""] * (len(LABELS) - 1)
    m = r.metrics
    hw = [u.get("hardware", "") for u in r.utilisation] or [""] * len(m["pools"])
    pools = "\n".join(f"{p['role']}{' ' + h if h else ''}: {p['compute_util']:.0%} / {p['bandwidth_util']:.0%}" for p, h in zip(m["pools"], hw))
    return [
        r.config,
        str(r.gpus),
        f"{r.goodput_rps:,.3g} ({r.rps_per_gpu:,.3g} per GPU used"
        + (f", {r.rps_per_cluster_gpu:,.3g} per cluster GPU" if r.rps_per_cluster_gpu is not None else "") + ")",
        f"{r.steady_goodput_rps:,.3g}" if r.steady_goodput_rps else "not met at the probed rates",
        f"{r.tokens_per_s_per_gpu:,.0f}",
        f"{r.output_tokens_per_s_per_gpu:,.0f}",
        " / ".join(_ms(m["ttft"][k]) for k in ("p50", "p90", "p99")),
        " / ".join(_ms(m["tpot"][k]) for k in ("p50", "p90", "p99")),
        pools,
        ", ".join(f"{k.removesuffix('_s')} {_ms(v)}" for k, v in m["phases"].items()),
        _money(r.cost_per_m_tokens),
        _money(r.cost_per_m_input_tokens),
        _money(r.cost_per_m_output_tokens),
        r.binding,
    ]


LABELS = [
    "configuration", "GPUs used", "goodput, req/s (tail rule)", "steady state, req/s (at least)",
    "tokens/s per GPU (in+out)", "output tokens/s per GPU",
    "TTFT p50/p90/p99, ms", "TPOT p50/p90/p99, ms", "compute / bandwidth util", "mean phase times, ms",
    "$ per M tokens (in+out)", "$ per M input tokens", "$ per M output tokens", "binds first above goodput",
]


def print_plan(result: PlanResult, console: Console | None = None) -> None:
    c = console or Console()
    i = result.inputs
    where = f"{i['gpus']} x {i['gpu']}" if i["rate"] is None else f"{i['rate']:g} req/s on {i['gpu']}"
    c.print(f"[bold]{i['model']}[/] on {where}, KV over {i['network']}; {i['workload']}")
    c.print(f"SLO: TTFT {i['slo_ttft_s']:g} s, TPOT {i['slo_tpot_s'] * 1e3:g} ms, for {i['attainment']:.0%} of requests"
            f" (mean prompt {i['mean_input']:,.0f}, output {i['mean_output']:,.0f} tokens)")
    t = Table(show_lines=False)
    t.add_column("")
    t.add_column("colocated")
    t.add_column("disaggregated")
    cols = [_rows(result.colocated), _rows(result.disaggregated)]
    if result.heterogeneous is not None or result.inputs.get("search_gpus"):
        t.add_column("heterogeneous")
        cols.append(_rows(result.heterogeneous))
    for label, *vals in zip(LABELS, *cols):
        t.add_row(label, *vals)
    c.print(t)
    adv = f" ({result.advantage:.2f}x)" if result.advantage is not None else ""
    c.print(f"[bold]verdict: {result.verdict}[/]{adv}")
    for reason in result.reasons:
        c.print(f"  - {reason}", highlight=False)
    c.print(f"[dim]{len(result.candidates)} configurations simulated in {result.wall_s:.1f} s[/]")


def print_sweep(result: AxisSweep, console: Console | None = None) -> None:
    c = console or Console()
    t = Table(title=f"verdict along {result.axis}")
    for col in (result.axis, "best colocated", "req/s/GPU", "best disaggregated", "req/s/GPU", "disagg / coloc", "verdict"):
        t.add_column(col)
    for p in result.points:
        r = p.result
        if r is None:
            t.add_row(p.value, p.error or "", "", "", "", "", "none")
            continue
        adv = f"{p.disaggregated_per_gpu / p.colocated_per_gpu:.2f}" if p.colocated_per_gpu else "-"
        t.add_row(
            p.value,
            r.colocated.config if r.colocated else "none",
            f"{p.colocated_per_gpu:.3g}",
            r.disaggregated.config if r.disaggregated else "none",
            f"{p.disaggregated_per_gpu:.3g}",
            adv,
            r.verdict,
        )
    c.print(t)
    c.print(f"[dim]{len(result.points)} planner searches in {result.wall_s:.1f} s[/]")


# ---------------------------------------------------------------------------------------------- plots


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def plan_figure(result: PlanResult) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(17, 4.2))
    def value(c: dict) -> float:
        return c["rps_per_gpu"] if c["rps_per_gpu"] is not None else 0.0

    cands = sorted(result.candidates, key=value)
    colors = [{"colocated": "tab:blue", "heterogeneous": "tab:green"}.get(c["mode"], "tab:orange") for c in cands]
    bars = ax1.barh([c["config"].replace("disaggregated ", "").replace("colocated ", "colo ") for c in cands],
                    [value(c) for c in cands], color=colors)
    for bar, c in zip(bars, cands):
        if c["rps_per_gpu"] is None:  # only bounded: it failed the rate it needed to beat the best of its mode
            ax1.annotate("lost to the best of its mode", (0, bar.get_y() + bar.get_height() / 2), xytext=(4, 0),
                         textcoords="offset points", va="center", fontsize=7, color="gray")
    ax1.set_xlabel("goodput per GPU (req/s) at the SLO")
    ax1.set_title("simulated configurations (blue: colocated, orange: disaggregated, green: heterogeneous)", fontsize=9)
    ax1.tick_params(axis="y", labelsize=7)
    for r, color in ((result.colocated, "tab:blue"), (result.disaggregated, "tab:orange"), (result.heterogeneous, "tab:green")):
        if r is None:
            continue
        pts = sorted(r.probes)
        ax2.plot([p[0] * r.copies for p in pts], [p[1] for p in pts], "o-", color=color, label=r.config)
    ax2.axhline(result.inputs["attainment"], color="gray", ls="--", lw=1)
    ax2.set_xlabel("offered load (req/s, whole cluster)")
    ax2.set_ylabel("SLO attainment")
    ax2.set_title("attainment probes of the best of each mode", fontsize=9)
    ax2.legend(fontsize=7)
    # Utilisation of each pool of the best of each mode: achieved FLOP/s and bytes/s over peak.
    labels, comp, band = [], [], []
    for name, r in (("colo", result.colocated), ("disagg", result.disaggregated), ("hetero", result.heterogeneous)):
        if r is None:
            continue
        hw = [u.get("hardware", "") for u in r.utilisation] or [""] * len(r.metrics["pools"])
        for p, h in zip(r.metrics["pools"], hw):
            labels.append(f"{name} {p['role']}\n{h}")
            comp.append(p["compute_util"])
            band.append(p["bandwidth_util"])
    xs = np.arange(len(labels))
    ax3.bar(xs - 0.2, comp, 0.4, label="compute (FLOP/s / peak)")
    ax3.bar(xs + 0.2, band, 0.4, label="memory bandwidth (bytes/s / peak)")
    ax3.set_xticks(xs, labels, fontsize=7)
    ax3.set_ylabel("utilisation over the run")
    ax3.set_title("phase utilisation of each pool at the goodput", fontsize=9)
    ax3.legend(fontsize=7)
    fig.tight_layout()
    data = _png(fig)
    plt.close(fig)
    return data


def sweep_figure(result: AxisSweep) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    pts = sorted(result.points, key=lambda p: p.x)
    xs = [p.x for p in pts]
    ax.plot(xs, [p.colocated_per_gpu for p in pts], "o-", color="tab:blue", label="best colocated")
    ax.plot(xs, [p.disaggregated_per_gpu for p in pts], "s-", color="tab:orange", label="best disaggregated")
    ys = [v for p in pts for v in (p.colocated_per_gpu, p.disaggregated_per_gpu) if v > 0]
    if ys and max(ys) / min(ys) > 8:
        ax.set_yscale("log")
    ax.set_ylabel("goodput per GPU (req/s) at the SLO")
    ax.set_title(f"goodput per GPU along {result.axis}", fontsize=10)
    ax.legend(fontsize=8)
    ratio = [p.disaggregated_per_gpu / p.colocated_per_gpu if p.colocated_per_gpu else float("nan") for p in pts]
    colors = ["tab:orange" if p.verdict == "disaggregate" else "tab:blue" for p in pts]
    ax2.plot(xs, ratio, "-", color="gray")
    ax2.scatter(xs, ratio, c=colors, zorder=3)
    ax2.axhline(1.0, color="black", lw=1)
    ax2.axhline(1.05, color="gray", lw=1, ls="--")
    for p, r in zip(pts, ratio):
        if r == r:
            ax2.annotate(p.verdict, (p.x, r), textcoords="offset points", xytext=(0, 8), ha="center", fontsize=7)
    ax2.set_ylabel("disaggregated / colocated goodput per GPU")
    ax2.set_title("the verdict (dashed: 5 % margin to disaggregate)", fontsize=10)
    for a in (ax, ax2):
        if result.axis in ("prompt-length", "bandwidth", "cluster-size") and min(xs) > 0 and max(xs) / min(xs) > 8:
            a.set_xscale("log", base=2)
        a.set_xlabel(result.label)
    fig.tight_layout()
    data = _png(fig)
    plt.close(fig)
    return data


# ---------------------------------------------------------------------------------------------- HTML


def _html_page(title: str, body: str) -> str:
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top}"
             "th{background:#f4f4f4}.v{font-size:20px;font-weight:bold}")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{style}</style></head><body>{body}</body></html>"


def _img(png: bytes) -> str:
    return f"<img style='max-width:100%' src='data:image/png;base64,{base64.b64encode(png).decode()}'>"


def plan_html(result: PlanResult, png: bytes | None = None) -> str:
    i = result.inputs
    cols = [_rows(result.colocated), _rows(result.disaggregated)] + ([_rows(result.heterogeneous)] if result.heterogeneous else [])
    rows = "".join(
        f"<tr><th>{html.escape(label)}</th>" + "".join(f"<td>{html.escape(v).replace(chr(10), '<br>')}</td>" for v in vals) + "</tr>"
        for label, *vals in zip(LABELS, *cols)
    )
    reasons = "".join(f"<li>{html.escape(r)}</li>" for r in result.reasons)
    inputs = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in i.items())
    body = (
        f"<h1>splitserve plan: {html.escape(i['model'])}</h1>"
        f"<p class='v'>verdict: {html.escape(result.verdict)}"
        + (f" ({result.advantage:.2f}x)" if result.advantage is not None else "") + "</p>"
        f"<ul>{reasons}</ul><table><tr><th></th><th>colocated</th><th>disaggregated</th>{'<th>heterogeneous</th>' if result.heterogeneous else ''}</tr>{rows}</table>"
        + (_img(png) if png else "")
        + f"<h2>inputs</h2><table>{inputs}</table>"
    )
    return _html_page(f"splitserve plan {i['model']}", body)


def sweep_html(result: AxisSweep, png: bytes | None = None) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(p.value)}</td><td>{html.escape(p.result.colocated.config if p.result and p.result.colocated else '-')}</td>"
        f"<td>{p.colocated_per_gpu:.3g}</td><td>{html.escape(p.result.disaggregated.config if p.result and p.result.disaggregated else '-')}</td>"
        f"<td>{p.disaggregated_per_gpu:.3g}</td><td>{html.escape(p.verdict)}</td></tr>"
        for p in result.points
    )
    body = (
        f"<h1>splitserve plan sweep: {html.escape(result.axis)}</h1>" + (_img(png) if png else "")
        + "<table><tr><th>value</th><th>best colocated</th><th>req/s/GPU</th><th>best disaggregated</th><th>req/s/GPU</th><th>verdict</th></tr>"
        + rows + "</table>"
    )
    for p in result.points:
        if p.result:
            body += f"<h3>{html.escape(result.axis)} = {html.escape(p.value)}: {html.escape(p.result.verdict)}</h3><ul>"
            body += "".join(f"<li>{html.escape(r)}</li>" for r in p.result.reasons) + "</ul>"
    return _html_page(f"splitserve plan sweep {result.axis}", body)


def write_plan(result: PlanResult, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    png = plan_figure(result)
    files = [out / "plan.json", out / "plan.png", out / "index.html"]
    files[0].write_text(dumps(plan_json(result)))
    files[1].write_bytes(png)
    files[2].write_text(plan_html(result, png))
    return files


def write_sweep(result: AxisSweep, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    png = sweep_figure(result)
    name = f"sweep-{result.axis}"
    files = [out / f"{name}.json", out / f"{name}.png", out / f"{name}.html"]
    files[0].write_text(dumps(sweep_json(result)))
    files[1].write_bytes(png)
    files[2].write_text(sweep_html(result, png))
    return files
