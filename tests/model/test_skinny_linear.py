"""The few-row linear kernel (csrc/skinny_linear.cpp) against torch's, and linear.py's routing to it."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from splitserve.model import linear as linear_mod
from splitserve.model import paged_kernel


@pytest.fixture(scope="module")
def kernel() -> None:
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler on this machine: the kernels cannot be built (oneDNN serves)")
    assert paged_kernel.load(), "the kernels failed to build or load (see the log line above)"


def _column_major(out: int, inp: int, g: torch.Generator) -> torch.Tensor:
    return torch.randn(out, inp, generator=g).t().contiguous().t()


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 17),  # both loops (1-2 rows, 3+), odd and even counts (rows go in pairs)
    inp=st.integers(1, 70),  # around the 8-row unroll and its remainder
    out=st.integers(1, 1200),  # around the 64-column parallel unit and the 512-column block
    with_bias=st.booleans(),
    threads=st.sampled_from([1, 2]),
    seed=st.integers(0, 2**16),
)
def test_matches_torch(kernel, rows, inp, out, with_bias, threads, seed):
    g = torch.Generator().manual_seed(seed)
    x, w = torch.randn(rows, inp, generator=g), _column_major(out, inp, g)
    b = torch.randn(out, generator=g) if with_bias else None
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = paged_kernel.linear(x, w, b)
    finally:
        torch.set_num_threads(before)
    expected = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5 * inp**0.5)


def test_rejects_what_it_does_not_handle(kernel):
    g = torch.Generator().manual_seed(0)
    w = _column_major(8, 16, g)
    with pytest.raises(RuntimeError, match="at least one row"):
        paged_kernel.linear(torch.randn(0, 16), w, None)
    with pytest.raises(RuntimeError, match="column-major"):
        paged_kernel.linear(torch.randn(1, 16), w.contiguous(), None)


def test_linear_routes_one_to_eight_rows_to_it(kernel, monkeypatch):
    calls = []
    real = paged_kernel.linear
    monkeypatch.setattr(paged_kernel, "linear", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    w = _column_major(32, 16, torch.Generator().manual_seed(1))
    for rows in (0, 1, 2, 3, 8, 9, 16):
        x = torch.randn(rows, 16)
        torch.testing.assert_close(linear_mod.linear(x, w), x @ w.t())
    # 9+ rows: oneDNN, faster there. 0 rows too: a chunk of a long prompt that samples nothing asks the LM
    # head for no row (a 2,311-token prompt failed with a 500 when that reached the kernel).
    assert calls == [1, 2, 3, 8]
    monkeypatch.setattr(linear_mod, "SKINNY", False)
    linear_mod.linear(torch.randn(1, 16), w)
    assert calls == [1, 2, 3, 8]


def test_the_packed_copy_gives_torchs_product_and_follows_the_weight():
    """PackedWeight: oneDNN's blocked copy, made once, gives F.linear's result at any row count, and is remade
    when the weight is written in place or replaced, so a stale copy is never used."""
    if not linear_mod._ONEDNN:
        pytest.skip("this torch build has no oneDNN linear")
    g = torch.Generator().manual_seed(2)
    w, b = _column_major(40, 24, g), torch.randn(40, generator=g)
    packed = linear_mod.PackedWeight()
    first = packed.of(w)
    assert first is not None and packed.of(w) is first  # made once
    for rows in (0, 9, 16, 300):
        x = torch.randn(rows, 24, generator=g)
        expected = torch.nn.functional.linear(x.double(), w.double(), b.double())
        torch.testing.assert_close(linear_mod.linear(x, w, b, packed).double(), expected, rtol=1e-5, atol=1e-4)
    with torch.no_grad():
        w.mul_(-2.0)  # in place: the version counter moves
    x = torch.randn(12, 24, generator=g)
    torch.testing.assert_close(linear_mod.linear(x, w, None, packed), x @ w.t(), rtol=1e-5, atol=1e-4)
    assert packed.of(w) is not first
    replaced = _column_major(40, 24, g)
    torch.testing.assert_close(linear_mod.linear(x, replaced, None, packed), x @ replaced.t(), rtol=1e-5, atol=1e-4)
    assert linear_mod.PackedWeight().of(w.double()) is None  # float32 CPU weights only


def test_packing_can_be_turned_off(monkeypatch):
    monkeypatch.setenv(linear_mod.PACK_ENV, "0")
    assert linear_mod.PackedWeight().of(_column_major(8, 8, torch.Generator().manual_seed(3))) is None
