"""The paged KV cache: fixed-size blocks of token slots, handed out to sequences through block tables."""

from __future__ import annotations

import torch

from splitserve.core.model_spec import ModelSpec


class PagedKVCache:
    """One tensor per worker: [num_layers, num_blocks, 2, num_kv_heads, block_size, head_dim].

    Layout chosen so one (layer, block) K+V pair is a contiguous buffer (KV transfer sends these with
    scatter-gather I/O), and inside it each head's K (and V) is a contiguous [block_size, head_dim] run:
    attention copies a context out of the cache one run per (block, head), already in the
    [kv_heads, tokens, head_dim] order SDPA reads (token-major blocks needed one copy per token and head).
    """

    def __init__(
        self,
        config: ModelSpec,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: str | torch.device,
    ) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks} and {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        shape = (config.num_layers, num_blocks, 2, config.num_kv_heads, block_size, config.head_dim)
        # Zeroed, not empty: padded attention reads slots it then masks, and NaN garbage would survive a 0 weight.
        self.tensor = torch.zeros(shape, dtype=dtype, device=device)

    def layer(self, i: int) -> torch.Tensor:
        """View [num_blocks, 2, kv_heads, block_size, head_dim]."""
        return self.tensor[i]

    def block_view(self, layer: int, block_id: int) -> torch.Tensor:
        """Contiguous [2, kv_heads, block_size, head_dim]: K then V of one block in one layer."""
        return self.tensor[layer, block_id]

    @staticmethod
    def bytes_per_block(config: ModelSpec, block_size: int, dtype: torch.dtype) -> int:
        """All layers' K and V of one block."""
        return config.kv_bytes_per_token(dtype.itemsize) * block_size
