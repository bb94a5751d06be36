"""Phase utilisation of a worker, live: achieved FLOP/s and bytes/s over the machine's peaks (issue #7).

Each engine step's FLOPs and memory traffic come from the planner's roofline accounting
(`splitserve.sim.perf.PerfModel.scheduled`, the very numbers `splitserve plan` reports for simulated pools),
divided by the step's measured seconds and by the calibrated peaks of the machine the worker runs on:

    compute utilisation   = sum(step FLOPs) / sum(step seconds) / peak FLOP/s
    bandwidth utilisation = sum(step bytes) / sum(step seconds) / peak bytes/s

over the steps of the last `window_s` seconds (while stepping: a prefill worker shows high compute, a decode
worker high bandwidth), and `busy` = the fraction of the window spent in steps (multiply to get utilisation
over wall time, as the simulator reports it).

Peaks: a calibration file from `splitserve plan calibrate` (its hardware's `flops` and `mem_bw`), or
measured here once (a float32 matrix product and a large tensor copy, `sim.calibrate.measure_peaks`) and
cached in-process and on disk ($XDG_CACHE_HOME/splitserve/peaks.json, per host and thread count), so that
the workers of one machine do not all measure at once.

Wiring (a worker): `meter = UtilizationMeter.for_engine(engine)`, `meter.attach(engine)` (or call
`meter.observe(out, seconds)` after each step), `registry.register(UtilizationCollector(meter))`.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterator

from splitserve.sim.hardware import Hardware
from splitserve.sim.models import ModelSpec
from splitserve.sim.perf import Efficiency, PerfModel, StepCost

COMPUTE_METRIC = "splitserve_compute_utilization_ratio"
BANDWIDTH_METRIC = "splitserve_memory_bandwidth_utilization_ratio"
BUSY_METRIC = "splitserve_engine_busy_ratio"


@dataclass(frozen=True)
class MachinePeaks:
    flops: float  # FLOP/s
    bandwidth: float  # bytes/s
    source: str = ""


def _cache_file() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "splitserve" / "peaks.json"


def peaks_from_calibration(path: str | Path) -> MachinePeaks:
    """The peaks of a `splitserve plan calibrate` file (its `hardware`), or of a {"flops", "bandwidth"} file."""
    d = json.loads(Path(path).read_text(encoding="utf-8"))
    hw = d.get("hardware", d)
    flops, bw = hw.get("flops"), hw.get("mem_bw", hw.get("bandwidth"))
    if not (isinstance(flops, (int, float)) and isinstance(bw, (int, float)) and flops > 0 and bw > 0):
        raise ValueError(f"{path}: no positive hardware.flops and hardware.mem_bw")
    return MachinePeaks(float(flops), float(bw), f"calibration {path}")


@lru_cache(maxsize=None)
def _measured(threads: int) -> MachinePeaks:
    key = f"{socket.gethostname()}/{threads}"
    f = _cache_file()
    try:
        d = json.loads(f.read_text(encoding="utf-8"))[key]
        return MachinePeaks(float(d["flops"]), float(d["bandwidth"]), f"measured (cached in {f})")
    except (OSError, ValueError, KeyError, TypeError):
        pass
    from splitserve.calibrate.run import measure_peaks

    flops, bw = measure_peaks(threads, seconds=0.3)
    try:
        f.parent.mkdir(parents=True, exist_ok=True)
        try:
            doc = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            doc = {}
        doc[key] = {"flops": flops, "bandwidth": bw, "measured_at": time.time()}
        tmp = f.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(doc, indent=1), encoding="utf-8")
        tmp.replace(f)
    except OSError:
        pass
    return MachinePeaks(flops, bw, "measured: float32 matmul, tensor copy")


def machine_peaks(calibration: str | Path | None = None, threads: int | None = None) -> MachinePeaks:
    """This machine's peaks: from `calibration` (or $SPLITSERVE_CALIBRATION), else measured once with torch
    (CPU, `threads` torch threads, default the current setting) and cached."""
    path = calibration or os.environ.get("SPLITSERVE_CALIBRATION")
    if path:
        return peaks_from_calibration(path)
    if threads is None:
        import torch

        threads = torch.get_num_threads()
    return _measured(int(threads))


def model_spec(config, dtype_bytes: int = 4, name: str = "engine model") -> ModelSpec:
    """The roofline's view of an engine `ModelConfig` (splitserve/model/config.py)."""
    if isinstance(config, ModelSpec):
        return config
    return ModelSpec(
        name=name, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_layers=config.num_layers, num_heads=config.num_heads, num_kv_heads=config.num_kv_heads,
        head_dim=config.head_dim, vocab_size=config.vocab_size, tie_word_embeddings=config.tie_word_embeddings,
        max_position_embeddings=config.max_position_embeddings, dtype_bytes=dtype_bytes, kv_dtype_bytes=dtype_bytes,
    )


@dataclass(frozen=True)
class Utilization:
    compute: float  # achieved FLOP/s while stepping / peak
    bandwidth: float  # achieved bytes/s while stepping / peak
    busy: float  # fraction of the window spent in steps
    steps: int


class UtilizationMeter:
    """Windowed achieved/peak ratios of one worker from its steps' roofline FLOPs and bytes."""

    def __init__(self, config, peaks: MachinePeaks, dtype_bytes: int = 4, window_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic, adaptive: bool = True) -> None:
        if not (peaks.flops > 0 and peaks.bandwidth > 0):
            raise ValueError("peaks must be positive")
        self.peaks, self.window_s, self.clock, self.adaptive = peaks, window_s, clock, adaptive
        hw = Hardware("this machine", peaks.flops, peaks.bandwidth, 1e30, 1e30, 0.0, gpus_per_node=1, source=peaks.source)
        self.perf = PerfModel(model_spec(config, dtype_bytes), hw, 1, Efficiency())
        self._steps: deque[tuple[float, float, float, float]] = deque()  # (end time, seconds, flops, bytes)
        self._lock = threading.Lock()
        self.total_flops = self.total_bytes = self.total_s = 0.0

    @classmethod
    def for_engine(cls, engine, calibration: str | Path | None = None, window_s: float = 30.0) -> UtilizationMeter:
        """A meter for an `Engine` (its loaded model's config and dtype) and this machine's peaks."""
        loaded = engine.loaded
        nbytes = loaded.dtype.itemsize if hasattr(loaded.dtype, "itemsize") else 4
        return cls(loaded.config, machine_peaks(calibration), nbytes, window_s)

    def cost(self, out) -> StepCost:
        """FLOPs and bytes of a core `SchedulerOutput` (the planner's roofline accounting)."""
        return self.perf.scheduled(out)

    def observe(self, out, seconds: float, now: float | None = None) -> StepCost:
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
