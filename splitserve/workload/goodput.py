"""The goodput search: the highest request rate whose measurement passes, by moving a bracket until it
holds the answer and then bisecting it.

One search for both users of the word: `splitserve bench` measures a rate with real runs (the median SLO
attainment of a few trials) and `splitserve plan` with a simulation (attainment, and a queue that does
not keep growing). Pure: the caller's `measure(rate)` measures and `passed(measurement)` judges; the
search only chooses the rates, and keeps every measurement in the order taken.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Generic, TypeVar

M = TypeVar("M")  # what measuring one rate gives: the caller's own record


@dataclass(frozen=True)
class Bracket:
    """Where and how finely to search. lo is tried first. If it passes, hi is tried, and each time hi passes
    too the bracket moves up to [hi, 2 hi], at most `grow_steps` tries of hi. If lo fails, lo/3 is tried, at
    most `shrink_steps` times. Once one end passes and the other fails, bisection narrows them to
    `resolution`: req/s on a linear scale; with `relative`, a fraction of the upper end, bisecting at the
    geometric mean (for rates guessed only to within a factor)."""

    lo: float
    hi: float
    resolution: float
    relative: bool = False
    grow_steps: int = 1
    shrink_steps: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.lo < self.hi or not self.resolution > 0:
            raise ValueError(f"a goodput bracket needs 0 < lo < hi and a positive resolution, got {self}")
        if self.grow_steps < 1 or self.shrink_steps < 0:
            raise ValueError(f"a goodput bracket tries hi at least once and lo/3 never or more often, got {self}")


@dataclass(frozen=True)
class Goodput(Generic[M]):
    """goodput: the highest rate found to pass (None if none did).

    The true goodput lies in [lower, upper]: lower passed (0 if nothing did), upper failed (None if the
    last upper end tried passed, so the goodput is at least lower).
    """

    goodput: float | None
    lower: float
    upper: float | None
    probes: tuple[M, ...]


def search_goodput(measure: Callable[[float], M], passed: Callable[[M], bool], bracket: Bracket) -> Goodput[M]:
    probes: list[M] = []

    def passes(rate: float) -> bool:
        probes.append(measure(rate))
        return passed(probes[-1])

    def found(goodput: float | None, lower: float, upper: float | None) -> Goodput[M]:
        return Goodput(goodput, lower, upper, tuple(probes))

    b = bracket
    lo, hi = b.lo, b.hi
    if passes(lo):
        for _ in range(b.grow_steps):
            if not passes(hi):
                break
            lo, hi = hi, hi * 2
        else:
            return found(lo, lo, None)
    else:
        for _ in range(b.shrink_steps):
            hi, lo = lo, lo / 3
            if passes(lo):
                break
        else:
            return found(None, 0.0, lo)
    while (hi - lo) / hi > b.resolution if b.relative else hi - lo > b.resolution:
        mid = math.sqrt(lo * hi) if b.relative else (lo + hi) / 2
        if passes(mid):
            lo = mid
        else:
            hi = mid
    return found(lo, lo, hi)
