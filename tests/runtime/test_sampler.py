"""Any finite sampling setting the API accepts yields a valid token: never a NaN distribution that fails
the draw (and with it every request in the batch)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from splitserve.core.request import MIN_TEMPERATURE, SamplingParams
from splitserve.runtime.worker.sampler import Sampler

VOCAB = 64

temperatures = st.one_of(
    st.floats(min_value=0.0, max_value=1e6, allow_nan=False, allow_infinity=False),
    st.sampled_from([0.0, 1e-300, 1e-45, 5e-324, MIN_TEMPERATURE, 1e-4, 1e300]),
)
top_ps = st.one_of(
    st.floats(min_value=5e-324, max_value=1.0, exclude_min=False, allow_nan=False),
    st.sampled_from([1e-300, 1e-45, 1e-8, 1.0]),
)
logit_rows = st.lists(
    st.floats(min_value=-1e30, max_value=1e30, allow_nan=False, allow_infinity=False), min_size=VOCAB, max_size=VOCAB
)


@settings(max_examples=300, deadline=None)
@given(temperature=temperatures, top_p=top_ps, top_k=st.integers(0, VOCAB + 5), seed=st.none() | st.integers(0, 2**31),
       rows=st.lists(logit_rows, min_size=1, max_size=4))
def test_any_accepted_setting_draws_a_valid_token(temperature, top_p, top_k, seed, rows):
    params = SamplingParams(max_tokens=4, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    logits = torch.tensor(rows, dtype=torch.float32)
    tokens = Sampler().sample(logits, [f"r{i}" for i in range(len(rows))], [params] * len(rows))
    assert len(tokens) == len(rows)
    assert all(0 <= t < VOCAB for t in tokens)


def test_a_temperature_too_small_to_divide_by_samples_greedily():
    logits = torch.randn(3, VOCAB)
    for t in (1e-45, 1e-300, MIN_TEMPERATURE / 2):
        p = SamplingParams(temperature=t)
        assert p.greedy
        assert Sampler().sample(logits, ["a", "b", "c"], [p] * 3) == logits.argmax(-1).tolist()


def test_a_vanishing_top_p_keeps_the_most_likely_token():
    logits = torch.randn(1, VOCAB)
    p = SamplingParams(temperature=1.0, top_p=1e-300, seed=1)
    assert Sampler().sample(logits, ["a"], [p]) == [int(logits.argmax())]


def test_one_poisoned_row_leaves_the_others_seeded_draws_unchanged():
    torch.manual_seed(0)
    logits = torch.randn(3, VOCAB)
    fair = SamplingParams(temperature=0.8, top_p=0.9, seed=7)
    poison = SamplingParams(temperature=1e-45, top_p=1e-300)
    alone = Sampler().sample(logits[[0, 2]], ["a", "c"], [fair, fair])
    mixed = Sampler().sample(logits, ["a", "b", "c"], [fair, poison, fair])
    assert [mixed[0], mixed[2]] == alone


def test_draws_follow_the_distribution_after_temperature_top_k_and_top_p():
    """The batched inverse-CDF draw: frequencies over many rows match softmax(logits / T) restricted by top-k
    and top-p, and a token those drop is never drawn."""
    probs = torch.tensor([0.05, 0.1, 0.15, 0.3, 0.4] + [0.0] * (VOCAB - 5))
    logits = probs.clamp_min(1e-30).log()
    n = 20000
    sampler = Sampler()
    plain = SamplingParams(temperature=1.0, seed=3)
    tokens = sampler.sample(logits.repeat(n, 1), [f"p{i}" for i in range(n)], [SamplingParams(temperature=1.0)] * n)
    counts = torch.bincount(torch.tensor(tokens), minlength=VOCAB).float() / n
    torch.testing.assert_close(counts, probs, atol=0.015, rtol=0)
    hot = SamplingParams(temperature=2.0, top_k=4, top_p=0.8)  # top-k drops token 0; top-p then token 1
    tokens = sampler.sample(logits.repeat(n, 1), [f"h{i}" for i in range(n)], [hot] * n)
    kept = (probs[2:5] ** 0.5) / (probs[2:5] ** 0.5).sum()
    counts = torch.bincount(torch.tensor(tokens), minlength=VOCAB).float() / n
    assert counts[:2].sum() == 0 and counts[5:].sum() == 0
    torch.testing.assert_close(counts[2:5], kept, atol=0.015, rtol=0)
    # A seeded request draws the same tokens whatever else is in its batch.
    alone = [Sampler().sample(logits[None], ["s"], [plain])[0] for _ in range(3)]
    beside = [Sampler().sample(logits.repeat(3, 1), ["x", "s", "y"], [SamplingParams(temperature=1.0), plain, hot])[1]
              for _ in range(3)]
    assert alone == beside
