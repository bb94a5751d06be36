"""The tie rule of assert_greedy_match: divergence is excused only at a near-tie of the reference."""

import pytest
import torch

from tests.greedy import assert_greedy_match


def logits(best: int, runner_up: int, gap: float) -> torch.Tensor:
    x = torch.zeros(8)
    x[best], x[runner_up] = 5.0, 5.0 - gap
    return x


def test_identical_sequences_pass():
    assert_greedy_match([1, 2, 3], [1, 2, 3], [logits(1, 0, 1.0)] * 3)


def test_divergence_at_a_near_tie_passes_whatever_follows():
    steps = [logits(1, 0, 1.0), logits(2, 6, 1e-6), logits(3, 0, 1.0)]
    assert_greedy_match([1, 6, 7], [1, 2, 3], steps)


def test_divergence_without_a_tie_fails():
    steps = [logits(1, 0, 1.0), logits(2, 6, 0.5), logits(3, 0, 1.0)]
    with pytest.raises(AssertionError, match="greedy token 1 differs"):
        assert_greedy_match([1, 6, 3], [1, 2, 3], steps)


def test_lengths_must_agree():
    with pytest.raises(AssertionError, match="lengths differ"):
        assert_greedy_match([1, 2], [1, 2, 3], [logits(1, 0, 1.0)] * 3)
