"""Rotary position embeddings, with the "linear" and "llama3" frequency scalings (same formulas as transformers)."""

from __future__ import annotations

import math

import torch

from splitserve.core.model_spec import ModelSpec
from splitserve.model import paged_kernel


def inv_frequencies(config: ModelSpec) -> torch.Tensor:
    """float32 [head_dim // 2], on CPU whatever the default device is (models are built on "meta" when loading)."""
    dim = config.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim
    inv_freq = 1.0 / (config.rope_theta**exponents)
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling["rope_type"] == "linear":
        return inv_freq / scaling["factor"]
    return _llama3(inv_freq, scaling)


def _llama3(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    # Long wavelengths are slowed by `factor`, short ones kept, and the band between interpolated smoothly.
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [T, 1, head_dim] for the tokens at `positions`; computed once per step, shared by all layers."""
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, head_dim], rotated in halves (the HF layout, not llama.cpp's interleaved one)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def rotate_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """apply_rope in place: one fused pass (csrc/layer_ops.cpp) where the kernels are built."""
    if paged_kernel.fused(x, cos, sin) and x.dim() == 3 and x.stride(2) == 1 and cos.is_contiguous() and sin.is_contiguous():
        paged_kernel.rope_(x, cos, sin)
    else:
        x.copy_(apply_rope(x, cos, sin))
