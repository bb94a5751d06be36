"""PrefixIndex: applying sequence-numbered KV events, gaps, snapshots, generations, prefix matching."""

from splitserve.core.blocks import NO_PARENT, BlockPool, KVEvent
from splitserve.core.prefix_index import PrefixIndex


def stored(seq, h):
    return KVEvent(seq, "stored", h)


def removed(seq, h):
    return KVEvent(seq, "removed", h)


def test_events_in_order_build_the_set_and_duplicates_are_harmless():
    idx = PrefixIndex()
    batch = [stored(1, 10), stored(2, 11), removed(3, 10)]
    assert idx.apply("w", 1, batch)
    assert idx.apply("w", 1, batch)  # delivered twice
    assert idx.apply("w", 1, batch[1:] + [stored(4, 12)])  # overlapping
    assert idx.cached("w") == {11, 12}
    assert idx.position("w") == (1, 4)


def test_a_gap_asks_for_a_snapshot_and_events_the_snapshot_covers_are_then_skipped():
    idx = PrefixIndex()
    assert idx.apply("w", 1, [stored(1, 10)])
    assert not idx.apply("w", 1, [stored(3, 12)])  # event 2 was lost
    assert idx.cached("w") == {10}
    idx.resync("w", 1, 3, {11, 12})
    assert idx.apply("w", 1, [stored(2, 11), stored(3, 12), removed(4, 11)])  # 2, 3 late: skipped
    assert idx.cached("w") == {12}


def test_last_seq_reveals_a_lost_final_batch():
    idx = PrefixIndex()
    assert idx.apply("w", 1, [stored(1, 10)], last_seq=1)
    assert not idx.apply("w", 1, [], last_seq=2)  # a heartbeat says event 2 exists; it never came
    idx.resync("w", 1, 2, {10, 11})
    assert idx.apply("w", 1, [], last_seq=2)


def test_a_snapshot_older_than_the_index_is_ignored():
    idx = PrefixIndex()
    idx.apply("w", 1, [stored(1, 10), stored(2, 11)])
    idx.resync("w", 1, 1, {10})
    assert idx.cached("w") == {10, 11}


def test_newer_generation_drops_old_entries_and_late_old_messages_cannot_undo_it():
    idx = PrefixIndex()
    idx.apply("w", 1, [stored(1, 10), stored(2, 11)])
    assert idx.apply("w", 2, [stored(1, 20)])
    assert idx.cached("w") == {20}
    assert idx.apply("w", 1, [stored(3, 12)])  # nothing to do: that process is gone
    idx.resync("w", 1, 3, {10, 11, 12})
    assert idx.cached("w") == {20} and idx.position("w") == (2, 1)
    assert idx.match([10], ["w"]) == {"w": 0}


def test_new_generation_whose_first_batch_was_lost_needs_a_snapshot():
    idx = PrefixIndex()
    idx.apply("w", 1, [stored(1, 10)])
    assert not idx.apply("w", 2, [stored(2, 21)])
    assert idx.cached("w") == frozenset()


def test_match_counts_leading_blocks_per_worker_only():
    idx = PrefixIndex()
    idx.resync("a", 1, 1, {1, 2, 3})
    idx.resync("b", 1, 1, {1, 2, 4})
    idx.resync("c", 1, 1, {2, 3})  # holds later blocks but not the first: nothing usable
    assert idx.match([1, 2, 3, 4], ["a", "b", "c", "d"]) == {"a": 3, "b": 2, "c": 0, "d": 0}
    assert idx.match([1, 2, 3], ["a"]) == {"a": 3}
    assert idx.match([], ["a"]) == {"a": 0}


def test_remove_forgets_a_worker_everywhere():
    idx = PrefixIndex()
    idx.resync("a", 1, 1, {1, 2})
    idx.resync("b", 1, 1, {1})
    idx.remove("a")
    assert idx.match([1, 2], ["a", "b"]) == {"a": 0, "b": 1}
    assert len(idx) == 1 and idx.position("a") is None


def test_index_follows_a_real_pool_through_eviction():
    pool, idx = BlockPool(2, 4), PrefixIndex()
    a, b = pool.allocate(2)
    pool.cache(a, 100, NO_PARENT)
    pool.cache(b, 101, 100)
    pool.release([b, a])
    (c,) = pool.allocate(1)  # evicts b (freed first) and with it hash 101
    pool.cache(c, 200, NO_PARENT)
    assert idx.apply("w", 1, pool.drain_events(), last_seq=pool.event_seq)
    assert idx.cached("w") == pool.cached_hashes() == {100, 200}


def test_an_index_that_knows_the_newer_generation_ignores_the_dead_ones_leftovers():
    idx = PrefixIndex()  # e.g. a restarted router: it registered the worker's new process first
    idx.track("w", 2)
    assert idx.apply("w", 1, [stored(1, 10)])
    assert idx.cached("w") == frozenset() and idx.position("w") == (2, 0)
