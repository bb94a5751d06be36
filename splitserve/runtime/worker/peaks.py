"""This machine's peaks: the FLOP/s and bytes/s that utilisation is measured against and calibration fits to.

From a calibration file of `splitserve plan calibrate` (its hardware's `flops` and `mem_bw`), or measured here
once with torch (a float32 matrix product and a large tensor copy) and cached in-process and on disk
($XDG_CACHE_HOME/splitserve/peaks.json, per host and thread count), so that the workers of one machine do not
all measure at once.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable


@dataclass(frozen=True)
class MachinePeaks:
    flops: float  # FLOP/s
    bandwidth: float  # bytes/s
    source: str = ""


def step_clock(threads: int, cpu_time: bool = False) -> Callable[[], float]:
    """The clock profiling uses: wall time (what a served request sees, neighbours on the cores included),
    or with `cpu_time` and one torch thread (every kernel then runs on the calling thread) the thread's CPU
    time: the engine's own cost, whatever else shares the cores."""
    return time.thread_time if cpu_time and threads == 1 else time.perf_counter


def measure_peaks(threads: int | None = None, seconds: float = 0.5, min_runs: int = 5, cpu_time: bool = False) -> tuple[float, float]:
    """(FLOP/s of float32 matrix products, bytes/s of a large copy) on this machine with torch: the best of
    at least `min_runs` timed runs after an untimed one (the first touches fresh pages)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    clock = step_clock(torch.get_num_threads(), cpu_time)

    def best(op, work: float) -> float:
        op()
        top, runs, end = 0.0, 0, time.perf_counter() + seconds
        while runs < min_runs or time.perf_counter() < end:
            t = clock()
            op()
            top = max(top, work / max(clock() - t, 1e-9))
            runs += 1
        return top

    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    src = torch.empty(32 << 20)  # 128 MiB
    src.fill_(1.0)
    dst = torch.empty_like(src)
    return best(lambda: torch.mm(a, b), 2 * n**3), best(lambda: dst.copy_(src), 2 * src.numel() * 4)


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
