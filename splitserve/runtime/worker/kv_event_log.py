"""A worker's KV events (block stored / removed), kept for the router to fetch.

Bounded: a router that falls too far behind (or one that just started) gets a gap, and answers it with
a snapshot of the pool — see core/prefix_index.py.
"""

from __future__ import annotations

import threading
from collections import deque

from splitserve.core.blocks import BlockPool, KVEvent


class KVEventLog:
    def __init__(self, pool: BlockPool, capacity: int = 100_000) -> None:
        self.pool = pool
        self._events: deque[KVEvent] = deque(maxlen=capacity)
        self._lock = threading.Lock()  # collected on the engine thread, read on the event loop
        self.last_seq = 0  # of the last event collected

    def collect(self) -> None:
        """Engine thread: move the pool's new events into the log."""
        events = self.pool.drain_events()
        if events:
            with self._lock:
                self._events.extend(events)
                self.last_seq = events[-1].seq

    def since(self, seq: int) -> list[KVEvent] | None:
        """Events after `seq`, or None when some of them are no longer kept (the caller resyncs)."""
        with self._lock:
            if self._events and self._events[0].seq > seq + 1:
                return None
            if not self._events and self.last_seq > seq:
                return None
            return [e for e in self._events if e.seq > seq]
