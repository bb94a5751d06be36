"""Model and hardware presets: exact shapes, KV bytes per token, config.json import, clear errors."""

import json

import pytest

from splitserve.sim import hardware, models
from splitserve.sim.hardware import PresetError


def test_llama_70b_kv_bytes_per_token_and_a_4k_prompt():
    m = models.model("llama-3.1-70b")
    assert m.kv_bytes_per_token() == 327_680  # 2 x 80 layers x 8 kv heads x 128 x 2 bytes
    assert round(4096 * m.kv_bytes_per_token() / 1e9, 2) == 1.34


@pytest.mark.parametrize(
    "name, billions",
    [("llama-3.1-8b", 8.03), ("llama-3.1-70b", 70.55), ("llama-3.1-405b", 405.85), ("qwen3-32b", 32.76),
     ("mistral-7b", 7.25), ("smollm2-135m", 0.1345)],
)
def test_parameter_counts_match_the_published_sizes(name, billions):
    assert models.model(name).num_params / 1e9 == pytest.approx(billions, rel=0.005)


def test_names_are_forgiving():
    assert models.model("meta-llama/Llama-3.1-70B-Instruct") == models.model("LLAMA-3.1-70B")
    assert hardware.gpu("H100-SXM") == hardware.gpu("h100")
    assert hardware.network("25GbE") == hardware.network("eth-25")


def test_hf_config_json_gives_the_same_shape(tmp_path):
    cfg = {
        "architectures": ["LlamaForCausalLM"], "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
        "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 131072,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    m = models.model(str(tmp_path))
    preset = models.model("llama-3.1-70b")
    assert (m.num_params, m.kv_bytes_per_token()) == (preset.num_params, preset.kv_bytes_per_token())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "num_local_experts": 8}))
    with pytest.raises(PresetError, match="mixture-of-experts"):
        models.model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "num_attention_heads": 60}))
    with pytest.raises(PresetError, match="multiple of num_kv_heads"):
        models.model(str(tmp_path))


@pytest.mark.parametrize("call", [lambda: models.model("gpt-17"), lambda: hardware.gpu("tpu-v9"), lambda: hardware.network("carrier-pigeon")])
def test_unknown_presets_say_what_exists(call):
    with pytest.raises(PresetError, match="presets: "):
        call()


def test_nvlink_takes_the_gpus_link():
    assert hardware.network("nvlink", hardware.gpu("b200")).bandwidth == hardware.gpu("b200").link_bw
    # Ethernet is shared by a node's GPUs, RDMA is per GPU.
    eth, rdma = hardware.network("eth-100"), hardware.network("rdma-400")
    assert eth.instance_bandwidth(8) == pytest.approx(eth.bandwidth * eth.efficiency)
    assert rdma.instance_bandwidth(8) == pytest.approx(8 * rdma.bandwidth * rdma.efficiency)
