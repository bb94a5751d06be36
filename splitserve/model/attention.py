"""Attention over the paged KV cache.

`AttentionPlan.build` turns a ForwardBatch into index tensors and masks once per step; every layer then
runs `paged_attention` with them: write the new K/V at their slots, then attend.

- Decode sequences (one new token), where the C++ kernel is built (paged_kernel.py; fp32 CPU caches): one
  kernel call reads each sequence's blocks in place through its block table. Otherwise (the gather path)
  they are batched into one SDPA call, their contexts copied out of the cache and padded to the longest,
  with a mask. Either way grouped-query heads are folded: the query heads sharing a KV head become that
  head's "query rows", so K/V are never repeated.
- A prefill chunk that starts a sequence attends only to its own new K/V (plain causal attention).
- A prefill chunk that continues one (chunked prefill, prefix-cache hit) copies its whole context the same
  way and uses a causal mask shifted by start_pos.

Rows of the cache (see PagedKVCache): a layer [num_blocks, 2, kv_heads, block_size, head_dim] is viewed
as runs of [block_size, head_dim], one per (block, K/V, head): block b's K of head h is run
(b * 2 * kv_heads + h), its V kv_heads runs further. A context is copied one run per (block, head),
straight into SDPA's [kv_heads, tokens, head_dim] order; one index per token and head (the token-major
layout before) made that copy most of a decode step at batch 16 with 1k contexts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from splitserve.model import paged_kernel
from splitserve.model.batch import ForwardBatch, pad_block_tables


@dataclass
class _Decodes:
    rows: slice | torch.Tensor  # their rows of T
    k_runs: torch.Tensor  # [B * kv_heads * nb]: the runs of each sequence's K, padded to nb blocks
    v_runs: torch.Tensor
    shape: tuple[int, int, int]  # B, kv_heads, L (the longest context; at most nb * block_size)
    mask: torch.Tensor | None  # [B, 1, 1, L], None when every context has length L


@dataclass
class _KernelDecodes:
    rows: slice | torch.Tensor
    tables: torch.Tensor  # [B, longest table] int32, padded with block 0 (never read: lens bound each walk)
    lens: torch.Tensor  # [B] int32 context lengths


@dataclass
class _Prefill:
    rows: slice
    # Set only for a chunk continuing a sequence: its context's runs ([kv_heads * nb]) and mask [T, ctx].
    k_runs: torch.Tensor | None
    v_runs: torch.Tensor | None
    mask: torch.Tensor | None


@dataclass
class AttentionPlan:
    k_rows: torch.Tensor  # [T * kv_heads]: where each new token's K of each head is written ([-1, head_dim] rows)
    v_rows: torch.Tensor
    decodes: _Decodes | _KernelDecodes | None
    prefills: list[_Prefill]
    kv_heads: int

    @classmethod
    def build(cls, batch: ForwardBatch, block_size: int, kv_heads: int, decode_kernel: bool = False) -> AttentionPlan:
        """decode_kernel: decodes run in paged_kernel (the caller checked paged_kernel.usable on its cache)."""
        device = batch.slot_mapping.device
        bs = block_size
        heads = torch.arange(kv_heads, device=device)
        # Slot s (block s // bs, offset s % bs), head h: row ((block * 2 * kv_heads) + h) * bs + offset.
        block, offset = batch.slot_mapping // bs, batch.slot_mapping % bs
        k_rows = (((block * (2 * kv_heads))[:, None] + heads) * bs + offset[:, None]).flatten()

        def runs(tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            # tables [B, nb] -> K runs laid out [B, kv_heads, nb], V runs kv_heads further.
            k = (tables[:, None, :] * (2 * kv_heads) + heads[:, None]).flatten()
            return k, k + kv_heads

        decode_ids, prefills, start = [], [], 0
        for i, (q, ctx) in enumerate(zip(batch.query_lens, batch.context_lens)):
            if q == 1:
                decode_ids.append(i)
            elif q == ctx:
                prefills.append(_Prefill(slice(start, start + q), None, None, None))
            else:
                used = batch.block_tables[i][: -(-ctx // bs)]
                k_runs, v_runs = runs(torch.tensor([used], dtype=torch.int64, device=device))
                # Query j sits at position ctx - q + j and sees keys up to it.
                mask = torch.ones(q, ctx, dtype=torch.bool, device=device).tril(ctx - q)
                prefills.append(_Prefill(slice(start, start + q), k_runs, v_runs, mask))
            start += q

        decodes: _Decodes | _KernelDecodes | None = None
        if decode_ids:
            lens = [batch.context_lens[i] for i in decode_ids]
            token_rows = torch.cumsum(torch.tensor(batch.query_lens), 0)[decode_ids] - 1
            first = int(token_rows[0])
            contiguous = token_rows.tolist() == list(range(first, first + len(decode_ids)))
            decode_rows = slice(first, first + len(decode_ids)) if contiguous else token_rows.to(device)
        if decode_ids and decode_kernel:
            tables = pad_block_tables([batch.block_tables[i][: -(-n // bs)] for i, n in zip(decode_ids, lens)])
            decodes = _KernelDecodes(decode_rows, tables.int(), torch.tensor(lens, dtype=torch.int32))
        elif decode_ids:
            longest = max(lens)
            # Each table cut to the blocks its context uses; the padding (block 0) is read, then masked.
            tables = pad_block_tables([batch.block_tables[i][: -(-n // bs)] for i, n in zip(decode_ids, lens)], device)
            mask = None
            if min(lens) < longest:
                valid = torch.arange(longest, device=device) < torch.tensor(lens, device=device)[:, None]
                mask = valid[:, None, None, :]
            k_runs, v_runs = runs(tables)
            decodes = _Decodes(decode_rows, k_runs, v_runs, (len(decode_ids), kv_heads, longest), mask)
        return cls(k_rows, k_rows + kv_heads * bs, decodes, prefills, kv_heads)


def _context(runs: torch.Tensor, cache_layer: torch.Tensor, b: int, kv_heads: int, length: int) -> torch.Tensor:
    """The runs copied out as [b, kv_heads, length, head_dim] (a view cut to `length` of whole blocks)."""
    _, _, _, bs, head_dim = cache_layer.shape
    got = cache_layer.view(-1, bs * head_dim).index_select(0, runs)
    return got.view(b, kv_heads, -1, head_dim)[:, :, :length]


def paged_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache_layer: torch.Tensor, plan: AttentionPlan
) -> torch.Tensor:
    """q [T, heads, head_dim], k/v [T, kv_heads, head_dim] of the new tokens -> [T, heads * head_dim]."""
    num_tokens, num_heads, head_dim = q.shape
    rows = cache_layer.view(-1, head_dim)
    rows.index_copy_(0, plan.k_rows, k.reshape(-1, head_dim))
    rows.index_copy_(0, plan.v_rows, v.reshape(-1, head_dim))

    groups = len(plan.prefills) + (plan.decodes is not None)
    out = None if groups == 1 else q.new_empty(num_tokens, num_heads * head_dim)
    d = plan.decodes
    if isinstance(d, _KernelDecodes):
        o = paged_kernel.decode(q[d.rows], cache_layer, d.tables, d.lens, head_dim**-0.5).flatten(1)
        if out is None:
            return o
        out[d.rows] = o
    elif d is not None:
        b, kv_heads, length = d.shape
        ks = _context(d.k_runs, cache_layer, b, kv_heads, length)
        vs = _context(d.v_runs, cache_layer, b, kv_heads, length)
        qs = q[d.rows].unflatten(1, (kv_heads, num_heads // kv_heads))
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=d.mask).reshape(b, -1)
        if out is None:
            return o
        out[d.rows] = o
    for p in plan.prefills:
        # [1, heads, tokens, head_dim]: the fused CUDA kernels take only 4-D inputs.
        qs = q[p.rows].transpose(0, 1)[None]
        if p.k_runs is None:
            ks, vs = k[p.rows].transpose(0, 1)[None], v[p.rows].transpose(0, 1)[None]
        else:
            ctx = p.mask.shape[1]
            ks = _context(p.k_runs, cache_layer, 1, plan.kv_heads, ctx)
            vs = _context(p.v_runs, cache_layer, 1, plan.kv_heads, ctx)
        o = F.scaled_dot_product_attention(
            qs, ks, vs, attn_mask=p.mask, is_causal=p.mask is None, enable_gqa=True
        )[0].transpose(0, 1)
        if out is None:
            return o.reshape(num_tokens, -1)
        out[p.rows] = o.flatten(1)
    return out
