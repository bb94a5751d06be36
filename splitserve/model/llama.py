"""The Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM2), run layer by layer over a paged KV cache."""

from __future__ import annotations

import re
from typing import Iterable, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from splitserve.model import paged_kernel
from splitserve.model.attention import AttentionPlan, paged_attention
from splitserve.model.batch import ForwardBatch
from splitserve.core.model_spec import ModelSpec
from splitserve.model.kv_cache import PagedKVCache
from splitserve.model.linear import Linear, PackedWeight, linear
from splitserve.model.rope import inv_frequencies, rope_cos_sin, rotate_


class LayerHooks(Protocol):
    def before_layer(self, layer: int) -> None:
        """Decode side: block until that layer's KV has arrived."""

    def after_layer(self, layer: int) -> None:
        """Prefill side: that layer's KV is in the cache, send it now."""


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The fused kernel computes in float32 for half types, as transformers' RMSNorm does.
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)

    def add_then_norm(self, h: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """h += delta (the residual stream, in place), then this norm of it: one pass where fused."""
        if paged_kernel.fused(h, delta, self.weight) and h.dim() == 2 and h.is_contiguous() and delta.stride(-1) == 1:
            return paged_kernel.add_rms_norm_(h, delta, self.weight, self.eps)
        return self(h.add_(delta))


class Attention(nn.Module):
    def __init__(self, c: ModelSpec) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        # q, k and v in one matmul: rows [q heads | k heads | v heads], each in HF's (head, dim) order.
        self.qkv_proj = Linear(c.hidden_size, (c.num_heads + 2 * c.num_kv_heads) * c.head_dim, bias=c.attention_bias)
        self.o_proj = Linear(c.num_heads * c.head_dim, c.hidden_size, bias=False)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache_layer: torch.Tensor, plan: AttentionPlan
    ) -> torch.Tensor:
        qkv = self.qkv_proj(x).view(x.shape[0], -1, self.head_dim)
        # Rotate q and k together, in place: they are adjacent in qkv.
        qk = qkv[:, : self.num_heads + self.num_kv_heads]
        rotate_(qk, cos, sin)
        q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]
        v = qkv[:, self.num_heads + self.num_kv_heads :]
        return self.o_proj(paged_attention(q, k, v, cache_layer, plan))


class MLP(nn.Module):
    def __init__(self, c: ModelSpec) -> None:
        super().__init__()
        self.intermediate_size = c.intermediate_size
        self.gate_up_proj = Linear(c.hidden_size, 2 * c.intermediate_size, bias=False)  # rows [gate | up]
        self.down_proj = Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if paged_kernel.fused(gate_up) and gate_up.dim() == 2 and gate_up.is_contiguous():
            return self.down_proj(paged_kernel.silu_mul(gate_up))
        gate, up = gate_up.split(self.intermediate_size, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, c: ModelSpec) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c)

    def forward(
        self, h: torch.Tensor, delta: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
        cache_layer: torch.Tensor, plan: AttentionPlan,
    ) -> torch.Tensor:
        """h, the residual stream, is updated in place: the previous layer's output `delta` (None before the
        first layer) is added to it in the same pass as this layer's first norm. Returns this layer's output,
        for the next layer (or the final norm) to add."""
        if delta is None:
            x = self.input_layernorm(h)
        else:
            x = self.input_layernorm.add_then_norm(h, delta)
        attended = self.self_attn(x, cos, sin, cache_layer, plan)
        return self.mlp(self.post_attention_layernorm.add_then_norm(h, attended))


class LlamaModel(nn.Module):
    def __init__(self, config: ModelSpec) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if not config.tie_word_embeddings:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self._lm_head_packed = self.lm_head.packed if hasattr(self, "lm_head") else PackedWeight()
        # A plain attribute, not a buffer: it must survive `to_empty` when the loader builds the model on "meta".
        self._inv_freq = inv_frequencies(config)
        # The decode-attention kernel builds (first time on a machine) or loads on a background thread;
        # forward uses it from the first step after it is ready, the gather path before.
        paged_kernel.start()
        # Matrices are kept column-major (their transpose is contiguous): a linear then runs as x @ W^T with no
        # transposed copy, and on CPU decode's skinny products run faster than with row-major weights (MKL:
        # ~25% at batch 1; oneDNN: 15-25% at batch 2-8). `.to()`, `to_empty()` and loading keep these strides.
        for p in self.parameters():
            if p.dim() == 2:
                p.data = p.data.t().contiguous().t()

    def pack_weights(self) -> None:
        """Make the packed copies of the weights (linear.PackedWeight) now, at load, rather than in the first
        request's prefill (~1.5 s for SmolLM2-135M on 2 threads)."""
        for m in self.modules():
            if isinstance(m, Linear):
                m.packed.of(m.weight)
        self._lm_head_packed.of(self.lm_head_weight)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, kv_cache: PagedKVCache, hooks: LayerHooks | None = None) -> torch.Tensor:
        """float32 logits [len(batch.logits_indices), vocab] for the rows batch.logits_indices."""
        device = batch.input_ids.device
        if self._inv_freq.device != device:
            self._inv_freq = self._inv_freq.to(device)
        decode_kernel = paged_kernel.usable(kv_cache.tensor)
        plan = AttentionPlan.build(batch, kv_cache.block_size, self.config.num_kv_heads, decode_kernel)
        h = self.embed_tokens(batch.input_ids)
        cos, sin = rope_cos_sin(self._inv_freq, batch.positions, h.dtype)
        delta = None
        for i, layer in enumerate(self.layers):
            if hooks is not None:
                hooks.before_layer(i)
            delta = layer(h, delta, cos, sin, kv_cache.layer(i), plan)
            if hooks is not None:
                hooks.after_layer(i)
        rows = batch.logits_indices
        h = self.norm(h[rows] if delta is None else h[rows] + delta[rows])
        w = self.lm_head_weight
        # Half-precision weights are cast per step, a new tensor each time: nothing to keep a packed copy of.
        packed = self._lm_head_packed if w.dtype == torch.float32 else None
        return linear(h.float(), w.float(), packed=packed)

    def load_hf_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy in tensors named as in a transformers checkpoint, packing q/k/v and gate/up.

        Every parameter must be covered; a missing or unknown tensor is a ValueError.
        """
        params = dict(self.named_parameters())
        loaded_rows = dict.fromkeys(params, 0)
        for name, tensor in weights:
            target, offset = self._hf_to_ours(name)
            if target is None:
                continue
            if target not in params:
                raise ValueError(f"checkpoint tensor {name!r} has no place in this model")
            param = params[target]
            rows = param.data if offset is None else param.data.narrow(0, offset, tensor.shape[0])
            if rows.shape != tensor.shape:
                raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)}, model expects {tuple(rows.shape)}")
            rows.copy_(tensor)
            loaded_rows[target] += tensor.shape[0]
        missing = sorted(n for n, p in params.items() if loaded_rows[n] != p.shape[0])
        if missing:
            raise ValueError(f"checkpoint lacks tensors for {len(missing)} parameters, e.g. {missing[:3]}")

    def _hf_to_ours(self, name: str) -> tuple[str | None, int | None]:
        """(our parameter, row offset into it or None for the whole); (None, None) for tensors we skip."""
        c = self.config
        name = name.removeprefix("model.")
        if name == "lm_head.weight" and c.tie_word_embeddings:
            return None, None  # some tied checkpoints still store the copy
        if name.endswith("rotary_emb.inv_freq"):
            return None, None
        m = re.fullmatch(r"(layers\.\d+\.)(self_attn|mlp)\.(q|k|v|gate|up)_proj\.(weight|bias)", name)
        if m is None:
            return name, None
        prefix, block, proj, kind = m.groups()
        q_rows, kv_rows = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        offsets = {"q": 0, "k": q_rows, "v": q_rows + kv_rows, "gate": 0, "up": c.intermediate_size}
        packed = "qkv_proj" if block == "self_attn" else "gate_up_proj"
        return f"{prefix}{block}.{packed}.{kind}", offsets[proj]
