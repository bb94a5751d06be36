"""The fused elementwise ops of a decoder layer (csrc/layer_ops.cpp) against the torch ops they replace, and
the model's output with them against the model's without."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from splitserve.model import paged_kernel
from splitserve.model.batch import SeqInput, build_forward_batch
from splitserve.model.kv_cache import PagedKVCache
from splitserve.model.loader import load_model
from splitserve.model.rope import apply_rope
from tests.tiny_models import make_tiny_checkpoint


@pytest.fixture(scope="module")
def kernel() -> None:
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler on this machine: the kernels cannot be built (torch's ops serve)")
    assert paged_kernel.load(), "the kernels failed to build or load (see the log line above)"


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(0, 40), inter=st.integers(1, 300), scale=st.sampled_from([0.1, 3.0, 60.0]),
       threads=st.sampled_from([1, 2]), seed=st.integers(0, 2**16))
def test_silu_mul_matches_torch(kernel, rows, inter, scale, threads, seed):
    """Large |x| too (scale 60): the sigmoid is taken from exp(-|x|), which must neither overflow nor lose 0/1."""
    g = torch.Generator().manual_seed(seed)
    gate_up = torch.randn(rows, 2 * inter, generator=g) * scale
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = paged_kernel.silu_mul(gate_up)
    finally:
        torch.set_num_threads(before)
    gate, up = gate_up.double().split(inter, dim=-1)
    torch.testing.assert_close(got.double(), F.silu(gate) * up, rtol=2e-6, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(tokens=st.integers(1, 20), heads=st.integers(1, 6), extra=st.integers(0, 3), half=st.sampled_from([1, 4, 32]),
       seed=st.integers(0, 2**16))
def test_rope_in_place_matches_torch_on_a_strided_view(kernel, tokens, heads, extra, half, seed):
    """Rotates q and k inside the qkv product: heads of a row that holds `extra` heads more (v), untouched."""
    g = torch.Generator().manual_seed(seed)
    dim = 2 * half
    qkv = torch.randn(tokens, heads + extra, dim, generator=g)
    angles = torch.rand(tokens, 1, half, generator=g) * 100
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    expected = apply_rope(qkv[:, :heads].double(), cos.double(), sin.double())
    untouched = qkv[:, heads:].clone()
    paged_kernel.rope_(qkv[:, :heads], cos, sin)
    torch.testing.assert_close(qkv[:, :heads].double(), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(qkv[:, heads:], untouched)


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(0, 40), hidden=st.integers(1, 700), strided=st.booleans(), seed=st.integers(0, 2**16))
def test_add_rms_norm_adds_in_place_and_normalizes(kernel, rows, hidden, strided, seed):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, hidden, generator=g)
    wide = torch.randn(rows, hidden + 5 * strided, generator=g)
    delta = wide[:, :hidden]  # rows strided when `strided`, as a slice of a wider product would be
    weight = torch.randn(hidden, generator=g)
    summed = h.double() + delta.double()
    expected = F.rms_norm(summed, (hidden,), weight.double(), 1e-5)
    got = paged_kernel.add_rms_norm_(h, delta, weight, 1e-5)
    torch.testing.assert_close(h.double(), summed, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_bad_shapes_are_refused_with_a_message(kernel):
    with pytest.raises(RuntimeError, match="width must be even"):
        paged_kernel.silu_mul(torch.randn(2, 7))
    with pytest.raises(RuntimeError, match="head_dim values per token"):
        paged_kernel.rope_(torch.randn(2, 3, 8), torch.randn(2, 1, 4), torch.randn(2, 1, 4))
    with pytest.raises(RuntimeError, match="weight must be"):
        paged_kernel.add_rms_norm_(torch.randn(2, 8), torch.randn(2, 8), torch.randn(7), 1e-5)


def test_the_model_gives_the_same_logits_fused_and_unfused(kernel, tmp_path, monkeypatch):
    """A prefill, a chunk continuing a prompt and a decode step beside it: logits with the fused ops and with
    torch's agree to float32 rounding."""
    loaded = load_model(make_tiny_checkpoint(tmp_path / "tiny", layers=3, seed=4))
    bs = 4

    def run() -> list[torch.Tensor]:
        cache = PagedKVCache(loaded.config, 16, bs, loaded.dtype, loaded.device)
        steps = [
            [SeqInput(list(range(3, 17)), 0, [0, 1, 2, 3], True)],
            [SeqInput([5], 14, [0, 1, 2, 3], True), SeqInput(list(range(20, 29)), 0, [4, 5, 6], False)],
            [SeqInput([6], 15, [0, 1, 2, 3], True), SeqInput(list(range(29, 33)), 9, [4, 5, 6, 7], True)],
        ]
        return [loaded.model(build_forward_batch(s, bs, loaded.device), cache) for s in steps]

    fused = run()
    monkeypatch.setattr(paged_kernel, "FUSED_LAYER_OPS", False)
    plain = run()
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
