"""The one model description: config.json in the styles transformers 4 and 5 write, sizes, and step work."""

from __future__ import annotations

import pytest

from splitserve.core.model_spec import ModelSpec, WorkModel
from splitserve.core.scheduler import ScheduledSeq, SchedulerOutput

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
    c = ModelSpec.from_hf_config({**BASE, "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", **LLAMA3}})
    assert (c.rope_theta, c.rope_scaling) == (500000.0, {"rope_type": "llama3", **LLAMA3})
    assert (c.head_dim, c.num_kv_heads, c.architecture) == (16, 2, "llama")
    assert ModelSpec.from_hf_config({**BASE, "rope_scaling": {"type": "linear", "factor": 2.0}}).rope_scaling == {
        "rope_type": "linear",
        "factor": 2.0,
    }


def test_transformers5_style():
    c = ModelSpec.from_hf_config({**BASE, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}})
    assert (c.rope_theta, c.rope_scaling) == (1e6, None)


def test_qwen2_has_qkv_bias_by_default():
    assert ModelSpec.from_hf_config({**BASE, "architectures": ["Qwen2ForCausalLM"]}).attention_bias
    assert not ModelSpec.from_hf_config(BASE).attention_bias


def test_sliding_window_caps_the_context():
    mistral = {**BASE, "architectures": ["MistralForCausalLM"], "sliding_window": 4096}
    assert ModelSpec.from_hf_config(mistral).max_position_embeddings == 4096
    assert ModelSpec.from_hf_config({**mistral, "use_sliding_window": False}).max_position_embeddings == 8192


def test_kv_bytes_per_token_in_its_own_dtype_or_another():
    c = ModelSpec.from_hf_config({**BASE, "torch_dtype": "float32"})
    assert c.kv_bytes_per_token() == 2 * 2 * 2 * 16 * 4
    assert c.kv_bytes_per_token(2) == c.with_dtype(2).kv_bytes_per_token() == 2 * 2 * 2 * 16 * 2


def test_heads_must_group_evenly():
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        ModelSpec.from_hf_config({**BASE, "num_key_value_heads": 3})


def test_rope_scaling_needs_its_parameters():
    with pytest.raises(ValueError, match="llama3 rope scaling lacks low_freq_factor"):
        ModelSpec.from_hf_config({**BASE, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})


def test_any_dense_decoder_is_described_for_planning():
    # The torch Llama cannot run these (the loader says so); the planner still models their FLOPs and bytes.
    c = ModelSpec.from_hf_config({**BASE, "architectures": ["Qwen3ForCausalLM"], "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    assert (c.architecture, c.rope_scaling["rope_type"]) == ("Qwen3ForCausalLM", "yarn")
    wrapped = ModelSpec.from_hf_config({"architectures": ["Gemma3ForConditionalGeneration"], "text_config": BASE})
    assert wrapped.num_layers == 2
    with pytest.raises(ValueError, match="mixture-of-experts"):
        ModelSpec.from_hf_config({**BASE, "num_local_experts": 8})
    with pytest.raises(ValueError, match="lacks vocab_size"):
        ModelSpec.from_hf_config({k: v for k, v in BASE.items() if k != "vocab_size"})


def test_a_description_with_rope_scaling_is_hashable():
    c = ModelSpec.from_hf_config({**BASE, "rope_scaling": {"rope_type": "linear", "factor": 2.0}})
    assert {c: 1}[ModelSpec.from_hf_config({**BASE, "rope_scaling": {"rope_type": "linear", "factor": 2.0}})] == 1


def test_parameter_count_and_weight_bytes():
    c = ModelSpec.from_hf_config({**BASE, "tie_word_embeddings": True})
    per_layer = 64 * (64 + 2 * 32) + 64 * 64 + 3 * 64 * 128  # q, k, v, o and the gated MLP
    assert c.num_params == 1000 * 64 + 2 * per_layer + 2 * 2 * 64 + 64
    assert c.weight_bytes == 2 * c.num_params
    assert ModelSpec.from_hf_config(BASE).num_params == c.num_params + 1000 * 64  # an untied LM head


def test_step_work_of_a_prefill_and_a_decode():
    c = ModelSpec.from_hf_config(BASE)
    counter = WorkModel(c)
    prefill = counter.batch([(100, 0, True)])
    # Matrix products: 2 FLOPs per weight per token; attention: 4 x q_dim per query-key pair (100 x 101 / 2).
    assert prefill.linear_flops == 2 * 100 * c.linear_params_per_layer
    assert prefill.attention_flops == 4 * 64 * 100 * 101 / 2
    assert prefill.head_flops == 2 * 64 * 1000
    assert prefill.flops == 2 * (prefill.linear_flops + prefill.attention_flops) + prefill.head_flops
    decode = counter.batch([(1, 500, True)] * 4)
    # A decode step reads every sequence's K and V: 4 x 501 tokens x K and V x kv_dim x 2 bytes, per layer.
    assert decode.attention_bytes == 4 * 501 * 2 * 32 * 2
    assert prefill.flops / prefill.bytes > 5 * decode.flops / decode.bytes  # prefill is compute-heavy
    assert counter.batch([]).head_bytes == 0.0  # no LM head without a sampling sequence


def test_tensor_parallel_splits_the_work_and_adds_all_reduces():
    c = ModelSpec.from_hf_config(BASE)
    one, two = WorkModel(c).batch([(64, 0, True)]), WorkModel(c, tp=2).batch([(64, 0, True)])
    assert two.linear_flops == one.linear_flops / 2 and two.flops == pytest.approx(one.flops)
    assert one.allreduce_bytes == 0 and two.allreduce_bytes == 64 * 64 * 2 * 2 * (2 - 1) / 2
    with pytest.raises(ValueError, match="tensor parallel"):
        WorkModel(c, tp=0)


def test_a_scheduler_output_counts_as_its_batch():
    counter = WorkModel(ModelSpec.from_hf_config(BASE))
    out = SchedulerOutput([ScheduledSeq(None, 30, 10, False), ScheduledSeq(None, 99, 1, True)])
    assert counter.scheduled(out) == counter.batch([(10, 30, False), (1, 99, True)])


def test_a_chunk_over_its_cached_context_is_counted_apart():
    counter = WorkModel(ModelSpec.from_hf_config(BASE))
    coef = 4 * 64
    chunk = counter.batch([(128, 1024, True)])
    # Its pairs with the 1,024 cached tokens are prefix pairs; its own causal triangle is not.
    assert chunk.prefix_attention_flops == coef * 128 * 1024
    assert chunk.attention_flops == coef * (128 * 1024 + 128 * 129 / 2)
    # A decode's pairs with its context, and a fresh prompt, have none.
    assert counter.batch([(1, 1024, True)] * 8).prefix_attention_flops == 0
    assert counter.batch([(128, 0, True)]).prefix_attention_flops == 0
    beside = counter.batch([(1, 500, True), (64, 256, False)])
    assert beside.prefix_attention_flops == coef * 64 * 256
    out = SchedulerOutput([ScheduledSeq(None, 500, 1, True), ScheduledSeq(None, 256, 64, False)])
    assert counter.scheduled(out) == beside
