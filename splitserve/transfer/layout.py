"""What both ends must agree on before any KV byte moves, and the byte views that move it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from splitserve.model.kv_cache import PagedKVCache


@dataclass(frozen=True)
class KVLayout:
    model_fingerprint: str
    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str  # torch dtype name without the "torch." prefix, e.g. "bfloat16"

    @classmethod
    def from_cache(cls, kv_cache: PagedKVCache, fingerprint: str) -> KVLayout:
        num_layers, _, _, num_kv_heads, block_size, head_dim = kv_cache.tensor.shape
        return cls(fingerprint, num_layers, block_size, num_kv_heads, head_dim, str(kv_cache.tensor.dtype).removeprefix("torch."))

    @property
    def block_shape(self) -> tuple[int, ...]:
        """One (layer, block) unit: K then V, each [kv_heads, block_size, head_dim] (PagedKVCache's layout)."""
        return (2, self.num_kv_heads, self.block_size, self.head_dim)

    @property
    def shape_str(self) -> str:
        return "x".join(map(str, self.block_shape))

    @property
    def block_bytes(self) -> int:
        return int(np.prod(self.block_shape)) * getattr(torch, self.dtype).itemsize


class CacheBytes:
    """A KV cache's memory seen as bytes, for sockets and copies that read and write the tensor itself.

    numpy and memoryviews rather than torch: they give writable buffers for every dtype (torch has no
    buffer protocol; numpy has no bfloat16, but bytes suffice).
    """

    def __init__(self, kv_cache: PagedKVCache, layout: KVLayout) -> None:
        t = kv_cache.tensor
        got = KVLayout.from_cache(kv_cache, layout.model_fingerprint)
        if got != layout:
            raise ValueError(f"KV cache does not match the transfer layout: cache {got}, layout {layout}")
        if t.device.type != "cpu" or not t.is_contiguous():
            # Sockets and the shm ring need host memory; a GPU cache would need a pinned staging buffer.
            raise ValueError(f"KV transfer needs a contiguous CPU cache, got device={t.device} contiguous={t.is_contiguous()}")
        self.block_bytes = layout.block_bytes
        self.num_blocks = t.shape[1]
        self.array = t.view(torch.uint8).view(t.shape[0], self.num_blocks, self.block_bytes).numpy()  # [layer, block, bytes]
        self._flat = memoryview(self.array.reshape(-1))
        self._layer_bytes = self.num_blocks * self.block_bytes

    def views(self, layer: int, block_ids: Sequence[int]) -> list[memoryview]:
        """Those blocks of `layer`, in order; runs of consecutive ids become one view (fewer iovecs)."""
        flat, bb, base = self._flat, self.block_bytes, layer * self._layer_bytes
        out: list[memoryview] = []
        start = prev = -2
        for i in block_ids:
            if i != prev + 1:
                if start >= 0:
                    out.append(flat[base + start * bb : base + (prev + 1) * bb])
                start = i
            prev = i
        if start >= 0:
            out.append(flat[base + start * bb : base + (prev + 1) * bb])
        return out
