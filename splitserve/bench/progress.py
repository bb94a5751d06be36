"""What a run shows while it runs: a progress bar per run (a sweep shows each probed rate and trial in
turn) and, below it, a live table of the latency percentiles of the requests finished so far: the same
TTFT, TPOT, ITL and E2E figures, computed the same way (workload.slo.summarize), as the final table."""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Iterable

from rich.console import Console, RenderableType
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from splitserve.bench.report import LATENCIES, latency_table
from splitserve.workload.record import RequestRecord
from splitserve.workload.slo import summarize

# Percentiles over every finished request are recomputed at most this often: O(requests) each time, and a
# human reads the table a few times a second at most.
TABLE_REFRESH_S = 0.5


class LiveLatencies:
    """The latency table of the requests finished so far, recomputed at most every TABLE_REFRESH_S."""

    def __init__(self) -> None:
        self.records: list[RequestRecord] = []
        self._table: Table | None = None
        self._at = -float("inf")

    def add(self, record: RequestRecord) -> None:
        self.records.append(record)

    def invalidate(self) -> None:
        """Recompute at the next draw (the last one, when the display stops, must show every request)."""
        self._table = None

    def table(self, now: float | None = None) -> Table:
        now = time.monotonic() if now is None else now
        if self._table is None or now - self._at >= TABLE_REFRESH_S:
            s = summarize(self.records)
            doc = {key: asdict(getattr(s, key)) for key, _ in LATENCIES}
            failed = s.num_requests - s.num_ok
            self._table = latency_table(doc, f"Latency so far (ms): {s.num_ok} ok" + (f", {failed} failed" if failed else ""))
            self._at = now
        return self._table


class _ProgressWithTable(Progress):
    def __init__(self, latencies: LiveLatencies, *columns, **kwargs) -> None:  # type: ignore[no-untyped-def]
        self.latencies = latencies  # first: Progress renders while it is being made
        super().__init__(*columns, **kwargs)

    def get_renderables(self) -> Iterable[RenderableType]:
        yield from super().get_renderables()
        yield self.latencies.table()


class RunProgress:
    """A context manager; with enabled=False every call does nothing, so callers need no branches. The live
    table shows only with `live_table` and on a terminal (piped output gets the final table alone)."""

    def __init__(self, enabled: bool, console: Console | None = None, live_table: bool = True) -> None:
        console = console or Console()
        self.latencies = LiveLatencies() if enabled and live_table and console.is_terminal else None
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("failed {task.fields[failed]}"), TimeElapsedColumn())
        if not enabled:
            self._progress: Progress | None = None
        elif self.latencies is not None:
            self._progress = _ProgressWithTable(self.latencies, *columns, console=console, transient=False)
        else:
            self._progress = Progress(*columns, console=console, transient=False)
        self._task = None
        self._failed = 0

    def __enter__(self) -> RunProgress:
        if self._progress:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress:
            if self.latencies is not None:
                self.latencies.invalidate()
            self._progress.stop()

    def start_run(self, description: str, total: int) -> None:
        if self._progress:
            self._failed = 0
            if self.latencies is not None:
                self.latencies.records.clear()  # each run (each sweep trial) has its own percentiles
            self._task = self._progress.add_task(description, total=total, failed=0)

    def done(self, record: RequestRecord) -> None:
        if self._progress and self._task is not None:
            self._failed += not record.ok
            if self.latencies is not None:
                self.latencies.add(record)
            self._progress.update(self._task, advance=1, failed=self._failed)
