"""Admission by time: take a request only if, at the rate requests have been leaving the queue, the ones
ahead of it leave within a budget (the pools' own timeout, e.g. a transfer ticket's deadline); otherwise
refuse it at once (HTTP 429) with a Retry-After of how long the queue needs to shrink that far.

A request refused at the door costs its client one round trip; one admitted past what the pools can do in
time is accepted, waits, and fails after its client has already been told "200". Sans-IO: the caller
passes `now`.
"""

from __future__ import annotations

from collections import deque


class DrainRate:
    """A queue's measured service rate: departures per second of *busy* time (time when something waited).
    Idle time does not count, so a quiet hour does not make the next burst look slow; a stall does (the busy
    time since the last departure is part of the estimate), so a stuck queue's rate decays."""

    def __init__(self, window: int = 64) -> None:
        self._spans: deque[tuple[float, int]] = deque(maxlen=window)  # (busy seconds, departures) per departure event
        self._busy = 0.0  # busy seconds since the last departure
        self._last: float | None = None

    def observe(self, now: float, queued: int, departed: int = 0) -> None:
        """`queued` requests waited since the previous observation; `departed` of them left at `now`."""
        if self._last is not None and queued > 0:
            self._busy += max(0.0, now - self._last)
        self._last = now if self._last is None else max(self._last, now)
        if departed > 0:
            self._spans.append((self._busy, departed))
            self._busy = 0.0

    def per_s(self) -> float | None:
        """Departures per busy second, or None before two departures have been measured over some time."""
        busy = sum(s for s, _ in self._spans) + self._busy
        n = sum(d for _, d in self._spans)
        if n == 0 or busy <= 0.0:
            return None
        return n / busy


class Admission:
    """The waiting room in front of the pools: requests admitted and not yet started (for the frontend:
    waiting for their first token). At most `capacity` of them, and none whose expected wait exceeds
    `budget_s`."""

    def __init__(self, capacity: int, budget_s: float, min_retry_s: float = 1.0, window: int = 64) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if budget_s <= 0:
            raise ValueError(f"budget_s must be > 0, got {budget_s}")
        self.capacity, self.budget_s, self.min_retry_s = capacity, budget_s, min_retry_s
        self.waiting = 0
        self.rate = DrainRate(window)

    def __len__(self) -> int:
        return self.waiting

    def expected_wait(self, now: float) -> float | None:
        """Seconds until a request admitted now is at the head of the queue, at the measured rate."""
        self.rate.observe(now, self.waiting)
        r = self.rate.per_s()
        return None if r is None else self.waiting / r

    def offer(self, now: float) -> float | None:
        """Admit (None), or refuse with the seconds after which a retry is likely to be admitted."""
        wait = self.expected_wait(now)
        r = self.rate.per_s()
        over_count = self.waiting >= self.capacity
        over_time = wait is not None and wait > self.budget_s
        if not (over_count or over_time):
            self.waiting += 1
            return None
        if r is None:
            return self.min_retry_s  # full before any request has left: no rate to go by
        # Until enough requests have left that this one fits both bounds.
        excess = max(self.waiting - self.capacity + 1, self.waiting - self.budget_s * r)
        return max(self.min_retry_s, excess / r)

    def leave(self, now: float, started: bool = True) -> None:
        """An admitted request left the queue: `started` (it got its turn), or gave up (refused later,
        aborted), which says nothing about how fast the pools serve."""
        if self.waiting <= 0:
            raise ValueError("leave() without a matching offer()")
        self.rate.observe(now, self.waiting, 1 if started else 0)
        self.waiting -= 1
