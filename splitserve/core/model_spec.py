"""A decoder model described once: its shape, what it weighs, what one engine step computes and moves.

The torch Llama is built from it, the worker reports its KV bytes per token and meters its steps with it,
and the simulator and planner turn its FLOPs and bytes into seconds (`sim/perf.py`, with a `Hardware` and an
`Efficiency`). One parser reads a Hugging Face config.json into it. Pure Python: what a machine can run is
decided elsewhere (`model/loader.py` refuses what the torch Llama cannot build; the planner models any dense
decoder).

Per layer, on each of `tp` GPUs (tensor parallel: each does 1/tp of every matrix product and of attention):

    projections + MLP   FLOPs 2 * tokens * linear_params / tp     bytes: weights / tp + activations per token
    attention           FLOPs 4 * q_heads * head_dim * sum over sequences of (new * context + new^2 / 2) / tp
                        (the new * context part of a chunk of several tokens counted apart as well: see StepWork)
                        bytes: the K and V of every sequence's context and new tokens (/ tp)
    all-reduce (tp > 1) 2 (tp-1)/tp * tokens * hidden * bytes, twice per layer
and once per step the LM head for the sequences that sample.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Iterable, NamedTuple

if TYPE_CHECKING:
    from splitserve.core.scheduler import SchedulerOutput

# HF class name -> family name. All three are one decoder; Qwen2 differs by its qkv bias.
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
# RoPE scaling type -> the keys its formula reads (the types `model/rope.py` implements).
ROPE_TYPES = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
_MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")

Batch = Iterable[tuple[int, int, bool]]  # (new tokens, tokens already cached, samples) per sequence


@dataclass(frozen=True)
class ModelSpec:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    name: str = "model"
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # HF's rope scaling dict, normalised to carry "rope_type"; None means plain RoPE. A dict cannot be hashed:
    # the description hashes by its other fields.
    rope_scaling: dict | None = field(default=None, hash=False)
    attention_bias: bool = False  # bias on the q/k/v projections (Qwen2)
    mlp_bias: bool = False
    architecture: str = "llama"  # a family name of ARCHITECTURES, else the HF class name
    dtype_bytes: int = 2  # weights and activations
    kv_dtype_bytes: int = 2
    source: str = ""  # where the shape comes from: a hub repository, a config.json, a loaded model

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")

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

    def kv_bytes_per_token(self, dtype_bytes: int | None = None) -> int:
        """2 (K and V) x layers x kv_heads x head_dim x bytes per element (default: the description's KV dtype)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * (dtype_bytes or self.kv_dtype_bytes)

    def with_dtype(self, dtype_bytes: int, kv_dtype_bytes: int | None = None) -> ModelSpec:
        return replace(self, dtype_bytes=dtype_bytes, kv_dtype_bytes=kv_dtype_bytes or dtype_bytes)

    @classmethod
    def from_hf_config(cls, d: dict, name: str = "model") -> ModelSpec:
        """From a config.json dict, in either the transformers 4 (rope_theta + rope_scaling) or 5
        (rope_parameters) style. Raises ValueError naming what is missing or malformed."""
        if isinstance(d.get("text_config"), dict):  # multimodal wrappers keep the decoder's shape here
            d = {**d, **d["text_config"]}
        if any(k in d for k in _MOE_KEYS):
            raise ValueError(f"{name}: mixture-of-experts models are not modelled")
        required = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
        missing = [k for k in required if k not in d]
        if missing:
            raise ValueError(f"{name}: config.json lacks {', '.join(missing)}")
        architecture = _architecture(d)
        rope_theta, rope_scaling = _rope(d)
        num_heads = int(d["num_attention_heads"])
        max_positions = int(d.get("max_position_embeddings", 2048))
        # Sliding-window attention is not implemented: serve such a model (Mistral v0.1) only as far as its
        # window, where full attention is exact.
        window = d.get("sliding_window") if d.get("use_sliding_window", True) else None
        dtype = _DTYPE_BYTES.get(str(d.get("torch_dtype") or d.get("dtype") or "bfloat16"), 2)
        return cls(
            vocab_size=int(d["vocab_size"]),
            hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]),
            num_layers=int(d["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(d.get("num_key_value_heads") or num_heads),
            head_dim=int(d.get("head_dim") or d["hidden_size"] // num_heads),
            name=name,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            max_position_embeddings=min(max_positions, int(window)) if window else max_positions,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            # Qwen2's config has no such key: its q/k/v projections always carry a bias.
            attention_bias=bool(d.get("attention_bias", architecture == "qwen2")),
            mlp_bias=bool(d.get("mlp_bias", False)),
            architecture=architecture,
            dtype_bytes=dtype,
            kv_dtype_bytes=dtype,
            source="config.json",
        )


def _architecture(d: dict) -> str:
    names = d.get("architectures") or []
    for n in names:
        if n in ARCHITECTURES:
            return ARCHITECTURES[n]
    if not names and d.get("model_type") in ARCHITECTURES.values():
        return d["model_type"]
    return names[0] if names else str(d.get("model_type", "unknown"))


def _rope(d: dict) -> tuple[float, dict | None]:
    params = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", d.get("rope_theta", 10000.0)))
    # Old configs spell the key "type"; both may be present.
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    missing = [k for k in ROPE_TYPES.get(rope_type, ()) if k not in params]
    if missing:
        raise ValueError(f"{rope_type} rope scaling lacks {', '.join(missing)}")
    if rope_type == "default":
        return theta, None
    return theta, {"rope_type": rope_type, **params}


# ---------------------------------------------------------------------------------------------- step work


class StepWork(NamedTuple):
    """What one engine step computes and moves. The parts are per GPU: per layer, then the LM head once;
    `flops` and `bytes` are the whole worker's (all tp GPUs, all layers)."""

    tokens: int
    samples: int  # sequences that sample a token
    seqs: int
    linear_flops: float
    linear_bytes: float  # weights, and activations read and written around each product
    attention_flops: float
    # The part of attention_flops where a chunk of several new tokens attends to its cached context (chunked
    # prefill, a prefix-cache hit). The engine runs it through another kernel path than a fresh prompt's causal
    # attention or a decode (a copied context and an explicit mask), which on a CPU reaches a different
    # fraction of peak (`sim/perf.Efficiency.prefix_attention`).
    prefix_attention_flops: float
    attention_bytes: float  # K and V read from the paged cache
    allreduce_bytes: float  # ring all-reduce traffic, both all-reduces of the layer; 0 when tp == 1
    head_flops: float
    head_bytes: float
    flops: float
    bytes: float


class WorkModel:
    """Counts the work of engine steps of `model` on `tp` GPUs."""

    def __init__(self, model: ModelSpec, tp: int = 1) -> None:
        if tp < 1:
            raise ValueError(f"tensor parallel size must be >= 1, got {tp}")
        m, wb = model, model.dtype_bytes
        self.model, self.tp, self.layers = model, tp, model.num_layers
        # Per GPU, per layer.
        self.lin_flops_tok = 2.0 * m.linear_params_per_layer / tp
        self.lin_weight_bytes = m.linear_params_per_layer * wb / tp
        # Activations read and written around each product (x, qkv, attn out, gate/up, down), per token.
        h, i = m.hidden_size, m.intermediate_size
        self.act_bytes_tok = (4 * h + m.q_dim + 2 * m.kv_dim + 3 * i) * wb / tp
        self.att_flops_coef = 4.0 * m.q_dim / tp
        self.kv_bytes_tok_layer = 2.0 * m.kv_dim * m.kv_dtype_bytes / tp
        self.head_flops_sample = 2.0 * h * m.vocab_size / tp
        self.head_bytes = h * m.vocab_size * wb / tp
        self.ar_bytes_tok = h * wb * 2.0 * (tp - 1) / tp  # ring all-reduce traffic per GPU, per token

    def work(self, tokens: int, samples: int, att_pairs: float, kv_tokens: int, seqs: int,
             prefix_pairs: float = 0.0) -> StepWork:
        """A step computing `tokens` new tokens for `seqs` sequences, `samples` of which sample; attention
        covers `att_pairs` query-key pairs, `prefix_pairs` of them between a chunk of several tokens and its
        cached context, and reads `kv_tokens` tokens of K/V."""
        lin_f = tokens * self.lin_flops_tok
        lin_b = self.lin_weight_bytes + tokens * self.act_bytes_tok
        att_f = att_pairs * self.att_flops_coef
        att_b = kv_tokens * self.kv_bytes_tok_layer
        head_f = samples * self.head_flops_sample
        head_b = self.head_bytes if samples else 0.0
        flops = (self.layers * (lin_f + att_f) + head_f) * self.tp
        nbytes = (self.layers * (lin_b + att_b) + head_b) * self.tp
        return StepWork(tokens, samples, seqs, lin_f, lin_b, att_f, prefix_pairs * self.att_flops_coef, att_b,
                        tokens * self.ar_bytes_tok, head_f, head_b, flops, nbytes)

    def batch(self, seqs: Batch) -> StepWork:
        """A batch given as (new tokens, tokens already cached, samples) per sequence."""
        tokens = samples = kv = n_seqs = 0
        pairs = prefix = 0.0
        for n, c, sample in seqs:
            tokens += n
            kv += c + n
            pairs += n * c + n * (n + 1) * 0.5
            if n > 1:
                prefix += n * c
            samples += bool(sample)
            n_seqs += 1
        return self.work(tokens, samples, pairs, kv, n_seqs, prefix)

    def scheduled(self, out: SchedulerOutput) -> StepWork:
        """The work of a core `SchedulerOutput`: `batch`'s sums (in the same order, so the same floats), read
        straight off the sequences rather than through a tuple per sequence (the simulator's hot path)."""
        tokens = samples = kv = 0
        pairs = prefix = 0.0
        for s in out.seqs:
            n, c = s.num_new_tokens, s.start_pos
            tokens += n
            kv += c + n
            pairs += n * c + n * (n + 1) * 0.5
            if n > 1:
                prefix += n * c
            if s.sample:
                samples += 1
        return self.work(tokens, samples, pairs, kv, len(out.seqs), prefix)
