"""Model shapes for the performance model: exact presets, or any Hugging Face config.json.

Only what sets FLOPs and bytes matters here: layer count, widths, heads, vocabulary, dtype. Presets copy the
published config.json of each model (Hugging Face hub, the repository named in `source`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from splitserve.sim.hardware import PresetError


@dataclass(frozen=True)
class ModelSpec:
    name: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 8192
    dtype_bytes: int = 2  # weights and activations (bf16)
    kv_dtype_bytes: int = 2
    source: str = ""

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def linear_params_per_layer(self) -> int:
        """Weights of one decoder layer's matrix products: q, k, v, o projections and the gated MLP."""
        h = self.hidden_size
        return h * (self.q_dim + 2 * self.kv_dim) + self.q_dim * h + 3 * h * self.intermediate_size

    @property
    def num_params(self) -> int:
        embed = self.vocab_size * self.hidden_size
        head = 0 if self.tie_word_embeddings else embed
        norms = self.num_layers * 2 * self.hidden_size + self.hidden_size
        return embed + head + self.num_layers * self.linear_params_per_layer + norms

    @property
    def weight_bytes(self) -> int:
        return self.num_params * self.dtype_bytes

    def kv_bytes_per_token(self) -> int:
        """2 (K and V) x layers x kv_heads x head_dim x bytes per element."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.kv_dtype_bytes

    def with_dtype(self, dtype_bytes: int, kv_dtype_bytes: int | None = None) -> ModelSpec:
        return replace(self, dtype_bytes=dtype_bytes, kv_dtype_bytes=kv_dtype_bytes or dtype_bytes)

    def describe(self) -> str:
        return (
            f"{self.name}: {self.num_params / 1e9:.2f} B params, {self.num_layers} layers, "
            f"{self.num_heads}/{self.num_kv_heads} heads x {self.head_dim}, KV {self.kv_bytes_per_token():,} B/token"
        )

    @classmethod
    def from_hf_config(cls, d: dict, name: str = "model") -> ModelSpec:
        if isinstance(d.get("text_config"), dict):  # multimodal wrappers keep the decoder's shape here
            d = {**d, **d["text_config"]}
        if any(k in d for k in ("num_experts", "num_local_experts", "n_routed_experts")):
            raise PresetError(f"{name}: mixture-of-experts models are not modelled")
        missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size") if k not in d]
        if missing:
            raise PresetError(f"{name}: config.json lacks {', '.join(missing)}")
        heads = int(d["num_attention_heads"])
        dtype = {"float32": 4, "float16": 2, "bfloat16": 2}.get(str(d.get("torch_dtype") or d.get("dtype") or "bfloat16"), 2)
        return cls(
            name=name,
            hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]),
            num_layers=int(d["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=int(d.get("head_dim") or d["hidden_size"] // heads),
            vocab_size=int(d["vocab_size"]),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            max_position_embeddings=int(d.get("max_position_embeddings", 8192)),
            dtype_bytes=dtype,
            kv_dtype_bytes=dtype,
            source="config.json",
        )


def _m(name, h, inter, layers, heads, kv, vocab, tie, max_pos, source, head_dim=128) -> ModelSpec:
    return ModelSpec(name, h, inter, layers, heads, kv, head_dim, vocab, tie, max_pos, source=source)


MODELS: dict[str, ModelSpec] = {
    "llama-3.1-8b": _m("Llama-3.1-8B", 4096, 14336, 32, 32, 8, 128256, False, 131072, "meta-llama/Llama-3.1-8B"),
    "llama-3.1-70b": _m("Llama-3.1-70B", 8192, 28672, 80, 64, 8, 128256, False, 131072, "meta-llama/Llama-3.1-70B"),
    "llama-3.1-405b": _m("Llama-3.1-405B", 16384, 53248, 126, 128, 8, 128256, False, 131072, "meta-llama/Llama-3.1-405B"),
    "qwen3-32b": _m("Qwen3-32B", 5120, 25600, 64, 64, 8, 151936, False, 40960, "Qwen/Qwen3-32B"),
    "mistral-7b": _m("Mistral-7B-v0.3", 4096, 14336, 32, 32, 8, 32768, False, 32768, "mistralai/Mistral-7B-v0.3"),
    "smollm2-135m": _m("SmolLM2-135M", 576, 1536, 30, 9, 3, 49152, True, 8192, "HuggingFaceTB/SmolLM2-135M", head_dim=64),
}


def _normalise(name: str) -> str:
    key = name.strip().lower().rsplit("/", 1)[-1]
    for suffix in ("-instruct", "-it"):
        key = key.removesuffix(suffix)
    return {"llama-3-70b": "llama-3.1-70b", "llama-3-8b": "llama-3.1-8b", "mistral-7b-v0.3": "mistral-7b",
            "mistral-7b-v0.1": "mistral-7b", "smollm2-135m": "smollm2-135m"}.get(key, key)


def model(name_or_path: str) -> ModelSpec:
    """A preset by name (case-insensitive; `meta-llama/Llama-3.1-70B-Instruct` works), or a path to a
    config.json or to a directory holding one."""
    p = Path(name_or_path)
    if p.is_dir():
        p = p / "config.json"
    if p.is_file():
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise PresetError(f"cannot read {p}: {e}") from None
        if not isinstance(d, dict):
            raise PresetError(f"{p}: not a JSON object")
        return ModelSpec.from_hf_config(d, name=p.parent.name or str(p))
    key = _normalise(name_or_path)
    if key in MODELS:
        return MODELS[key]
    raise PresetError(f"unknown model {name_or_path!r}; presets: {', '.join(MODELS)}, or a path to a Hugging Face config.json")
