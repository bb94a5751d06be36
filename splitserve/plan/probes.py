"""Where the planner's simulations run: in the calling thread, or on one pool of processes that every mode's
search shares.

A search is a chain of probes, each waiting for the last; one chain per process (the old split: one mode per
process) left a core idle once the shorter mode was done, while the disaggregated chain, with its larger units,
ran on alone for most of the wall time. On a shared pool each mode's chain is a thread that waits on its
probes, and a chain submits ahead what it will need anyway (a bracket's upper end, every later candidate's
bar), and on a process otherwise idle what it will need if the current probe passes (`idle()`; see
`evaluate.evaluate`), so the cores stay busy until the last probe.
"""

from __future__ import annotations

import multiprocessing as mp
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any, Callable, Generic, TypeVar

P = TypeVar("P")  # what one probe gives
Measure = Callable[[Any, Any, float, Any], Any]  # (plan, unit, rate, stop) -> probe

_worker: tuple[Measure, Any] | None = None  # in a pool process: the measure and the plan, inherited by fork


def _init(measure: Measure, plan: Any) -> None:
    global _worker
    _worker = (measure, plan)


def _run(unit: Any, rate: float, stop: Any) -> Any:
    assert _worker is not None, "a probe ran outside the prober's pool"
    measure, plan = _worker
    return measure(plan, unit, rate, stop)


def _nothing() -> None:
    return None


class Prober(Generic[P]):
    """`submit(unit, rate, stop)` runs `measure(plan, unit, rate, stop)`: at once in this thread (jobs <= 1),
    or on `jobs` forked processes, the plan handed over once by the fork rather than pickled per probe."""

    def __init__(self, measure: Callable[[Any, Any, float, Any], P], plan: Any, jobs: int) -> None:
        self.measure, self.plan = measure, plan
        self.parallel = jobs >= 2
        self.jobs = jobs
        self._inflight: set[Future[P]] = set()  # submitted to the pool, not done (queued or running)
        self._pool: ProcessPoolExecutor | None = None
        if self.parallel:
            self._pool = ProcessPoolExecutor(jobs, mp_context=mp.get_context("fork"), initializer=_init,
                                             initargs=(measure, plan))
            # Every process is forked now, from this thread, before any search thread exists (forking a
            # process with threads running can copy a lock that one of them holds).
            self._pool.submit(_nothing).result()

    def submit(self, unit: Any, rate: float, stop: Any = "tail") -> Future[P]:
        if self._pool is not None:
            f = self._pool.submit(_run, unit, rate, stop)
            self._inflight.add(f)
            f.add_done_callback(self._inflight.discard)
            return f
        done: Future[P] = Future()
        done.set_result(self.measure(self.plan, unit, rate, stop))
        return done

    def idle(self) -> int:
        """Processes that would start a probe submitted now at once (0 inline): what speculation may use
        without delaying a probe some search waits on."""
        return max(0, self.jobs - len(self._inflight)) if self.parallel else 0

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Prober[P]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
