"""Admission by time (core/admission.py): the measured drain rate, the bounds, and Retry-After."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from splitserve.core.admission import Admission, DrainRate


def test_the_rate_counts_busy_time_only():
    r = DrainRate()
    r.observe(0.0, 0)
    r.observe(100.0, 0)  # an idle stretch: no work waited, no time counted
    r.observe(100.0, 3)
    for t in (100.5, 101.0, 101.5):
        r.observe(t, 3, 1)
    assert r.per_s() == pytest.approx(2.0)  # three departures in 1.5 busy seconds
    r.observe(104.5, 1)  # a stall: the busy time since the last departure counts
    assert r.per_s() == pytest.approx(3 / 4.5)


def test_no_rate_before_a_departure():
    r = DrainRate()
    r.observe(0.0, 5)
    r.observe(1.0, 5)
    assert r.per_s() is None


def test_refuses_past_the_time_budget_with_a_measured_retry_after():
    a = Admission(capacity=1000, budget_s=2.0)
    now = 0.0
    for _ in range(10):  # measure: requests start one every 0.5 s (2 per second)
        assert a.offer(now) is None
        now += 0.5
        a.leave(now)
    # 2/s and a 2 s budget: a request is admitted with up to four ahead of it (2 s), not with five (2.5 s)
    for _ in range(5):
        assert a.offer(now) is None
    assert a.offer(now) == pytest.approx(1.0)  # one must leave first (0.5 s at 2/s): the 1 s floor
    assert a.waiting == 5
    a.budget_s = 0.5  # one ahead is all the budget allows: four must leave first, 2 s at 2/s
    assert a.offer(now) == pytest.approx(2.0)


def test_the_count_bound_holds_before_any_rate_is_known():
    a = Admission(capacity=3, budget_s=10.0)
    assert [a.offer(0.0) for _ in range(4)] == [None, None, None, 1.0]


def test_a_request_that_gives_up_does_not_speed_up_the_rate():
    a = Admission(capacity=100, budget_s=100.0)
    for _ in range(3):
        a.offer(0.0)
    a.leave(1.0)  # started after 1 s
    a.leave(1.0, started=False)  # refused later, or its client left
    a.leave(1.0, started=False)
    assert a.rate.per_s() == pytest.approx(1.0)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.floats(0, 5), st.booleans()), max_size=80),
       st.integers(1, 20), st.floats(0.1, 30))
def test_admission_never_exceeds_its_bounds(ops, capacity, budget):
    """Whatever the sequence of offers and departures: never more waiting than the capacity, never admitted
    past the budget at the rate measured at that moment, every refusal gives a Retry-After >= the floor."""
    a = Admission(capacity, budget)
    now = 0.0
    for is_offer, dt, started in ops:
        now += dt
        if is_offer:
            wait = a.expected_wait(now)
            before = a.waiting
            retry = a.offer(now)
            if retry is None:
                assert before < capacity and (wait is None or wait <= budget)
                assert a.waiting == before + 1
            else:
                assert retry >= a.min_retry_s and a.waiting == before
        elif a.waiting:
            a.leave(now, started)
        assert 0 <= a.waiting <= capacity
        rate = a.rate.per_s()
        assert rate is None or rate > 0
