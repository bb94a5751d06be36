"""Speculative probes (issue 18's search time): on idle processes the search runs ahead the rate it would ask
next; it follows the sequential search exactly, so the answer is the same whatever the speculation."""

from dataclasses import replace

from hypothesis import given, settings, strategies as st

from splitserve.plan.candidates import Candidate
from splitserve.plan.evaluate import Probe, evaluate, goodput_bracket, next_rate
from splitserve.plan.probes import Prober
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


@settings(max_examples=200, deadline=None)
@given(true=st.floats(0.01, 500), guess=st.floats(0.01, 500), resolution=st.sampled_from([0.03, 0.05, 0.1]))
def test_the_upper_end_first_finds_the_same_goodput_with_fewer_probes(true, guess, resolution):
    """`evaluate` simulates the bracket's upper end first and, where it passes, takes the lower end as
    passing without a probe: on a unit whose probes pass below its goodput and fail above it, the answer
    is the plain search's, and the lower end's probe (a passing one: a full run) is saved whenever the upper
    one passes."""
    s = spec()
    simulated: list[float] = []

    def measure(plan_, unit, rate, stop):
        simulated.append(rate)
        return Probe(rate, 1.0 if rate <= true else 0.0, 0.0, 0.0, False, passed=rate <= true)

    bracket = goodput_bracket(guess, resolution)
    plain = search_goodput(lambda r: r, lambda r: r <= true, bracket)
    ev = evaluate(replace(s, resolution=resolution), Candidate("colocated", None, 1, guess, ""), prober=Prober(measure, s, 1))
    assert ev.goodput == plain.lower
    assert [p.rate for p in ev.probes] == [r for r in plain.probes if not (r == bracket.lo and bracket.hi <= true)]
    # Simulated: the search's probes, less lo where hi passed; plus hi where both failed (the search, shrinking
    # below lo, never asks for it: a failing probe, which mostly stops early).
    extra = [bracket.hi] if bracket.lo > true else []
    assert sorted(simulated) == sorted([p.rate for p in ev.probes] + extra)
    assert (bracket.lo in simulated) == (bracket.hi > true)
