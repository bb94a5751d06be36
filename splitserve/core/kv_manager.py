"""Request-level view of the BlockPool: which blocks a request holds, prefix hits, publishing full blocks."""

from __future__ import annotations

from splitserve.core.blocks import NO_PARENT, BlockPool, extend_hashes
from splitserve.core.request import Request


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class KVCacheManager:
    def __init__(self, pool: BlockPool) -> None:
        self.pool = pool
        self.block_size = pool.block_size
        # Per request: how many of its leading blocks are already published to the prefix cache.
        self._num_published: dict[str, int] = {}

    def prefix_hit(self, req: Request) -> list[int]:
        """Cached blocks matching the start of the request's tokens. At least one token is always left to
        compute, because the step that computes it is the one that samples the next token."""
        self._update_hashes(req)
        blocks = self.pool.cached_prefix(req.block_hashes)
        max_blocks = (req.num_tokens - 1) // self.block_size
        return blocks[:max_blocks]

    def allocate(self, req: Request, num_new_tokens: int, hit_blocks: list[int] = ()) -> bool:
        """Give `req` blocks for `num_new_tokens` more tokens (after taking `hit_blocks` from the prefix
        cache). All or nothing: on failure nothing changes."""
        if not hit_blocks and req.num_computed_tokens + num_new_tokens <= len(req.block_ids) * self.block_size:
            return True  # fits the blocks it holds (most decode steps): nothing to take or allocate
        held = len(req.block_ids) + len(hit_blocks)
        total_tokens = req.num_computed_tokens + len(hit_blocks) * self.block_size + num_new_tokens
        need = max(0, blocks_for(total_tokens, self.block_size) - held)
        if need + self.pool.num_free_among(hit_blocks) > self.pool.num_free_blocks:
            return False
        self.pool.take(hit_blocks)
        new_blocks = self.pool.allocate(need)
        assert new_blocks is not None
        req.block_ids.extend(hit_blocks)
        req.block_ids.extend(new_blocks)
        if hit_blocks:
            req.num_computed_tokens += len(hit_blocks) * self.block_size
            self._num_published[req.request_id] = len(hit_blocks)
        return True

    def publish(self, req: Request) -> None:
        """Make the request's full, computed blocks findable by later requests with the same prefix."""
        if not self.pool.enable_prefix_caching:
            return
        done = self._num_published.get(req.request_id, 0)
        if req.num_computed_tokens // self.block_size <= done:
            return  # no new full block (most steps); hashes are computed when one is
        self._update_hashes(req)
        full = min(req.num_computed_tokens // self.block_size, len(req.block_hashes))
        for i in range(done, full):
            parent = req.block_hashes[i - 1] if i else NO_PARENT
            self.pool.cache(req.block_ids[i], req.block_hashes[i], parent)
        self._num_published[req.request_id] = max(done, full)

    def free(self, req: Request) -> None:
        self.pool.release(reversed(req.block_ids))
        req.block_ids = []
        self._num_published.pop(req.request_id, None)

    def _update_hashes(self, req: Request) -> None:
        known, n = len(req.block_hashes), req.num_tokens
        if known < n // self.block_size:
            tail = req.token_slice(known * self.block_size, n)
            req.block_hashes = extend_hashes(req.block_hashes, tail, self.block_size)
