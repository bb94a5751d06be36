"""PrefixIndex: which worker caches which prefix block, kept from the workers' KV event logs.

Each worker's BlockPool numbers its stored/removed events 1, 2, 3, ... per generation. A generation is
one process lifetime and must grow across restarts (e.g. the process's start time in ns): a message from
an older generation is a dead process's leftover and is ignored, a newer one means the worker restarted
with an empty cache. (Unordered ids could not tell a late leftover from a restart.)

The index holds, per worker, the set of cached hashes as of the last event it applied. It only ever
advances one event at a time from an exact state (an empty pool at the start of a generation, or a
snapshot), so whenever it has applied event n its set *is* the worker's set after event n. Whatever breaks
that chain — a lost batch, a restart the index has not seen, a router that restarted — shows up as a gap,
and the caller answers it with a snapshot (`BlockPool.snapshot()`) passed to `resync`.

Hashes are chained (a block's hash covers its whole prefix), so "this worker can reuse the first k blocks
of a prompt" is "it holds the prompt's first k hashes": `match` walks the prompt's chain, not the index.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable, Iterable, Sequence

from splitserve.core.blocks import KVEvent

WorkerId = Hashable
Generation = int  # grows with every restart of a worker
_NOBODY: frozenset = frozenset()


@dataclass
class _Worker:
    generation: Generation
    seq: int = 0  # last event applied
    hashes: set[int] = field(default_factory=set)


class PrefixIndex:
    def __init__(self) -> None:
        self._workers: dict[WorkerId, _Worker] = {}
        self._owners: dict[int, set[WorkerId]] = {}  # block hash -> workers caching it

    def __len__(self) -> int:
        """Indexed (worker, block) pairs."""
        return sum(len(w.hashes) for w in self._workers.values())

    def track(self, worker_id: WorkerId, generation: Generation) -> bool:
        """Make `generation` the worker's current one if it is not older. A newer generation drops the old
        one's entries: a restarted worker's cache is empty. False for an older generation."""
        w = self._workers.get(worker_id)
        if w is not None and generation <= w.generation:
            return generation == w.generation
        if w is not None:
            self._drop(worker_id, w)
        self._workers[worker_id] = _Worker(generation)
        return True

    def apply(
        self, worker_id: WorkerId, generation: Generation, events: Iterable[KVEvent], last_seq: int | None = None
    ) -> bool:
        """Apply a batch of the worker's events in sequence order. Events already applied are skipped, so
        duplicated or overlapping deliveries are harmless. `last_seq`, where the sender knows it, is the
        worker's newest sequence number: it reveals a lost batch even when no later event follows (send it
        with every load report). Returns False when the caller must `resync` from a snapshot: a gap, or an
        index still behind `last_seq`. An older generation's events are ignored (True: nothing to do)."""
        if not self.track(worker_id, generation):
            return True
        w = self._workers[worker_id]
        for ev in events:
            if ev.seq <= w.seq:
                continue
            if ev.seq != w.seq + 1:
                return False
            if ev.kind == "stored":
                self._add(worker_id, w, ev.block_hash)
            else:
                self._discard(worker_id, w, ev.block_hash)
            w.seq = ev.seq
        return last_seq is None or w.seq >= last_seq

    def resync(self, worker_id: WorkerId, generation: Generation, seq: int, hashes: Iterable[int]) -> None:
        """Replace the worker's entries with a snapshot taken at event `seq`. A snapshot older than what the
        index already applied is ignored: the index is exact at its own, later, position."""
        if not self.track(worker_id, generation):
            return
        w = self._workers[worker_id]
        if seq < w.seq:
            return
        new = set(hashes)
        for h in w.hashes - new:
            self._discard(worker_id, w, h)
        for h in new - w.hashes:
            self._add(worker_id, w, h)
        w.seq = seq

    def remove(self, worker_id: WorkerId) -> None:
        w = self._workers.pop(worker_id, None)
        if w is not None:
            self._drop(worker_id, w)

    def position(self, worker_id: WorkerId) -> tuple[Generation, int] | None:
        """(generation, last applied seq): where a puller asks the worker to continue from."""
        w = self._workers.get(worker_id)
        return None if w is None else (w.generation, w.seq)

    def cached(self, worker_id: WorkerId) -> frozenset[int]:
        w = self._workers.get(worker_id)
        return frozenset(w.hashes) if w is not None else frozenset()

    def num_cached(self, worker_id: WorkerId) -> int:
        w = self._workers.get(worker_id)
        return len(w.hashes) if w is not None else 0

    def match(self, block_hashes: Sequence[int], workers: Iterable[WorkerId]) -> dict[WorkerId, int]:
        """Per worker, how many leading blocks of `block_hashes` it caches. Costs O(matched prefix x
        workers still matching): the walk stops at the first block nobody (of `workers`) holds."""
        result = dict.fromkeys(workers, 0)
        alive = set(result)
        for i, h in enumerate(block_hashes):
            owners = self._owners.get(h, _NOBODY)
            if alive <= owners:
                continue
            for w in alive - owners:
                result[w] = i
            alive &= owners
            if not alive:
                return result
        for w in alive:
            result[w] = len(block_hashes)
        return result

    def _add(self, worker_id: WorkerId, w: _Worker, h: int) -> None:
        w.hashes.add(h)
        self._owners.setdefault(h, set()).add(worker_id)

    def _discard(self, worker_id: WorkerId, w: _Worker, h: int) -> None:
        w.hashes.discard(h)
        owners = self._owners.get(h)
        if owners is not None:
            owners.discard(worker_id)
            if not owners:
                del self._owners[h]

    def _drop(self, worker_id: WorkerId, w: _Worker) -> None:
        for h in list(w.hashes):
            self._discard(worker_id, w, h)
