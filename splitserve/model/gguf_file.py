"""Reading a llama.cpp GGUF file: its metadata as a ModelSpec, its tensors dequantized and in transformers' layout."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import gguf
import numpy as np
import torch

from splitserve.core.model_spec import ModelSpec

# GGUF tensor name (after "blk.N.") -> transformers name (after "model.layers.N.").
_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def open_gguf(path: str | Path) -> gguf.GGUFReader:
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises anything from ValueError to struct/numpy errors on a bad file
        raise ValueError(f"{path} is not a readable GGUF file: {e}") from e


def gguf_field(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def gguf_eos_ids(reader: gguf.GGUFReader) -> tuple[int, ...]:
    """End of sequence, then end of turn where the file names one (chat models stop on either)."""
    ids = (gguf_field(reader, f"tokenizer.ggml.{kind}_token_id") for kind in ("eos", "eot"))
    return tuple(dict.fromkeys(int(i) for i in ids if i is not None))


def config_from_gguf(reader: gguf.GGUFReader) -> ModelSpec:
    arch = gguf_field(reader, "general.architecture")
    # llama.cpp writes Llama, Mistral and SmolLM2 all as "llama".
    if arch != "llama":
        raise ValueError(f"unsupported GGUF architecture {arch!r}: only 'llama' is supported")
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise ValueError("GGUF files with rope_freqs (Llama 3.1 style RoPE scaling) are not supported")

    def meta(key: str, default: Any = None) -> Any:
        value = gguf_field(reader, f"llama.{key}", default)
        if value is None:
            raise ValueError(f"GGUF metadata lacks llama.{key}")
        return value

    hidden, heads = int(meta("embedding_length")), int(meta("attention.head_count"))
    scaling_type = gguf_field(reader, "llama.rope.scaling.type", "none")
    if scaling_type not in ("none", "linear"):
        raise ValueError(f"unsupported GGUF rope scaling type {scaling_type!r}")
    # Older files give the vocabulary size only as the length of the token list.
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    return ModelSpec(
        vocab_size=int(meta("vocab_size", len(tokens.data) if tokens else None)),
        hidden_size=hidden,
        intermediate_size=int(meta("feed_forward_length")),
        num_layers=int(meta("block_count")),
        num_heads=heads,
        num_kv_heads=int(meta("attention.head_count_kv", heads)),
        head_dim=int(meta("rope.dimension_count", hidden // heads)),
        rms_norm_eps=float(meta("attention.layer_norm_rms_epsilon")),
        rope_theta=float(meta("rope.freq_base", 10000.0)),
        rope_scaling=(
            {"rope_type": "linear", "factor": float(meta("rope.scaling.factor"))} if scaling_type == "linear" else None
        ),
        max_position_embeddings=int(meta("context_length")),
        tie_word_embeddings="output.weight" not in names,
        attention_bias=False,
        architecture="llama",
        source="GGUF metadata",
    )


def hf_weights_from_gguf(reader: gguf.GGUFReader, config: ModelSpec) -> Iterator[tuple[str, torch.Tensor]]:
    """(transformers name, float32 tensor) for every tensor, dequantized one at a time."""
    for t in reader.tensors:
        name = _hf_name(t.name)
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise ValueError(f"GGUF tensor {t.name} uses {t.tensor_type.name}, which cannot be dequantized") from None
        # llama.cpp's converter interleaves the two RoPE halves of each q/k head; undo it.
        if name.endswith("q_proj.weight"):
            w = _unpermute(w, config.num_heads)
        elif name.endswith("k_proj.weight"):
            w = _unpermute(w, config.num_kv_heads)
        # A copy: unquantized tensors come back as read-only views of the memory-mapped file.
        yield name, torch.from_numpy(np.array(w, dtype=np.float32))


def _hf_name(name: str) -> str:
    if name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}"
    raise ValueError(f"unexpected tensor {name!r} in GGUF file")


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    # The converter did reshape(heads, 2, half, ...).swapaxes(1, 2); this is its inverse.
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
