"""BlockPool: the KV cache's blocks, their reference counts, the prefix cache and its event log.

A block is free when nobody references it. A free block may still hold a cached prefix (it has a hash):
it stays findable until it is reused, and free blocks are reused least-recently-freed first, so the
prefix cache is an LRU over exactly the memory nobody needs right now.

Every change to the set of cached hashes is appended to a sequence-numbered event log. The router
replays these logs to know which worker caches which prefix; a gap in sequence numbers tells it to
resynchronise from `snapshot()`.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable, Literal, Sequence

import numpy as np

NO_PARENT = 0


def hash_block(parent_hash: int, token_ids: Sequence[int]) -> int:
    """Chained block hash: equal hashes mean equal tokens *and* equal prefix before them.

    blake2b rather than Python's hash() so that every process (workers, router, simulator) agrees.
    """
    return _chain(parent_hash, np.asarray(token_ids, dtype=np.int64).tobytes())


def hash_blocks(token_ids: Sequence[int], block_size: int, start: Sequence[int] = ()) -> list[int]:
    """Hashes of every full block of `token_ids`, continuing the chain `start` (hashes already known)."""
    return extend_hashes(start, token_ids[len(start) * block_size :], block_size)


def extend_hashes(start: Sequence[int], tail: Sequence[int], block_size: int) -> list[int]:
    """`hash_blocks` given only the tokens after `start`'s blocks: a decoding request extends its chain a
    block at a time without building its whole token list."""
    hashes = list(start)
    parent = hashes[-1] if hashes else NO_PARENT
    # One conversion for the whole prompt, then slices: the router hashes every prompt it routes.
    data = np.asarray(tail, dtype=np.int64).tobytes()
    step = block_size * 8
    for offset in range(0, len(data) - step + 1, step):
        parent = _chain(parent, data[offset : offset + step])
        hashes.append(parent)
    return hashes


def _chain(parent_hash: int, block_bytes: bytes) -> int:
    digest = hashlib.blake2b(parent_hash.to_bytes(8, "little") + block_bytes, digest_size=8).digest()
    return int.from_bytes(digest, "little") or 1  # 0 is reserved for "no parent"


# Slotted, not frozen: one is built per block cached or evicted (four per prompt block in a disaggregated
# simulation), and a frozen dataclass sets each field through object.__setattr__, 3x the cost to build.
@dataclass(slots=True)
class KVEvent:
    seq: int
    kind: Literal["stored", "removed"]
    block_hash: int
    parent_hash: int = NO_PARENT


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        # Free blocks in reuse order: first = least recently freed = evicted first.
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[int, int] = {}  # block hash -> block id
        self._events: list[KVEvent] = []
        self.event_seq = 0  # sequence number of the last event emitted

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def cached_prefix(self, hashes: Sequence[int]) -> list[int]:
        """Block ids holding the longest cached prefix of `hashes` (not referenced by this call)."""
        blocks: list[int] = []
        if self.enable_prefix_caching:
            for h in hashes:
                block_id = self._cached.get(h)
                if block_id is None:
                    break
                blocks.append(block_id)
        return blocks

    def num_free_among(self, block_ids: Iterable[int]) -> int:
        """How many of these blocks are free now (taking them would shrink the free count)."""
        return sum(1 for b in block_ids if self.ref_counts[b] == 0)

    def take(self, block_ids: Iterable[int]) -> None:
        """Add a reference to blocks found in the prefix cache."""
        for b in block_ids:
            if self.ref_counts[b] == 0:
                del self._free[b]
            self.ref_counts[b] += 1

    def allocate(self, n: int) -> list[int] | None:
        """n fresh blocks with one reference each, evicting cached prefixes LRU-first; None if too few."""
        if n > len(self._free):
            return None
        blocks = []
        for _ in range(n):
            b, _ = self._free.popitem(last=False)
            self._evict(b)
            self.ref_counts[b] = 1
            blocks.append(b)
        return blocks

    def release(self, block_ids: Iterable[int]) -> None:
        """Drop one reference from each block; pass a sequence's blocks tail first, so that its tail (the
        part least likely to be shared) is evicted before its head."""
        for b in block_ids:
            if self.ref_counts[b] <= 0:
                raise ValueError(f"block {b} released more often than referenced")
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                self._free[b] = None

    def cache(self, block_id: int, block_hash: int, parent_hash: int) -> None:
        """Publish a full, computed block under its chained hash. If another block already holds the same
        content (two requests computed one prefix concurrently) the first one stays the cached copy."""
        if not self.enable_prefix_caching or block_hash in self._cached or self.block_hash[block_id] is not None:
            return
        self._cached[block_hash] = block_id
        self.block_hash[block_id] = block_hash
        self._emit("stored", block_hash, parent_hash)

    def drain_events(self) -> list[KVEvent]:
        events, self._events = self._events, []
        return events

    def snapshot(self) -> tuple[int, frozenset[int]]:
        """(sequence number of the last event, cached hashes): the resync point for the router."""
        return self.event_seq, frozenset(self._cached)

    def cached_hashes(self) -> frozenset[int]:
        return frozenset(self._cached)

    def _evict(self, block_id: int) -> None:
        h = self.block_hash[block_id]
        if h is not None:
            self.block_hash[block_id] = None
            del self._cached[h]
            self._emit("removed", h)

    def _emit(self, kind: Literal["stored", "removed"], block_hash: int, parent_hash: int = NO_PARENT) -> None:
        self.event_seq += 1
        self._events.append(KVEvent(self.event_seq, kind, block_hash, parent_hash))
