"""splitserve.workload.goodput: bisection on attainment functions with a known threshold."""

from __future__ import annotations

import pytest

from splitserve.workload.goodput import find_goodput


def step_at(threshold: float):
    """Attainment 1 up to the threshold rate, 0.5 above it."""
    return lambda rate, trial: 1.0 if rate <= threshold else 0.5


@pytest.mark.parametrize("threshold", [1.3, 2.0, 7.77, 9.9])
def test_bisection_brackets_the_threshold(threshold):
    r = find_goodput(step_at(threshold), 1.0, 10.0, target=0.9, trials=1, resolution=0.05)
    assert r.lower <= threshold < r.upper
    assert r.upper - r.lower <= 0.05
    assert r.goodput == r.lower
    assert all(p.passed == (p.rate <= threshold) for p in r.probes)


def test_rate_lo_failing_means_goodput_below_it():
    r = find_goodput(step_at(0.5), 1.0, 10.0, resolution=0.1)
    assert r.goodput is None and (r.lower, r.upper) == (0.0, 1.0)
    assert len(r.probes) == 1


def test_rate_hi_passing_means_goodput_at_least_it():
    r = find_goodput(step_at(50), 1.0, 10.0, resolution=0.1)
    assert r.goodput == 10.0 and r.upper is None
    assert len(r.probes) == 2


def test_median_of_trials_decides():
    # One bad trial in three does not fail a rate; two do.
    def noisy(rate, trial):
        bad_trials = 1 if rate <= 5 else 2
        return 0.0 if trial < bad_trials else 1.0

    r = find_goodput(noisy, 1.0, 9.0, trials=3, resolution=0.5)
    assert r.lower <= 5 < r.upper
    assert all(len(p.attainments) == 3 for p in r.probes)


def test_number_of_probes_follows_the_resolution():
    r = find_goodput(step_at(4.0), 1.0, 9.0, resolution=1.0)  # 8 -> 4 -> 2 -> 1: three bisection steps
    assert len(r.probes) == 2 + 3


@pytest.mark.parametrize("lo, hi, kw", [(0, 1, {}), (2, 1, {}), (1, 2, {"trials": 0}), (1, 2, {"resolution": 0}),
                                        (1, 2, {"target": 1.5})])
def test_bad_sweep_parameters(lo, hi, kw):
    with pytest.raises(ValueError):
        find_goodput(step_at(1), lo, hi, **kw)
