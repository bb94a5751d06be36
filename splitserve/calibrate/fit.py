"""Fitting the performance model's efficiencies and overheads to timed engine steps."""

from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np

from splitserve.calibrate.table import Point
from splitserve.core.model_spec import ModelSpec
from splitserve.sim.hardware import Hardware
from splitserve.sim.perf import Efficiency, PerfModel


def fit(model: ModelSpec, hardware: Hardware, points: Sequence[Point]) -> tuple[Efficiency, float, float]:
    """Efficiencies and overheads minimising squared relative error over `points`.

    Grid search over the compute, attention, memory and KV-read efficiencies; for each, the overheads (per step,
    per sequence, per token) by non-negative least squares, solved for every grid point at once: the design
    matrix is the same for all of them, so each active set's pseudo-inverse is computed once."""
    if not points:
        raise ValueError("no calibration points")
    pm = PerfModel(model, hardware, 1, Efficiency(step_overhead_s=0.0, seq_overhead_s=0.0, token_overhead_s=0.0))
    parts = np.array([pm.roofline_parts(p.batch) for p in points])  # [P, 9]
    lin_c, lin_m, att_c, att_m, comm, head_c, head_m, seqs, tokens = parts.T
    t = np.array([p.seconds for p in points])
    w = 1.0 / t
    grid = np.geomspace(0.01, 3.0, 16)  # above 1: the measured peak was not the best this machine does
    ec, ea, em, ek = (g[..., None] for g in np.meshgrid(grid, grid, grid, grid, indexing="ij"))  # [G, G, G, G, 1]
    roof = model.num_layers * (np.maximum(lin_c / ec, lin_m / em) + np.maximum(att_c / ea, att_m / ek) + comm)
    roof = roof + np.maximum(head_c / ec, head_m / em)  # [G, G, G, G, P]
    y = ((t - roof) * w).reshape(-1, len(t))  # weighted residual the overheads must explain
    # On a CPU the split between a per-token overhead and compute, or a per-step overhead and reading the
    # weights, is barely identifiable; the fit is judged by its predictions, which is what the simulator uses.
    a = np.stack([np.ones_like(t), seqs, tokens], axis=1) * w[:, None]  # [P, 3]
    best_err = np.sum(y**2, axis=1)
    best_x = np.zeros((len(y), 3))
    for r in (1, 2, 3):
        for cols in itertools.combinations(range(3), r):
            x = y @ np.linalg.pinv(a[:, cols]).T  # [N, r]
            err = np.sum((x @ a[:, cols].T - y) ** 2, axis=1)
            better = np.all(x >= 0, axis=1) & (err < best_err)
            best_err = np.where(better, err, best_err)
            full = np.zeros((len(y), 3))
            full[:, cols] = x
            best_x = np.where(better[:, None], full, best_x)
    i = int(np.argmin(best_err))
    gi = np.unravel_index(i, (len(grid),) * 4)
    x = best_x[i]
    eff = Efficiency(compute=float(grid[gi[0]]), attention=float(grid[gi[1]]), memory=float(grid[gi[2]]),
                     kv_memory=float(grid[gi[3]]), step_overhead_s=float(x[0]), seq_overhead_s=float(x[1]),
                     token_overhead_s=float(x[2]))
    fitted = PerfModel(model, hardware, 1, eff)
    rel = []
    for p in points:
        p.predicted = fitted.step(p.batch).seconds
        rel.append(abs(p.predicted - p.seconds) / p.seconds)
    return eff, float(np.median(rel)), float(np.percentile(rel, 90))
