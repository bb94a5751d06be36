"""The live progress bar: one task per run (a sweep shows each probed rate and trial in turn)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from splitserve.workload.record import RequestRecord


class RunProgress:
    """A context manager; with enabled=False every call does nothing, so callers need no branches."""

    def __init__(self, enabled: bool, console: Console | None = None) -> None:
        self._progress = (
            Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("failed {task.fields[failed]}"),
                TimeElapsedColumn(),
                console=console,
                transient=False,
            )
            if enabled
            else None
        )
        self._task = None
        self._failed = 0

    def __enter__(self) -> RunProgress:
        if self._progress:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress:
            self._progress.stop()

    def start_run(self, description: str, total: int) -> None:
        if self._progress:
            self._failed = 0
            self._task = self._progress.add_task(description, total=total, failed=0)

    def done(self, record: RequestRecord) -> None:
        if self._progress and self._task is not None:
            self._failed += not record.ok
            self._progress.update(self._task, advance=1, failed=self._failed)
