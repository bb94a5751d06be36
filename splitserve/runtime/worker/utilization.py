"""Phase utilisation of a worker, live: achieved FLOP/s and bytes/s over the machine's peaks (issue #7).

Each engine step's FLOPs and memory traffic come from the model's own account (`core.model_spec.WorkModel`,
the very numbers `splitserve plan` reports for simulated pools), divided by the step's measured seconds and
by this machine's peaks (`peaks.py`):

    compute utilisation   = sum(step FLOPs) / sum(step seconds) / peak FLOP/s
    bandwidth utilisation = sum(step bytes) / sum(step seconds) / peak bytes/s

over the steps of the last `window_s` seconds (while stepping: a prefill worker shows high compute, a decode
worker high bandwidth), and `busy` = the fraction of the window spent in steps (multiply to get utilisation
over wall time, as the simulator reports it).

Wiring (a worker): `meter = UtilizationMeter.for_engine(engine)`, `meter.attach(engine)` (or call
`meter.observe(out, seconds)` after each step), `registry.register(UtilizationCollector(meter))`.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from splitserve.core.model_spec import ModelSpec, WorkModel, StepWork
from splitserve.core.scheduler import SchedulerOutput
from splitserve.runtime.worker.peaks import MachinePeaks, machine_peaks

COMPUTE_METRIC = "splitserve_compute_utilization_ratio"
BANDWIDTH_METRIC = "splitserve_memory_bandwidth_utilization_ratio"
BUSY_METRIC = "splitserve_engine_busy_ratio"


@dataclass(frozen=True)
class Utilization:
    compute: float  # achieved FLOP/s while stepping / peak
    bandwidth: float  # achieved bytes/s while stepping / peak
    busy: float  # fraction of the window spent in steps
    steps: int


class UtilizationMeter:
    """Windowed achieved/peak ratios of one worker from its steps' roofline FLOPs and bytes."""

    def __init__(self, model: ModelSpec, peaks: MachinePeaks, window_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic, adaptive: bool = True) -> None:
        if not (peaks.flops > 0 and peaks.bandwidth > 0):
            raise ValueError("peaks must be positive")
        self.peaks, self.window_s, self.clock, self.adaptive = peaks, window_s, clock, adaptive
        self.counter = WorkModel(model)
        self._steps: deque[tuple[float, float, float, float]] = deque()  # (end time, seconds, flops, bytes)
        self._lock = threading.Lock()
        self.total_flops = self.total_bytes = self.total_s = 0.0

    @classmethod
    def for_engine(cls, engine, calibration: str | Path | None = None, window_s: float = 30.0) -> UtilizationMeter:
        """A meter for an `Engine` (its loaded model, in the dtype it was loaded in) and this machine's peaks."""
        return cls(engine.loaded.config, machine_peaks(calibration), window_s)

    def cost(self, out: SchedulerOutput) -> StepWork:
        """FLOPs and bytes of one step (the planner's accounting)."""
        return self.counter.scheduled(out)

    def observe(self, out: SchedulerOutput, seconds: float, now: float | None = None) -> StepWork:
        """Record one step: the scheduler's output and its measured seconds."""
        c = self.cost(out)
        self.observe_work(c.flops, c.bytes, seconds, now)
        return c

    def observe_work(self, flops: float, nbytes: float, seconds: float, now: float | None = None) -> None:
        now = self.clock() if now is None else now
        if self.adaptive and seconds > 0:
            # A peak measured on a busy machine can come out below what a real step then reaches: a peak is
            # at least the best rate seen (so the ratios stay <= 1 and the prefill/decode contrast stays right).
            f, b = flops / seconds, nbytes / seconds
            if f > self.peaks.flops or b > self.peaks.bandwidth:
                self.peaks = MachinePeaks(max(f, self.peaks.flops), max(b, self.peaks.bandwidth), self.peaks.source + " (raised by a step)")
        with self._lock:
            self._steps.append((now, max(seconds, 0.0), flops, nbytes))
            self.total_flops += flops
            self.total_bytes += nbytes
            self.total_s += max(seconds, 0.0)
            self._trim(now)

    def _trim(self, now: float) -> None:
        while self._steps and self._steps[0][0] < now - self.window_s:
            self._steps.popleft()

    def utilization(self, now: float | None = None) -> Utilization:
        now = self.clock() if now is None else now
        with self._lock:
            self._trim(now)
            steps = list(self._steps)
        secs = sum(s[1] for s in steps)
        if not steps or secs <= 0:
            return Utilization(0.0, 0.0, 0.0, len(steps))
        flops, nbytes = sum(s[2] for s in steps), sum(s[3] for s in steps)
        span = max(min(self.window_s, now - (steps[0][0] - steps[0][1])), secs)
        return Utilization(flops / secs / self.peaks.flops, nbytes / secs / self.peaks.bandwidth, secs / span, len(steps))

    def attach(self, engine) -> None:
        """Observe every step of `engine`."""
        engine.step_observers.append(self.observe)


class UtilizationCollector:
    """Prometheus collector: the meter's compute and memory-bandwidth utilisation (and busy fraction)."""

    def __init__(self, meter: UtilizationMeter, labels: dict[str, str] | None = None) -> None:
        self.meter, self.labels = meter, dict(labels or {})

    def describe(self) -> Iterator:
        return iter(())

    def collect(self) -> Iterator:
        from prometheus_client.core import GaugeMetricFamily

        u = self.meter.utilization()
        names, values = list(self.labels), list(self.labels.values())
        for metric, help_, value in (
            (COMPUTE_METRIC, "Achieved FLOP/s while stepping over the machine's peak (roofline FLOPs per step)", u.compute),
            (BANDWIDTH_METRIC, "Achieved memory bytes/s while stepping over the machine's peak bandwidth", u.bandwidth),
            (BUSY_METRIC, "Fraction of the utilisation window spent in engine steps", u.busy),
        ):
            g = GaugeMetricFamily(metric, help_, labels=names)
            g.add_metric(values, value)
            yield g
