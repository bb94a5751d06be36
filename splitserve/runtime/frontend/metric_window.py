"""Prometheus samples over a sliding window, and quantiles from histogram buckets, computed as Prometheus
computes them: `histogram_quantile(q, increase(x_bucket[window]))`. The dashboard uses this so that its
percentiles are the very ones the Grafana dashboard (docs/grafana/) shows from the same metrics.

Pure: the caller passes `now` and the samples it read.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping

from prometheus_client.metrics_core import Metric

# (sample name, sorted label pairs) -> value
Key = tuple[str, tuple[tuple[str, str], ...]]
Samples = dict[Key, float]


def flatten(families: Iterable[Metric]) -> Samples:
    """Every sample of the families (a registry's collect(), or parsed exposition text), keyed by name and labels."""
    return {(s.name, tuple(sorted(s.labels.items()))): float(s.value) for f in families for s in f.samples}


def value(samples: Mapping[Key, float], name: str, **labels: str) -> float | None:
    """The sample with exactly these labels, or None."""
    return samples.get((name, tuple(sorted(labels.items()))))


def total(samples: Mapping[Key, float], name: str) -> float:
    """The sum of a sample over all its label sets (a counter split by cause, say)."""
    return sum(v for (n, _), v in samples.items() if n == name)


def histogram_quantile(q: float, samples: Mapping[Key, float], histogram: str) -> float | None:
    """The q-quantile of a histogram's `_bucket` samples (cumulative counts by upper bound `le`), linearly
    interpolated inside the bucket it falls in, as Prometheus does; the lowest bucket starts at 0 and a
    quantile in the +Inf bucket is the highest finite bound. None when the histogram counted nothing."""
    buckets = sorted(
        (math.inf if dict(labels)["le"] == "+Inf" else float(dict(labels)["le"]), v)
        for (n, labels), v in samples.items() if n == histogram + "_bucket"
    )
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return lower_bound


class Window:
    """Cumulative samples of one source (the frontend, a worker) read over time; `increase()` is what they
    grew by over the last `window_s` seconds (counters and histogram buckets; gauges are read as they are)."""

    def __init__(self, window_s: float = 60.0) -> None:
        self.window_s = window_s
        self._reads: deque[tuple[float, Samples]] = deque()

    def add(self, now: float, samples: Samples) -> None:
        self._reads.append((now, samples))
        # Keep one read at or before the window's start, so the increase covers the whole window.
        while len(self._reads) > 2 and self._reads[1][0] <= now - self.window_s:
            self._reads.popleft()

    def latest(self) -> Samples:
        """The newest read (gauges: their value now)."""
        return self._reads[-1][1] if self._reads else {}

    def increase(self) -> tuple[Samples, float]:
        """(newest minus oldest read, the seconds between them). With a single read: the totals since the
        source started, over 0 seconds. A counter that went down (its process restarted) counts from 0."""
        if not self._reads:
            return {}, 0.0
        if len(self._reads) == 1:
            return dict(self._reads[0][1]), 0.0
        (t0, first), (t1, last) = self._reads[0], self._reads[-1]
        out: Samples = {}
        for key, v in last.items():
            before = first.get(key, 0.0)
            out[key] = v - before if v >= before else v
        return out, t1 - t0
