"""Speculative probes (issue 18's search time): on idle processes the search runs ahead the rate it would ask
next; it follows the sequential search exactly, so the answer is the same whatever the speculation."""

from dataclasses import replace

from hypothesis import given, settings, strategies as st

from splitserve.plan.evaluate import goodput_bracket, next_rate
from splitserve.plan.search import plan
from splitserve.workload.goodput import search_goodput
from tests.plan.test_search import spec


@settings(max_examples=200, deadline=None)
@given(true=st.floats(0.01, 500), guess=st.floats(0.01, 500), resolution=st.sampled_from([0.03, 0.05, 0.1]))
def test_next_rate_replays_the_goodput_search(true, guess, resolution):
    bracket = goodput_bracket(guess, resolution)
    asked = search_goodput(lambda r: r, lambda r: r <= true, bracket)
    seen: list[float] = []
    known: dict[float, bool] = {}
    while (r := next_rate(bracket, known)) is not None:
        seen.append(r)
        known[r] = r <= true
    assert seen == list(asked.probes)  # the search's rates, in its order, and nothing after its end


def test_speculation_on_a_pool_finds_what_the_sequential_search_finds():
    s = spec(top_k=1)
    inline = plan(s)
    pooled = plan(replace(s, jobs=2))
    for mode in ("colocated", "disaggregated"):
        a, b = getattr(inline, mode), getattr(pooled, mode)
        assert (a is None) == (b is None)
        if a is not None:
            assert (a.config, a.goodput_rps, a.probes) == (b.config, b.goodput_rps, b.probes)
    assert (inline.verdict, inline.advantage) == (pooled.verdict, pooled.advantage)
