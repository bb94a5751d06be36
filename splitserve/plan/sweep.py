"""Sweeps: how the verdict changes along one axis (prompt length, link bandwidth, cluster size, prefix hit rate).

Each point is a full planner search with one input changed; the rest of the inputs stay as given.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Callable, Literal, Sequence

from splitserve.plan.search import plan
from splitserve.plan.spec import PlanError, PlanSpec
from splitserve.plan.verdict import PlanResult
from splitserve.sim.hardware import GB, Network, network

Axis = Literal["prompt-length", "bandwidth", "cluster-size", "prefix-hit-rate"]
AXES: tuple[str, ...] = ("prompt-length", "bandwidth", "cluster-size", "prefix-hit-rate")

DEFAULTS: dict[str, tuple[str, ...]] = {
    "prompt-length": ("128", "512", "1024", "2048", "4096", "8192"),
    "bandwidth": ("eth-25", "eth-100", "rdma-200", "rdma-400"),
    "cluster-size": ("4", "8", "16", "32"),
    "prefix-hit-rate": ("0", "0.25", "0.5", "0.75", "0.9"),
}
LABELS = {
    "prompt-length": "mean prompt length (tokens)",
    "bandwidth": "KV link bandwidth (Gbit/s per GPU)",
    "cluster-size": "GPUs in the cluster",
    "prefix-hit-rate": "shared-prefix fraction of each prompt",
}


@dataclass
class AxisPoint:
    value: str
    x: float  # numeric position for plots
    result: PlanResult | None
    error: str | None = None

    @property
    def colocated_per_gpu(self) -> float:
        r = self.result
        return r.colocated.rps_per_gpu if r and r.colocated else 0.0

    @property
    def disaggregated_per_gpu(self) -> float:
        r = self.result
        return r.disaggregated.rps_per_gpu if r and r.disaggregated else 0.0

    @property
    def verdict(self) -> str:
        return self.result.verdict if self.result else "none"


@dataclass
class AxisSweep:
    axis: str
    label: str
    points: list[AxisPoint]
    inputs: dict = field(default_factory=dict)
    wall_s: float = 0.0


def _link(value: str, spec: PlanSpec) -> Network:
    """A preset name, or a number of Gbit/s per GPU (RDMA-like)."""
    try:
        gbit = float(value)
    except ValueError:
        return network(value, spec.hardware)
    if not gbit > 0:
        raise PlanError(f"bandwidth must be positive, got {value}")
    return Network(f"{gbit:g} Gbit/s", gbit / 8 * GB, True, 5e-6, 0.9)


def point_spec(spec: PlanSpec, axis: str, value: str) -> tuple[PlanSpec, float]:
    """The planner input for one sweep point, and its x position."""
    syn = spec.workload.synthetic
    if axis in ("prompt-length", "prefix-hit-rate") and syn is None:
        raise PlanError(f"a {axis} sweep needs a synthetic workload (--isl/--osl), not a trace")
    try:
        if axis == "prompt-length":
            n = float(value)
            if n < 1:
                raise ValueError
            return replace(spec, workload=replace(spec.workload, synthetic=replace(syn, input=replace(syn.input, mean=n)))), n
        if axis == "prefix-hit-rate":
            h = float(value)
            if not 0 <= h <= 1:
                raise ValueError
            return replace(spec, workload=replace(spec.workload, synthetic=replace(syn, shared_prefix_ratio=h))), h
        if axis == "cluster-size":
            n = int(value)
            if n < 1:
                raise ValueError
            if spec.rate is not None:
                raise PlanError("a cluster-size sweep plans a fixed cluster: drop --rate")
            return replace(spec, gpus=n), n
        if axis == "bandwidth":
            net = _link(value, spec)
            return replace(spec, network=net), net.bandwidth * 8 / GB * (1 if net.per_gpu else 1 / spec.hardware.gpus_per_node)
    except (ValueError, TypeError):
        raise PlanError(f"bad {axis} value {value!r}") from None
    raise PlanError(f"unknown sweep axis {axis!r}; axes: {', '.join(AXES)}")


def sweep(spec: PlanSpec, axis: str, values: Sequence[str] | None = None, progress: Callable[[str], None] | None = None) -> AxisSweep:
    if axis not in AXES:
        raise PlanError(f"unknown sweep axis {axis!r}; axes: {', '.join(AXES)}")
    values = list(values or DEFAULTS[axis])
    specs = [point_spec(spec, axis, v) for v in values]  # every value is checked before any simulation
    t0 = time.perf_counter()
    points = []
    for v, (s, x) in zip(values, specs):
        if progress:
            progress(f"{axis} = {v}")
        try:
            points.append(AxisPoint(v, x, plan(s)))
        except PlanError as e:  # an SLO nobody meets at this point is a result of the sweep, not a failure
            points.append(AxisPoint(v, x, None, str(e)))
    return AxisSweep(axis, LABELS[axis], points, wall_s=time.perf_counter() - t0)

