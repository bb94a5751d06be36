"""Batch building, cache layout and layer hooks."""

from __future__ import annotations

import pytest
import torch

from splitserve.model.batch import SeqInput, build_forward_batch
from splitserve.core.model_spec import ModelSpec
from splitserve.model.kv_cache import PagedKVCache
from splitserve.model.llama import LlamaModel

CONFIG = ModelSpec(
    vocab_size=50,
    hidden_size=32,
    intermediate_size=48,
    num_layers=3,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    rope_scaling=None,
    max_position_embeddings=256,
    tie_word_embeddings=True,
    attention_bias=False,
    architecture="llama",
)


def test_build_forward_batch_flattens_sequences():
    seqs = [
        SeqInput([10, 11, 12], start_pos=0, block_table=[7, 3], want_logits=True),
        SeqInput([20], start_pos=5, block_table=[2, 9], want_logits=False),
        SeqInput([30, 31], start_pos=3, block_table=[4, 1], want_logits=True),
    ]
    b = build_forward_batch(seqs, block_size=4, device="cpu")
    assert b.input_ids.tolist() == [10, 11, 12, 20, 30, 31]
    assert b.positions.tolist() == [0, 1, 2, 5, 3, 4]
    assert b.query_lens == [3, 1, 2]
    assert b.context_lens == [3, 6, 5]
    # position p lives in block_table[p // 4] at offset p % 4
    assert b.slot_mapping.tolist() == [28, 29, 30, 9 * 4 + 1, 4 * 4 + 3, 1 * 4 + 0]
    assert b.logits_indices.tolist() == [2, 5]


def test_build_forward_batch_rejects_short_block_table():
    with pytest.raises(ValueError, match="cannot hold"):
        build_forward_batch([SeqInput([1, 2, 3], 2, [0], True)], block_size=4, device="cpu")


def test_cache_layout_and_sizes():
    cache = PagedKVCache(CONFIG, num_blocks=5, block_size=4, dtype=torch.bfloat16, device="cpu")
    assert cache.tensor.shape == (3, 5, 2, 2, 4, 8)  # layers, blocks, K/V, heads, slots, head_dim
    assert cache.layer(1).shape == (5, 2, 2, 4, 8)
    view = cache.block_view(2, 3)
    assert view.is_contiguous() and view.shape == (2, 2, 4, 8)
    view.fill_(1)
    assert cache.tensor[2, 3].sum() == view.numel() and cache.tensor.sum() == view.numel()
    assert PagedKVCache.bytes_per_block(CONFIG, 4, torch.bfloat16) == 3 * 2 * 4 * 2 * 8 * 2
    assert CONFIG.kv_bytes_per_token(2) == 2 * 3 * 2 * 8 * 2


class RecordingHooks:
    """Records the hook calls and, after each layer, whether each layer's K/V slots are filled yet."""

    def __init__(self, cache: PagedKVCache, block: int) -> None:
        self.cache, self.block, self.calls = cache, block, []

    def before_layer(self, layer: int) -> None:
        self.calls.append(("before", layer))

    def after_layer(self, layer: int) -> None:
        filled = [bool(self.cache.block_view(i, self.block).abs().sum() > 0) for i in range(CONFIG.num_layers)]
        self.calls.append(("after", layer, filled))


def test_hooks_run_around_each_layer_after_its_kv_is_written():
    torch.manual_seed(0)
    model = LlamaModel(CONFIG)
    cache = PagedKVCache(CONFIG, num_blocks=4, block_size=4, dtype=torch.float32, device="cpu")
    hooks = RecordingHooks(cache, block=2)
    model(build_forward_batch([SeqInput([3, 4, 5], 0, [2], True)], 4, "cpu"), cache, hooks)
    expected = []
    for i in range(CONFIG.num_layers):
        expected += [("before", i), ("after", i, [j <= i for j in range(CONFIG.num_layers)])]
    assert hooks.calls == expected


def test_logits_only_for_requested_rows_in_order():
    torch.manual_seed(0)
    model = LlamaModel(CONFIG)
    cache = PagedKVCache(CONFIG, num_blocks=8, block_size=4, dtype=torch.float32, device="cpu")
    a, b = [3, 4, 5, 6, 7], [8, 9]
    both = model(
        build_forward_batch([SeqInput(a, 0, [0, 1], True), SeqInput(b, 0, [2], True)], 4, "cpu"), cache
    )
    only_b = model(
        build_forward_batch([SeqInput(a, 0, [3, 4], False), SeqInput(b, 0, [5], True)], 4, "cpu"), cache
    )
    assert both.shape == (2, CONFIG.vocab_size) and only_b.shape == (1, CONFIG.vocab_size)
    torch.testing.assert_close(only_b[0], both[1])
