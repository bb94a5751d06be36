"""The live latency table `splitserve bench` shows while it runs: the final table's percentiles over the
requests finished so far, on a terminal only, and off with --no-live-table."""

from __future__ import annotations

import io

import numpy as np
from rich.console import Console

from splitserve.bench.cli import config_from_args, configure
from splitserve.bench.progress import TABLE_REFRESH_S, LiveLatencies, RunProgress
from splitserve.workload.record import RequestRecord


def record(i: int, ttft: float, gaps: list[float]) -> RequestRecord:
    times = list(np.cumsum([ttft, *gaps]))
    return RequestRecord(i, 0.0, 8, len(times), sent_s=0.0, first_token_s=ttft, token_times_s=times,
                         end_s=times[-1], completion_tokens=len(times), status=200)


def cells(table, row: int) -> list[str]:
    return [str(c._cells[row]) for c in table.columns]


def test_table_shows_the_percentiles_of_the_requests_so_far():
    live = LiveLatencies()
    ttfts = [0.1, 0.2, 0.3, 0.4, 1.0]
    for i, t in enumerate(ttfts):
        live.add(record(i, t, [0.01, 0.03]))
    live.add(RequestRecord(9, 0.0, 8, 3, status=500, error_kind="http"))
    t = live.table(now=0.0)
    assert "5 ok, 1 failed" in str(t.title)
    p50, p90, p99 = np.percentile(ttfts, [50, 90, 99])
    assert cells(t, 0) == ["TTFT", "5", f"{np.mean(ttfts) * 1000:.1f}", f"{p50 * 1000:.1f}", f"{p90 * 1000:.1f}", f"{p99 * 1000:.1f}"]
    itl = cells(t, 2)
    assert itl[:2] == ["ITL", "10"] and itl[3] == f"{np.percentile([0.01, 0.03] * 5, 50) * 1000:.1f}"


def test_table_is_recomputed_at_most_every_refresh_interval():
    live = LiveLatencies()
    live.add(record(0, 0.1, [0.01]))
    first = live.table(now=100.0)
    live.add(record(1, 0.5, [0.01]))
    assert live.table(now=100.0 + TABLE_REFRESH_S / 2) is first
    assert cells(live.table(now=100.0 + TABLE_REFRESH_S), 0)[1] == "2"


def run_with(console: Console, live_table: bool = True) -> str:
    with RunProgress(True, console, live_table) as progress:
        progress.start_run("requests", 2)
        progress.done(record(0, 0.25, [0.02, 0.02]))
        progress.done(record(1, 0.35, [0.02, 0.02]))
    return console.file.getvalue()  # type: ignore[attr-defined]


def test_shown_on_a_terminal_only_and_not_with_the_flag_off():
    on_tty = run_with(Console(file=io.StringIO(), force_terminal=True, width=120))
    assert "Latency so far (ms): 2 ok" in on_tty and "TTFT" in on_tty and "300.0" in on_tty  # TTFT mean
    piped = run_with(Console(file=io.StringIO(), force_terminal=False, width=120))
    assert "Latency so far" not in piped
    off = run_with(Console(file=io.StringIO(), force_terminal=True, width=120), live_table=False)
    assert "Latency so far" not in off and "requests" in off


def test_cli_flag():
    import argparse

    p = argparse.ArgumentParser()
    configure(p)
    assert config_from_args(p.parse_args([])).live_table is True
    assert config_from_args(p.parse_args(["--no-live-table"])).live_table is False
