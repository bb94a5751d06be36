"""Fitting the performance model's efficiencies and overheads to timed engine steps."""

from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np

from splitserve.calibrate.table import Calibration, Point
from splitserve.core.model_spec import ModelSpec
from splitserve.sim.hardware import Hardware
from splitserve.sim.perf import Efficiency, PerfModel


def fit(model: ModelSpec, hardware: Hardware, points: Sequence[Point]) -> tuple[Efficiency, float, float]:
    """Efficiencies and overheads minimising squared relative error over `points`.

    Grid search over the compute, attention, memory and KV-read efficiencies, and the prefix-attention one
    where some point has a chunk over a cached context (else it stays `attention`'s); for each, the overheads
    (per step, per sequence, per token) by non-negative least squares, solved for every grid point at once: the
    design matrix is the same for all of them, so each active set's pseudo-inverse is computed once."""
    if not points:
        raise ValueError("no calibration points")
    pm = PerfModel(model, hardware, 1, Efficiency(step_overhead_s=0.0, seq_overhead_s=0.0, token_overhead_s=0.0))
    parts = np.array([pm.roofline_parts(p.batch) for p in points])  # [P, 10]
    lin_c, lin_m, att_c, pre_c, att_m, comm, head_c, head_m, seqs, tokens = parts.T
    t = np.array([p.seconds for p in points])
    w = 1.0 / t
    grid = np.geomspace(0.01, 3.0, 16)  # above 1: the measured peak was not the best this machine does
    g = len(grid)
    # Each efficiency along its own axis of a [G, G, G, G, P] array: compute, attention, memory, KV reads.
    ec, ea, em, ek = (grid.reshape([g if d == axis else 1 for d in range(4)] + [1]) for axis in range(4))
    # On a CPU the split between a per-token overhead and compute, or a per-step overhead and reading the
    # weights, is barely identifiable; the fit is judged by its predictions, which is what the simulator uses.
    a = np.stack([np.ones_like(t), seqs, tokens], axis=1) * w[:, None]  # [P, 3]
    solvers = _solvers(a)
    fixed = model.num_layers * (np.maximum(lin_c / ec, lin_m / em) + comm) + np.maximum(head_c / ec, head_m / em)
    best: tuple[float, float | None, int, np.ndarray] | None = None  # (error, prefix efficiency, grid index, overheads)
    for ep in (grid if np.any(pre_c > 0) else (None,)):
        att = att_c / ea + (pre_c / ea if ep is None else pre_c / ep)
        roof = fixed + model.num_layers * np.maximum(att, att_m / ek)  # [G, G, G, G, P]
        y = ((t - np.broadcast_to(roof, (g,) * 4 + t.shape)) * w).reshape(-1, len(t))  # what the overheads must explain
        err, x = _overheads(y, solvers)
        i = int(np.argmin(err))
        if best is None or err[i] < best[0]:
            best = (float(err[i]), ep, i, x[i])
    _, ep, i, x = best
    gi = np.unravel_index(i, (g,) * 4)
    eff = Efficiency(compute=float(grid[gi[0]]), attention=float(grid[gi[1]]), memory=float(grid[gi[2]]),
                     kv_memory=float(grid[gi[3]]), prefix_attention=None if ep is None else float(ep),
                     step_overhead_s=float(x[0]), seq_overhead_s=float(x[1]), token_overhead_s=float(x[2]))
    fitted = PerfModel(model, hardware, 1, eff)
    rel = []
    for p in points:
        p.predicted = fitted.step(p.batch).seconds
        rel.append(abs(p.predicted - p.seconds) / p.seconds)
    return eff, float(np.median(rel)), float(np.percentile(rel, 90))


Solver = tuple[tuple[int, ...], np.ndarray, np.ndarray]  # (active columns, pseudo-inverse^T, orthonormal basis)


def _solvers(a: np.ndarray) -> list[Solver]:
    """Per active set of the overheads' columns of `a` [P, 3]: its pseudo-inverse (the overheads) and an
    orthonormal basis of its columns (the error they leave), both from one SVD cut at one place, so that where
    the points cannot tell two overheads apart (a rank-deficient set) neither holds a direction the other lacks."""
    out = []
    for cols in (c for r in (1, 2, 3) for c in itertools.combinations(range(a.shape[1]), r)):
        u, sv, vt = np.linalg.svd(a[:, cols], full_matrices=False)
        keep = sv > sv.max() * max(a.shape) * np.finfo(a.dtype).eps
        basis = u[:, keep]
        out.append((cols, (basis / sv[keep]) @ vt[keep], basis))
    return out


def _overheads(y: np.ndarray, solvers: list[Solver]) -> tuple[np.ndarray, np.ndarray]:
    """Per row of residuals `y` [N, P]: the non-negative overheads x [N, 3] (least squares over every active set
    of the overheads' columns) and the squared error left."""
    yy = np.einsum("np,np->n", y, y)
    best_err = yy.copy()
    best_x = np.zeros((len(y), 3))
    for cols, pinv, basis in solvers:
        x = y @ pinv  # [N, r]
        proj = y @ basis
        err = yy - np.einsum("nr,nr->n", proj, proj)  # least squares leaves what its columns cannot span
        better = np.all(x >= 0, axis=1) & (err < best_err)
        best_err = np.where(better, err, best_err)
        full = np.zeros((len(y), 3))
        full[:, cols] = x
        best_x = np.where(better[:, None], full, best_x)
    return best_err, best_x


def refit(cal: Calibration) -> Calibration:
    """`cal`'s timed points fitted again (by this version's model and fit), its hardware and model kept: a
    calibration made before the model gained a part is brought up to date without profiling again."""
    points = [Point(p.kind, list(p.batch), p.seconds) for p in cal.points]
    eff, med, p90 = fit(cal.model, cal.hardware, points)
    return Calibration(cal.hardware, cal.model, eff, points, med, p90, {**cal.machine, "refitted": True})
