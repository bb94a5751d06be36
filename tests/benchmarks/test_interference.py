"""The pure parts of benchmarks.interference: deployments' serve flags, goodput ratios, CDFs."""

from __future__ import annotations

import pytest

from benchmarks.interference import cdf, goodput_ratio, serve_args


def test_serve_args():
    assert serve_args("chunked", 64)[-3:] == ["--chunked-prefill", "--max-num-batched-tokens", "64"]
    assert "--pin" in serve_args("1p1d", 64)
    with pytest.raises(ValueError):
        serve_args("2p2d", 64)


def test_goodput_ratio():
    assert goodput_ratio({"goodput": 1.5, "upper": 1.6}, {"goodput": 0.5, "upper": 0.6}) == pytest.approx(3.0)
    assert goodput_ratio({"goodput": 0.0, "upper": 0.4}, {"goodput": 0.5, "upper": 0.6}) == 0.0
    assert goodput_ratio({"goodput": 1.0, "upper": 1.2}, {"goodput": 0.0, "upper": 0.4}) is None


def test_cdf():
    x, y = cdf([3.0, 1.0, 2.0])
    assert x.tolist() == [1.0, 2.0, 3.0]
    assert y.tolist() == pytest.approx([1 / 3, 2 / 3, 1.0])
