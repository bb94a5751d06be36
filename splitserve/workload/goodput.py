"""Goodput search: the highest request rate at which enough requests meet the SLO, by bisection.

Pure: the caller's `measure(rate, trial)` runs one trial and returns its SLO attainment. Each probed rate is
measured `trials` times and judged by the median, which a single unlucky trial cannot move.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Callable


class SweepError(ValueError):
    """Sweep parameters that cannot work; the message says which."""


def check_sweep(rate_lo: float, rate_hi: float, target: float, trials: int, resolution: float) -> None:
    if not 0 < rate_lo < rate_hi:
        raise SweepError(f"a sweep needs 0 < rate-lo < rate-hi, got {rate_lo:g} and {rate_hi:g}")
    if not 0 < target <= 1:
        raise SweepError(f"the attainment target must be a fraction in (0, 1], got {target:g}")
    if trials < 1 or not resolution > 0:
        raise SweepError("a sweep needs at least one trial and a positive resolution")


@dataclass(frozen=True)
class Probe:
    rate: float
    attainments: tuple[float, ...]
    median: float
    passed: bool


@dataclass(frozen=True)
class SweepResult:
    """goodput: the highest rate found to pass (None if even rate_lo failed).

    The true goodput lies in [lower, upper]: lower passed (0 if nothing did), upper failed (None if rate_hi
    passed, so the goodput is at least rate_hi).
    """

    goodput: float | None
    lower: float
    upper: float | None
    target: float
    probes: tuple[Probe, ...] = field(default=())


def find_goodput(
    measure: Callable[[float, int], float],
    rate_lo: float,
    rate_hi: float,
    *,
    target: float = 0.9,
    trials: int = 1,
    resolution: float = 0.1,
) -> SweepResult:
    """Bisect [rate_lo, rate_hi] until the bracket is at most `resolution` req/s wide."""
    check_sweep(rate_lo, rate_hi, target, trials, resolution)
    probes: list[Probe] = []

    def passes(rate: float) -> bool:
        values = tuple(measure(rate, t) for t in range(trials))
        median = statistics.median(values)
        probes.append(Probe(rate, values, median, median >= target))
        return median >= target

    def result(goodput: float | None, lower: float, upper: float | None) -> SweepResult:
        return SweepResult(goodput, lower, upper, target, tuple(probes))

    if not passes(rate_lo):
        return result(None, 0.0, rate_lo)
    if passes(rate_hi):
        return result(rate_hi, rate_hi, None)
    lo, hi = rate_lo, rate_hi
    while hi - lo > resolution:
        mid = (lo + hi) / 2
        if passes(mid):
            lo = mid
        else:
            hi = mid
    return result(lo, lo, hi)
