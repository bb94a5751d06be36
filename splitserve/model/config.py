"""The shape of a Llama-family model, read from a Hugging Face config.json (GGUF metadata maps onto it too)."""

from __future__ import annotations

from dataclasses import dataclass

# HF class name -> our architecture name. All three share one decoder; Qwen2 differs by its qkv bias.
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
# RoPE scaling type -> the keys its formula reads.
ROPE_TYPES = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    # HF's rope scaling dict, normalised to carry "rope_type" ("linear" or "llama3"); None means plain RoPE.
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # bias on the q/k/v projections (Qwen2)
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    architecture: str  # "llama", "qwen2" or "mistral"

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes

    @classmethod
    def from_hf(cls, d: dict) -> ModelConfig:
        """From a config.json dict, in either the transformers 4 (rope_theta + rope_scaling) or 5 (rope_parameters) style."""
        architecture = _architecture(d)
        if d.get("mlp_bias"):
            raise ValueError("mlp_bias=True is not supported")
        rope_theta, rope_scaling = _rope(d)
        eos = d.get("eos_token_id")
        eos_ids = () if eos is None else tuple(eos) if isinstance(eos, list) else (int(eos),)
        num_heads = int(d["num_attention_heads"])
        max_positions = int(d.get("max_position_embeddings", 2048))
        # Sliding-window attention is not implemented: serve such a model (Mistral v0.1) only as far as its
        # window, where full attention is exact.
        window = d.get("sliding_window") if d.get("use_sliding_window", True) else None
        return cls(
            vocab_size=int(d["vocab_size"]),
            hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]),
            num_layers=int(d["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(d.get("num_key_value_heads") or num_heads),
            head_dim=int(d.get("head_dim") or d["hidden_size"] // num_heads),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=min(max_positions, int(window)) if window else max_positions,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            # Qwen2's config has no such key: its q/k/v projections always carry a bias.
            attention_bias=bool(d.get("attention_bias", architecture == "qwen2")),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
            architecture=architecture,
        )


def _architecture(d: dict) -> str:
    names = d.get("architectures") or []
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    if not names and d.get("model_type") in ARCHITECTURES.values():
        return d["model_type"]
    found = names or d.get("model_type")
    raise ValueError(f"unsupported architecture {found!r}: supported are {', '.join(ARCHITECTURES)}")


def _rope(d: dict) -> tuple[float, dict | None]:
    params = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", d.get("rope_theta", 10000.0)))
    # Old configs spell the key "type"; both may be present.
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"unsupported rope scaling type {rope_type!r}: supported are {', '.join(ROPE_TYPES)}")
    missing = [k for k in ROPE_TYPES[rope_type] if k not in params]
    if missing:
        raise ValueError(f"{rope_type} rope scaling lacks {', '.join(missing)}")
    if rope_type == "default":
        return theta, None
    return theta, {"rope_type": rope_type, **params}
