"""What a person reads: the summary table, the sweep table, two runs side by side.

Everything here works on the result document (results.result_dict, or a file read back), so a table
printed at the end of a run and one printed later from its JSON are the same table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from rich.console import Console
from rich.table import Table

from splitserve.bench.results import BenchResult, read_json, result_dict

LATENCIES = (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2e", "E2E latency"))
QUANTILES = ("mean", "p50", "p90", "p99")


def print_result(result: BenchResult, console: Console) -> None:
    doc = result_dict(result)
    for note in doc["runs"][0]["workload"]["notes"]:
        console.print(f"[dim]workload:[/] {note}")
    console.print(f"[dim]target:[/] {doc['target']['url']} model {doc['target']['model']}")
    if doc["summary"] is not None:
        print_summary(doc["summary"], console)
    if doc["sweep"] is not None:
        print_sweep(doc["sweep"], console)


def latency_table(s: dict[str, Any], title: str = "Latency (ms)") -> Table:
    """TTFT, TPOT, ITL and E2E: count, mean and percentiles (the end-of-run table and the live one)."""
    lat = Table(title=title, title_justify="left")
    lat.add_column("metric")
    lat.add_column("n", justify="right")
    for q in QUANTILES:
        lat.add_column(q, justify="right")
    for key, label in LATENCIES:
        lat.add_row(label, str(s[key]["count"]), *(_ms(s[key][q]) for q in QUANTILES))
    return lat


def print_summary(s: dict[str, Any], console: Console) -> None:
    console.print(latency_table(s))

    overview = Table(title="Run", title_justify="left", show_header=False)
    overview.add_column()
    overview.add_column(justify="right")
    overview.add_row("requests", f"{s['num_ok']} ok / {s['num_requests']}")
    for label, count in s["errors"].items():
        overview.add_row(f"  failed: {label}", f"[red]{count}[/]")
    overview.add_row("duration", f"{s['duration_s']:.2f} s")
    overview.add_row("request throughput", f"{s['request_throughput']:.3f} req/s")
    overview.add_row("output throughput", f"{s['output_throughput']:.1f} tok/s")
    overview.add_row("total token throughput", f"{s['total_token_throughput']:.1f} tok/s")
    overview.add_row("prompt tokens (cached)", f"{s['prompt_tokens']} ({s['cached_tokens']}, {s['cache_hit_rate']:.1%})")
    if s["short_outputs"]:
        overview.add_row("[yellow]outputs shorter than max_tokens[/]", f"[yellow]{s['short_outputs']}[/]")
    if s["attainment"] is not None:
        overview.add_row(f"SLO attainment ({_slo_text(s)})", f"{s['attainment']:.1%}")
    console.print(overview)


def print_sweep(sw: dict[str, Any], console: Console) -> None:
    t = Table(title=f"Goodput sweep (target attainment {sw['target']:.0%})", title_justify="left")
    for col in ("rate (req/s)", "trials", "median", "meets target"):
        t.add_column(col, justify="right")
    for p in sorted(sw["probes"], key=lambda p: p["rate"]):
        trials = " ".join(f"{a:.0%}" for a in p["attainments"])
        t.add_row(f"{p['rate']:.3g}", trials, f"{p['median']:.1%}", "yes" if p["passed"] else "[red]no[/]")
    console.print(t)
    console.print(_goodput_text(sw))


def _goodput_text(sw: dict[str, Any]) -> str:
    if sw["goodput"] is None:
        return f"goodput: below {sw['upper']:.3g} req/s (the lowest rate tried missed the target)"
    if sw["upper"] is None:
        return f"goodput: at least {sw['lower']:.3g} req/s (the highest rate tried met the target)"
    return f"goodput: {sw['goodput']:.3g} req/s (met at {sw['lower']:.3g}, missed at {sw['upper']:.3g} req/s)"


# --------------------------------------------------------------------------------------------- compare

Row = tuple[str, Callable[[dict[str, Any]], float | None], bool]  # label, value from a document, higher is better


def _summary_value(*keys: str) -> Callable[[dict[str, Any]], float | None]:
    def get(doc: dict[str, Any]) -> float | None:
        v: Any = doc.get("summary")
        for k in keys:
            v = v.get(k) if isinstance(v, dict) else None
        return v

    return get


def _ms_value(key: str, q: str) -> Callable[[dict[str, Any]], float | None]:
    get = _summary_value(key, q)
    return lambda doc: None if get(doc) is None else get(doc) * 1000


COMPARE_ROWS: list[Row] = [
    ("goodput (req/s)", lambda d: (d.get("sweep") or {}).get("goodput"), True),
    ("successful requests", _summary_value("num_ok"), True),
    ("request throughput (req/s)", _summary_value("request_throughput"), True),
    ("output throughput (tok/s)", _summary_value("output_throughput"), True),
    ("total token throughput (tok/s)", _summary_value("total_token_throughput"), True),
    *[(f"{label} {q} (ms)", _ms_value(key, q), False) for key, label in LATENCIES for q in QUANTILES],
    ("SLO attainment", _summary_value("attainment"), True),
    ("prefix cache hit rate", _summary_value("cache_hit_rate"), True),
]


def compare(path_a: str | Path, path_b: str | Path, console: Console) -> None:
    """Print two result files side by side, with B/A ratios (green where B is better)."""
    a, b = read_json(path_a), read_json(path_b)
    t = Table(title="Comparison", title_justify="left")
    t.add_column("metric")
    t.add_column(f"A: {path_a}", justify="right")
    t.add_column(f"B: {path_b}", justify="right")
    t.add_column("B / A", justify="right")
    for label, get, higher_better in COMPARE_ROWS:
        va, vb = get(a), get(b)
        if va is None and vb is None:
            continue
        t.add_row(label, _num(va), _num(vb), _ratio(va, vb, higher_better))
    console.print(f"A: {a['target']['model']} at {a['target']['url']}")
    console.print(f"B: {b['target']['model']} at {b['target']['url']}")
    for doc, name in ((a, "A"), (b, "B")):
        if doc.get("summary") and doc["summary"]["errors"]:
            errors = ", ".join(f"{k}: {v}" for k, v in doc["summary"]["errors"].items())
            console.print(f"[red]{name} failures[/]: {errors}")
    console.print(t)


def _ratio(a: float | None, b: float | None, higher_better: bool) -> str:
    if a is None or b is None or a == 0:
        return "-"
    r = b / a
    if r == 1:
        return "1.00x"
    better = (r > 1) == higher_better
    return f"[{'green' if better else 'red'}]{r:.2f}x[/]"


def _num(v: float | None) -> str:
    if v is None:
        return "-"
    if isinstance(v, int):
        return str(v)
    return f"{v:.3g}" if abs(v) < 100 else f"{v:.1f}"


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.1f}"


def _slo_text(s: dict[str, Any]) -> str:
    parts = []
    if s["slo_ttft_s"] is not None:
        parts.append(f"TTFT <= {s['slo_ttft_s'] * 1000:g} ms")
    if s["slo_tpot_s"] is not None:
        parts.append(f"TPOT <= {s['slo_tpot_s'] * 1000:g} ms")
    if s.get("slo_max_gap_s") is not None:  # results written before the gap SLO have no such key
        parts.append(f"no gap > {s['slo_max_gap_s'] * 1000:g} ms")
    return ", ".join(parts)
