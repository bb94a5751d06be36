"""Calibration run: profile the real engine on this machine and fit the performance model to it.

1. Measure the machine's peaks: FLOP/s of a large matrix product, bytes/s of a large copy
   (`runtime/worker/peaks.py`).
2. Run the real `Engine` over a grid of batches: prefills of several lengths, alone and batched, some over a
   cached prefix; decode steps of several batch sizes and context lengths; prompt chunks beside decodes. Each timed step is recorded with
   the batch the scheduler actually ran (new tokens, cached tokens, sampled) and its wall time.
3. Fit `Efficiency` (`fit.py`). The fitted model then times batches for the simulator on this machine.

The result (`table.Calibration`) is a JSON file `splitserve plan --calibration FILE` and
`benchmarks/sim_accuracy.py` load; reading one needs neither torch nor this module.
"""

from __future__ import annotations

import itertools
import logging
import os
import platform
import random
import time
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import torch

from splitserve.calibrate.fit import fit
from splitserve.calibrate.table import Batch, Calibration, Point, cpu_hardware
from splitserve.core.request import SamplingParams
from splitserve.model import paged_kernel
from splitserve.model.loader import load_model
from splitserve.runtime.config import EngineConfig
from splitserve.runtime.worker.engine import Engine
from splitserve.runtime.worker.peaks import measure_peaks, step_clock

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Grid:
    prefill: tuple[tuple[int, int, int], ...]  # (prompts, new tokens each, cached prefix tokens)
    decode: tuple[tuple[int, int], ...]  # (batch, context tokens)
    # (decoding requests, their context tokens, prompt chunk tokens, the chunk's cached prefix tokens): a
    # prompt chunk computed beside running decodes, the step chunked prefill and a decode worker's local
    # prefill run all the time while serving.
    mixed: tuple[tuple[int, int, int, int], ...] = ()
    decode_steps: int = 6  # timed steps per decode point (their median): single CPU steps jitter by ~10 %
    repeats: int = 3

    @classmethod
    def default(cls, quick: bool = False) -> Grid:
        if quick:
            return cls(((1, 16, 0), (1, 128, 0), (2, 64, 0), (1, 64, 128)), ((1, 32), (4, 64), (8, 128)),
                       ((2, 64, 16, 32),), 2, 1)
        return cls(
            # Up to 2,048 tokens: attention's share grows with the square of the length, and only long
            # prompts pin down its efficiency (a fit on <= 1,024 underestimated a 1,362-token prefill by 16 %).
            # Several long prompts in one step too: a burst batches them, and a fit on single prompts
            # overestimated such steps (1,286 tokens in 3 prompts) by 9 %.
            ((1, 16, 0), (1, 64, 0), (1, 128, 0), (1, 256, 0), (1, 512, 0), (1, 1024, 0), (1, 1536, 0), (1, 2048, 0),
             (4, 64, 0), (8, 32, 0), (2, 512, 0), (3, 512, 0), (5, 256, 0), (2, 1024, 0),
             (1, 64, 448), (1, 128, 256), (1, 256, 768),
             # A 128-token chunk over 1-2k cached tokens: the chunked deployment's steps through a long prompt
             # (Mooncake's and the seed load's reach 2.7k). Without them the fit extrapolated from 768 cached
             # tokens: 128 over 1,024 took 0.33 s alone and 0.54 s served against its 0.30 s.
             (1, 128, 1024), (1, 128, 2048)),
            # Contexts up to 2,048 too: with none past 512 the fit left KV reads unpinned, and served decodes of
            # 1-2k-token contexts ran 1.1-1.6x its prediction (benchmarks.interference's step logs).
            ((1, 64), (1, 512), (4, 64), (4, 512), (8, 128), (16, 64), (16, 512), (32, 128), (48, 256),
             (1, 1024), (1, 2048), (4, 1024), (4, 2048), (8, 1024), (16, 1024)),
            # 128-token chunks (the chunked deployment's) and 32-token ones (the decode worker's local prefill)
            # over 0-2,048 cached tokens beside 1-8 decodes of 1k contexts: served, such steps ran 1.2-1.4x a
            # fit that had never timed one.
            ((1, 1024, 128, 0), (2, 1024, 128, 512), (4, 1024, 128, 1024), (4, 1024, 32, 0), (8, 1024, 32, 512),
             (2, 512, 128, 256), (2, 1024, 128, 2048)),
        )


def _capture(engine: Engine) -> Callable[[], list[Batch]]:
    """Record the batch of every step the engine's scheduler plans, as plain tuples."""
    sched = engine.scheduler
    plan = sched.schedule
    seen: list[Batch] = []

    def schedule(now: float):
        out = plan(now)
        seen.append([(s.num_new_tokens, s.start_pos, s.sample) for s in out.seqs])
        return out

    sched.schedule = schedule
    return lambda: seen


def profile_engine(
    engine: Engine, grid: Grid, vocab: int, on_point: Callable[[Point], None] | None = None, seed: int = 0,
    clock: Callable[[], float] = time.perf_counter,
) -> list[Point]:
    """Time real engine steps over `grid` with `clock`; the engine must be idle."""
    rng = random.Random(seed)
    batches = _capture(engine)
    counter = itertools.count()

    def prompt(n: int) -> list[int]:
        return [rng.randrange(100, vocab - 1) for _ in range(n)]

    def timed_step() -> tuple[Batch, float]:
        t = clock()
        engine.step(time.monotonic())
        dt = clock() - t
        return batches()[-1], dt

    def drain() -> None:
        while engine.has_work():
            engine.step(time.monotonic())

    points: list[Point] = []
    warm = SamplingParams(max_tokens=4, ignore_eos=True)  # first calls allocate and pick kernels: not timed
    for _ in range(2):
        engine.add_request(f"cal{next(counter)}", prompt(64), warm, 0.0)
    drain()

    def add(kind: str, batch: Batch, times: list[float]) -> None:
        p = Point(kind, batch, float(np.median(times)))
        points.append(p)
        if on_point:
            on_point(p)

    one = SamplingParams(max_tokens=1, ignore_eos=True)
    for k, n, cached in grid.prefill:
        times, batch = [], []
        for _ in range(grid.repeats):
            prefixes = []
            if cached:
                base = prompt(cached)
                engine.add_request(f"cal{next(counter)}", base, one, 0.0)
                drain()
                prefixes = base
            for _ in range(k):
                engine.add_request(f"cal{next(counter)}", prefixes + prompt(n), one, 0.0)
            batch, dt = timed_step()
            times.append(dt)
            drain()
        add("prefill", batch, times)
    for b, ctx in grid.decode:
        # The prompts take several steps to prefill when they hold more than a step's token budget, and the
        # first ones decode meanwhile: each must outlast that by the timed steps, or the batch never reaches
        # `b` decodes and the point is lost (48 x 256 and 16 x 1,024 were, silently, at the 2,048 budget).
        # Twice the steps their tokens fill: the decodes beside them take from the same budget.
        prefill_steps = -(-b * ctx // engine.config.max_num_batched_tokens)
        params = SamplingParams(max_tokens=grid.decode_steps + 2 * prefill_steps + 1, ignore_eos=True)
        for _ in range(b):
            engine.add_request(f"cal{next(counter)}", prompt(ctx), params, 0.0)
        while True:  # prefill everything (untimed)
            engine.step(time.monotonic())
            if all(n == 1 for n, _, _ in batches()[-1]) or not engine.has_work():
                break
        times, batch = [], []
        while engine.has_work():
            batch_now, dt = timed_step()
            if len(batch_now) == b and all(n == 1 for n, _, _ in batch_now) and len(times) < grid.decode_steps:
                times.append(dt)
                batch = batch_now
        if times:
            add("decode", batch, times)
        else:  # said, not swallowed: two such points were lost unseen until a fit missed them
            log.warning("calibration point lost: the engine never ran %d decodes of %d-token contexts at once", b, ctx)
    for d, ctx, chunk, cached in grid.mixed:
        # Enough tokens to still be decoding at the last repeat: a step or two each, and a few while they prefill.
        long = SamplingParams(max_tokens=2 * grid.repeats + 8, ignore_eos=True)
        for _ in range(d):
            engine.add_request(f"cal{next(counter)}", prompt(ctx), long, 0.0)
        while True:  # prefill them (untimed)
            engine.step(time.monotonic())
            if all(n == 1 for n, _, _ in batches()[-1]):
                break
        times, batch = [], []
        for _ in range(grid.repeats):
            base = prompt(cached)
            if cached:  # prefilled beside the decodes (untimed); it ends there and its blocks stay cached
                engine.add_request(f"cal{next(counter)}", base, one, 0.0)
                engine.step(time.monotonic())
            engine.add_request(f"cal{next(counter)}", base + prompt(chunk), one, 0.0)
            batch_now, dt = timed_step()
            if sorted(n for n, _, _ in batch_now) == [1] * d + [chunk]:
                times.append(dt)
                batch = batch_now
        drain()
        if times:
            add("prefill", batch, times)
        else:
            log.warning("calibration point lost: the engine never ran a %d-token chunk over %d cached tokens beside "
                        "%d decodes", chunk, cached, d)
    return points


def calibrate(
    model_path: str | None = None,
    threads: int | None = None,
    quick: bool = False,
    engine_kwargs: dict | None = None,
    on_point: Callable[[Point], None] | None = None,
    cpu_time: bool = False,
) -> Calibration:
    """Load the model into a real Engine, measure this machine's peaks, profile the grid, fit."""
    if threads:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    loaded = load_model(model_path)
    engine = Engine(loaded, EngineConfig(**(engine_kwargs or {})))
    # The model starts building its C++ kernels in the background (a served worker answers meanwhile with
    # torch's ops). Timed beside the compiler, a fresh machine's peaks came out at a third and its first
    # prefills at a tenth of their speed; and the grid must time the kernels the engine will serve with.
    kernels = paged_kernel.load()
    flops, bw = measure_peaks(threads, cpu_time=cpu_time)
    try:
        import psutil

        mem = float(psutil.virtual_memory().total)
    except ImportError:  # pragma: no cover
        mem = 8e9
    hw = cpu_hardware(flops, bw, mem, threads)
    spec = replace(loaded.config, name=loaded.name, source="loaded engine model")
    clock = step_clock(threads, cpu_time)
    points = profile_engine(engine, Grid.default(quick), loaded.config.vocab_size, on_point, clock=clock)
    eff, med, p90 = fit(spec, hw, points)
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": threads, "torch": torch.__version__,
               "clock": "thread CPU time" if clock is time.thread_time else "wall", "kernels": kernels,
               "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}
    return Calibration(hw, spec, eff, points, med, p90, machine)
