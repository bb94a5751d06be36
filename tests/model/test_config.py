"""ModelConfig from config.json dicts in the styles transformers 4 and 5 write."""

from __future__ import annotations

import pytest

from splitserve.model.config import ModelConfig

BASE = {
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 1000,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 8192,
    "eos_token_id": [5, 6],
}
LLAMA3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def test_transformers4_style():
    c = ModelConfig.from_hf({**BASE, "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", **LLAMA3}})
    assert (c.rope_theta, c.rope_scaling) == (500000.0, {"rope_type": "llama3", **LLAMA3})
    assert (c.head_dim, c.num_kv_heads, c.eos_token_ids, c.architecture) == (16, 2, (5, 6), "llama")
    assert ModelConfig.from_hf({**BASE, "rope_scaling": {"type": "linear", "factor": 2.0}}).rope_scaling == {
        "rope_type": "linear",
        "factor": 2.0,
    }


def test_transformers5_style():
    c = ModelConfig.from_hf({**BASE, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}})
    assert (c.rope_theta, c.rope_scaling) == (1e6, None)


def test_qwen2_has_qkv_bias_by_default():
    assert ModelConfig.from_hf({**BASE, "architectures": ["Qwen2ForCausalLM"]}).attention_bias
    assert not ModelConfig.from_hf(BASE).attention_bias


def test_sliding_window_caps_the_context():
    mistral = {**BASE, "architectures": ["MistralForCausalLM"], "sliding_window": 4096}
    assert ModelConfig.from_hf(mistral).max_position_embeddings == 4096
    assert ModelConfig.from_hf({**mistral, "use_sliding_window": False}).max_position_embeddings == 8192


def test_kv_bytes_per_token():
    c = ModelConfig.from_hf(BASE)
    assert c.kv_bytes_per_token(2) == 2 * 2 * 2 * 16 * 2


def test_heads_must_group_evenly():
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        ModelConfig.from_hf({**BASE, "num_key_value_heads": 3})


def test_rope_scaling_needs_its_parameters():
    with pytest.raises(ValueError, match="llama3 rope scaling lacks low_freq_factor"):
        ModelConfig.from_hf({**BASE, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})
