"""The pure parts of benchmarks.router's replay section: conversation sampling, the trace file it writes, the
simulated prefix caches (oracle rules, eviction), matching phase records to requests, attributing misses, the
router's view from probed counters."""

from __future__ import annotations

import pytest

from benchmarks.router import (
    Prompt, PrefixCache, Served, affinity_hit_rate, conversation, explain_misses, first_turns, hit_rate,
    match_records, prompt_of, router_view, sample_conversations, shortfall, write_mooncake,
)
from splitserve.workload.requests import RequestSpec, Trace, TraceRow, Workload, read_trace


def conversations_trace(n: int) -> Trace:
    """n conversations of three turns each (ids [0, c], [0, c, c+1], [0, c, c+1, c+2]) and n one-block rows."""
    rows = []
    for c in range(n):
        base = 1000 + 10 * c
        rows += [TraceRow(float(c + t), 512 * (t + 2), 10, (0, *range(base, base + t + 1))) for t in range(3)]
        rows.append(TraceRow(float(c) + 0.5, 100, 10, (0,)))
    return Trace("synthetic.jsonl", "mooncake", tuple(sorted(rows, key=lambda r: r.arrival_s)))


def test_conversation_key():
    assert conversation(3, TraceRow(0.0, 1000, 1, (0, 7, 8))) == 7
    assert conversation(3, TraceRow(0.0, 100, 1, (0,))) == ("row", 3)


def test_sample_conversations_keeps_whole_conversations():
    trace = conversations_trace(200)
    assert sample_conversations(trace, 1.0, seed=0).rows == trace.rows
    half = sample_conversations(trace, 0.5, seed=0)
    kept = {conversation(0, r) for r in half.rows if len(r.hash_ids) > 1}
    assert 60 < len(kept) < 140
    for key in kept:  # every turn of a kept conversation is kept
        assert sum(r.hash_ids[1:2] == (key,) for r in half.rows) == 3
    assert sample_conversations(trace, 0.5, seed=1).rows != half.rows
    assert sample_conversations(trace, 0.5, seed=0).rows == half.rows  # deterministic
    with pytest.raises(ValueError):
        sample_conversations(trace, 0.0, seed=0)


def test_write_mooncake_round_trip(tmp_path):
    trace = conversations_trace(3)
    again = read_trace(write_mooncake(trace, tmp_path / "t.jsonl"), "mooncake")
    assert again.rows == trace.rows


def p(tokens: list[int]) -> Prompt:
    return prompt_of(tokens, block_size=4)


A = list(range(8))  # two whole blocks of 4


def test_oracle_counts_whole_blocks_and_leaves_one_token():
    again = p(A)  # the same 8 tokens: the last block must be computed again to sample
    longer = p(A + [90, 91])  # both blocks reusable, 2 tokens computed
    partial = p(A[:4] + [50, 51, 52])  # one block shared, then a partial block
    prompts = [p(A), again, longer, partial]
    assert hit_rate(prompts, block_size=4) == pytest.approx((0 + 4 + 8 + 4) / (8 + 8 + 10 + 7))


def test_finite_cache_evicts_least_recently_used():
    other = p(list(range(100, 108)))
    prompts = [p(A), other, p(A)]
    assert hit_rate(prompts, block_size=4) == pytest.approx(4 / 24)
    assert hit_rate(prompts, num_blocks=4, block_size=4) == pytest.approx(4 / 24)  # room for both
    assert hit_rate(prompts, num_blocks=2, block_size=4) == 0.0  # `other` evicted A
    with pytest.raises(ValueError):
        PrefixCache(4, 1).insert(p(A))


def test_a_hit_refreshes_recency():
    a, b, c = (p([x] * 4 + [9]) for x in (1, 2, 3))  # one whole block each, and a partial one
    lru = PrefixCache(4, 4)
    for q in (a, b, c):
        lru.insert(q)
    assert (lru.hit(a), lru.hit(b)) == (0, 4)
    lru = PrefixCache(4, 4)
    for q in (a, b, a, c):  # reusing a makes b the least recently used
        lru.insert(q)
    assert (lru.hit(a), lru.hit(b)) == (4, 0)


def test_match_records_by_length_in_arrival_order():
    phases = [{"arrival": 2.0, "prompt_tokens": 5}, {"arrival": 1.0, "prompt_tokens": 5},
              {"arrival": 3.0, "prompt_tokens": 7}, {"arrival": 4.0, "prompt_tokens": 9}]
    assert match_records(phases, [5, 7, 5]) == [2, 0, 1, None]


def test_explain_misses_splits_the_shortfall():
    served = [
        Served(0.0, 1.0, 1.0, "p0", 0, p(A)),
        # Arrives while A is still being computed on p0: nothing could hold it yet.
        Served(0.5, 3.0, 1.0, "p1", 0, p(A + [1, 2, 3, 4])),
        # A is on p0 only (p1's copy is not done until 3.0): sent to p1, a routing loss; p1 was the busier one.
        Served(2.0, 5.0, 1.0, "p1", 0, p(A + [5])),
        # Sent where A is: found it.
        Served(4.0, 4.5, 0.5, "p0", 8, p(A + [6])),
    ]
    rows = explain_misses(served, num_blocks=100, block_size=4)
    assert [(r["in_flight"], r["evicted"], r["elsewhere"], r["other"]) for r in rows] == [
        (0, 0, 0, 0), (8, 0, 0, 0), (0, 0, 8, 0), (0, 0, 0, 0)]
    assert rows[2]["holder_backlog"] == 0 and rows[2]["chosen_backlog"] == pytest.approx(12.0)
    assert rows[2]["why"] == "recent" and rows[2]["prefix_age_s"] == pytest.approx(1.0)
    for r in rows:
        assert r["oracle"] - r["hit"] == r["in_flight"] + r["evicted"] + r["elsewhere"] + r["other"]
    total = sum(s.prompt.num_tokens for s in served)
    s = shortfall(rows)
    assert s["in_flight"] == pytest.approx(8 / total) and s["elsewhere"] == pytest.approx(8 / total)
    assert s["elsewhere_recent"] == s["elsewhere"] and s["elsewhere_load"] == 0.0 and s["elsewhere_requests"] == 1


def test_affinity_hit_rate_pins_conversations():
    # Conversations 7 and 8 alternate; pinned (7 -> cache 1, 8 -> cache 0) each finds its own prefix.
    specs = [RequestSpec(float(i), 9, 1, (0, 7 + i % 2), 4) for i in range(4)]
    prompts = [p([0] * 4 + [7 + i % 2] * 4 + [i]) for i in range(4)]
    w = Workload(tuple(specs), "test")
    assert affinity_hit_rate(w, prompts, num_blocks=100, block_size=4) == pytest.approx((0 + 0 + 8 + 8) / 36)
    assert affinity_hit_rate(w, prompts, num_blocks=100, workers=1, block_size=4) == hit_rate(prompts, block_size=4)


def test_router_view_replays_counters_through_the_cost_model():
    # (time, read latency, cumulative prefill tokens, cumulative prefill seconds, cumulative prefill steps)
    samples = {"http://a": [(0.0, 0.01, 0, 0.0, 0), (1.0, 0.5, 100, 0.2, 1), (2.0, 0.1, 200, 0.4, 2)],
               "http://b": [(0.5, 0.02, 0, 0.0, 0), (1.5, 2.0, 10, 0.1, 1)]}
    view = router_view(samples, {"http://a": "p0", "http://b": "p1"}, prior_s_per_token=1 / 300, ref_tokens=100)
    # One step size each: no intercept to fit, the ratio of sums.
    assert view["per_token_ms_at_end"] == pytest.approx({"p0": 2.0, "p1": 10.0})
    assert view["fixed_ms_at_end"] == {"p0": 0.0, "p1": 0.0}
    assert view["read_latency_s"]["p1"]["max"] == 2.0
    # After p0's first reading p1 still has the prior (3.33 ms); after p1's, 10 / 2 = 5 times dearer.
    assert view["cost_ratio_p1_p0"]["p90"] == pytest.approx(5.0)
    assert view["cost_ratio_p1_p0"]["p10"] < 5.0


def test_first_turns():
    ids = [(0, 7), (0,), (0, 7, 8), (0, 9), (0,)]
    w = Workload(tuple(RequestSpec(float(i), 9, 1, b, 4) for i, b in enumerate(ids)), "test")
    assert first_turns(w) == {0, 1, 3, 4}
