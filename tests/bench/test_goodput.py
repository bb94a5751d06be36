"""splitserve.workload.goodput, the one goodput search: bisection on pass/fail functions with a known
threshold, in bench's form (a fixed bracket, linear) and plan's (a bracket moved around a guess, relative);
and bench's judging of a rate by the median of its trials."""

from __future__ import annotations

import pytest

from splitserve.bench.results import RateTrials
from splitserve.workload.goodput import Bracket, search_goodput


def step_at(threshold: float):
    """Passes up to the threshold rate, fails above it; the measurement is the rate itself."""
    return (lambda rate: rate), (lambda rate: rate <= threshold)


@pytest.mark.parametrize("threshold", [1.3, 2.0, 7.77, 9.9])
def test_bisection_brackets_the_threshold(threshold):
    r = search_goodput(*step_at(threshold), Bracket(1.0, 10.0, 0.05))
    assert r.lower <= threshold < r.upper
    assert r.upper - r.lower <= 0.05
    assert r.goodput == r.lower


def test_lo_failing_means_goodput_below_it():
    r = search_goodput(*step_at(0.5), Bracket(1.0, 10.0, 0.1))
    assert r.goodput is None and (r.lower, r.upper) == (0.0, 1.0)
    assert r.probes == (1.0,)


def test_hi_passing_means_goodput_at_least_it():
    r = search_goodput(*step_at(50), Bracket(1.0, 10.0, 0.1))
    assert r.goodput == 10.0 and r.upper is None
    assert r.probes == (1.0, 10.0)


def test_number_of_probes_follows_the_resolution():
    r = search_goodput(*step_at(4.0), Bracket(1.0, 9.0, 1.0))  # 8 -> 4 -> 2 -> 1: three bisection steps
    assert len(r.probes) == 2 + 3


@pytest.mark.parametrize("threshold", [0.05, 0.9, 7.3, 40.0, 150.0])
def test_a_bracket_moved_around_a_guess_finds_the_threshold(threshold):
    # The planner's form: [0.7, 1.3] x the guess, moved up by doubling or down by thirds, then bisected on a
    # log scale to a relative width.
    r = search_goodput(*step_at(threshold), Bracket(0.7 * 5.0, 1.3 * 5.0, 0.03, relative=True, grow_steps=6, shrink_steps=6))
    assert threshold * 0.97 <= r.lower <= threshold < r.upper
    assert len(r.probes) <= 14


def test_a_bracket_moved_too_few_times_gives_bounds_only():
    up = search_goodput(*step_at(1e6), Bracket(1.0, 2.0, 0.05, relative=True, grow_steps=3))
    assert up.probes == (1.0, 2.0, 4.0, 8.0) and (up.goodput, up.lower, up.upper) == (8.0, 8.0, None)
    down = search_goodput(*step_at(1e-6), Bracket(1.0, 2.0, 0.05, relative=True, shrink_steps=2))
    assert down.probes == (1.0, 1 / 3, 1 / 9) and (down.goodput, down.lower, down.upper) == (None, 0.0, 1 / 9)


def test_measurements_are_kept_as_the_caller_made_them():
    r = search_goodput(lambda rate: {"rate": rate}, lambda m: m["rate"] <= 3, Bracket(1.0, 9.0, 1.0))
    assert [m["rate"] for m in r.probes] == [1.0, 9.0, 5.0, 3.0, 4.0]


@pytest.mark.parametrize("lo, hi, kw", [(0, 1, {}), (2, 1, {}), (1, 2, {"resolution": 0}), (1, 2, {"grow_steps": 0}),
                                        (1, 2, {"shrink_steps": -1})])
def test_bad_brackets(lo, hi, kw):
    with pytest.raises(ValueError):
        Bracket(lo, hi, **{"resolution": 0.1, **kw})


def test_median_of_trials_decides():
    # One bad trial in three does not fail a rate; two do.
    assert RateTrials.judged(5.0, (0.0, 1.0, 1.0), 0.9).passed
    failed = RateTrials.judged(6.0, (0.0, 0.0, 1.0), 0.9)
    assert not failed.passed and failed.median == 0.0 and failed.attainments == (0.0, 0.0, 1.0)
