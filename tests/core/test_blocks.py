"""BlockPool: reference counting, prefix cache with LRU eviction, and its event log."""

from hypothesis import given, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from splitserve.core.blocks import NO_PARENT, BlockPool, hash_block, hash_blocks


def test_chained_hash_depends_on_parent_and_tokens():
    a = hash_block(NO_PARENT, [1, 2, 3])
    assert a == hash_block(NO_PARENT, [1, 2, 3])
    assert a != hash_block(NO_PARENT, [1, 2, 4])
    assert hash_block(a, [5, 6, 7]) != hash_block(NO_PARENT, [5, 6, 7])


def test_hash_blocks_covers_only_full_blocks_and_continues_a_chain():
    tokens = list(range(10))
    full = hash_blocks(tokens, 4)
    assert len(full) == 2
    assert hash_blocks(tokens, 4, full[:1]) == full
    assert full[1] == hash_block(full[0], [4, 5, 6, 7])


def test_lru_evicts_least_recently_freed_cached_block_first():
    pool = BlockPool(3, 4)
    a, b, c = pool.allocate(3)
    for i, blk in enumerate((a, b, c)):
        pool.cache(blk, 100 + i, NO_PARENT)
    pool.release([b])
    pool.release([a])
    pool.release([c])
    # b was freed first, so it is reused first and its hash disappears.
    assert pool.allocate(1) == [b]
    assert pool.cached_prefix([101]) == []
    assert pool.cached_prefix([100]) == [a]


def test_taking_a_cached_block_protects_it_from_eviction():
    pool = BlockPool(2, 4)
    (a,) = pool.allocate(1)
    pool.cache(a, 7, NO_PARENT)
    pool.release([a])
    pool.take(pool.cached_prefix([7]))
    assert pool.num_free_blocks == 1
    assert pool.allocate(2) is None
    assert pool.allocate(1) != [a]
    assert pool.cached_prefix([7]) == [a]


def test_duplicate_content_keeps_first_copy():
    pool = BlockPool(2, 4)
    a, b = pool.allocate(2)
    pool.cache(a, 9, NO_PARENT)
    pool.cache(b, 9, NO_PARENT)
    assert pool.cached_prefix([9]) == [a]
    assert [e.kind for e in pool.drain_events()] == ["stored"]


def test_over_release_is_an_error():
    pool = BlockPool(1, 1)
    blocks = pool.allocate(1)
    pool.release(blocks)
    try:
        pool.release(blocks)
    except ValueError:
        return
    raise AssertionError("double release went unnoticed")


class PoolMachine(RuleBasedStateMachine):
    """Any interleaving of allocate / cache / hit / release keeps the pool's books balanced."""

    def __init__(self):
        super().__init__()
        self.pool = BlockPool(8, 2)
        self.held: list[int] = []  # one entry per reference we own
        self.replayed: set[int] = set()
        self.last_seq = 0
        self.next_hash = 1

    @rule(n=st.integers(0, 4))
    def allocate(self, n):
        before = self.pool.num_free_blocks
        got = self.pool.allocate(n)
        if got is None:
            assert n > before
        else:
            assert len(set(got)) == n
            self.held.extend(got)

    @precondition(lambda self: self.held)
    @rule(i=st.integers(0, 100), reuse=st.booleans())
    def cache(self, i, reuse):
        block = self.held[i % len(self.held)]
        h = (self.next_hash - 1) if reuse and self.next_hash > 1 else self.next_hash
        self.next_hash += 1
        self.pool.cache(block, h, NO_PARENT)

    @rule(hashes=st.lists(st.integers(1, 30), max_size=4))
    def hit(self, hashes):
        blocks = self.pool.cached_prefix(hashes)
        self.pool.take(blocks)
        self.held.extend(blocks)

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def release(self, data):
        k = data.draw(st.integers(1, len(self.held)))
        picked = data.draw(st.permutations(range(len(self.held))))[:k]
        blocks = [self.held[j] for j in picked]
        for j in sorted(picked, reverse=True):
            self.held.pop(j)
        self.pool.release(blocks)

    @rule()
    def drain(self):
        for e in self.pool.drain_events():
            assert e.seq == self.last_seq + 1, "event sequence has a gap"
            self.last_seq = e.seq
            if e.kind == "stored":
                assert e.block_hash not in self.replayed
                self.replayed.add(e.block_hash)
            else:
                self.replayed.remove(e.block_hash)

    @invariant()
    def counts_balance(self):
        pool = self.pool
        referenced = sum(1 for r in pool.ref_counts if r > 0)
        assert pool.num_free_blocks + referenced == pool.num_blocks
        for b in set(self.held):
            assert pool.ref_counts[b] == self.held.count(b)
        assert all(pool.ref_counts[b] == 0 for b in range(pool.num_blocks) if b not in self.held)

    @invariant()
    def referenced_cached_blocks_stay_cached(self):
        for b in set(self.held):
            h = self.pool.block_hash[b]
            if h is not None:
                assert self.pool.cached_prefix([h]) == [b]

    @invariant()
    def events_replay_to_cached_set(self):
        pending = set(self.replayed)
        for e in self.pool._events:
            (pending.add if e.kind == "stored" else pending.discard)(e.block_hash)
        assert pending == self.pool.cached_hashes()
        seq, snap = self.pool.snapshot()
        assert snap == self.pool.cached_hashes() and seq == self.pool.event_seq


TestPoolMachine = PoolMachine.TestCase
TestPoolMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


@given(st.lists(st.integers(0, 50), min_size=0, max_size=40), st.integers(1, 8))
def test_hash_blocks_prefix_property(tokens, bs):
    hashes = hash_blocks(tokens, bs)
    assert len(hashes) == len(tokens) // bs
    for k in range(len(hashes)):
        assert hash_blocks(tokens[: (k + 1) * bs], bs) == hashes[: k + 1]
