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
