"""Attention over the paged KV cache.

`AttentionPlan.build` turns a ForwardBatch into index tensors and masks once per step; every layer then
runs `paged_attention` with them: write the new K/V at their slots, then attend.

- Decode sequences (one new token) are batched into one SDPA call, their contexts gathered from the cache
  and padded to the longest, with a mask. Grouped-query heads are folded: the query heads sharing a KV
  head become that head's "query rows", so K/V are never repeated.
- A prefill chunk that starts a sequence attends only to its own new K/V (plain causal attention).
- A prefill chunk that continues one (chunked prefill, prefix-cache hit) gathers its whole context and uses
  a causal mask shifted by start_pos.

Rows of the cache: a layer [num_blocks, 2, block_size, kv_heads, head_dim] is viewed as rows of
[kv_heads, head_dim]; slot s's K is row (s // bs) * 2 * bs + s % bs, its V is bs rows further.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from splitserve.model.batch import ForwardBatch, pad_block_tables


@dataclass
class _Decodes:
    rows: slice | torch.Tensor  # their rows of T
    k_index: torch.Tensor  # [B * kv_heads * L]: (row * kv_heads + head) of the cache viewed as [-1, head_dim]
    v_index: torch.Tensor
    shape: tuple[int, int, int]  # B, kv_heads, L
    mask: torch.Tensor | None  # [B, 1, 1, L], None when every context has length L


@dataclass
class _Prefill:
    rows: slice
    # Set only for a chunk continuing a sequence: its context's gather indices ([kv_heads * ctx]) and mask [T, ctx].
    k_index: torch.Tensor | None
    v_index: torch.Tensor | None
    mask: torch.Tensor | None


@dataclass
class AttentionPlan:
    k_rows: torch.Tensor  # [T] where each new token's K is written
    v_rows: torch.Tensor
    decodes: _Decodes | None
    prefills: list[_Prefill]
    kv_heads: int

    @classmethod
    def build(cls, batch: ForwardBatch, block_size: int, kv_heads: int) -> AttentionPlan:
        device = batch.slot_mapping.device
        bs = block_size
        k_rows = batch.slot_mapping // bs * (2 * bs) + batch.slot_mapping % bs
        heads = torch.arange(kv_heads, device=device)

        def gather_index(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            # rows [..., L] of K -> flat indices laid out [..., kv_heads, L] for the [-1, head_dim] view
            k = (rows.unsqueeze(-2) * kv_heads + heads[:, None]).flatten()
            return k, k + bs * kv_heads

        def context_rows(tables: torch.Tensor, length: int) -> torch.Tensor:
            pos = torch.arange(length, device=device)
            return tables[..., pos // bs] * (2 * bs) + pos % bs

        decode_ids, prefills, start = [], [], 0
        for i, (q, ctx) in enumerate(zip(batch.query_lens, batch.context_lens)):
            if q == 1:
                decode_ids.append(i)
            elif q == ctx:
                prefills.append(_Prefill(slice(start, start + q), None, None, None))
            else:
                table = torch.tensor(batch.block_tables[i], dtype=torch.int64, device=device)
                k_index, v_index = gather_index(context_rows(table, ctx))
                # Query j sits at position ctx - q + j and sees keys up to it.
                mask = torch.ones(q, ctx, dtype=torch.bool, device=device).tril(ctx - q)
                prefills.append(_Prefill(slice(start, start + q), k_index, v_index, mask))
            start += q

        decodes = None
        if decode_ids:
            lens = [batch.context_lens[i] for i in decode_ids]
            longest = max(lens)
            tables = pad_block_tables([batch.block_tables[i] for i in decode_ids], device)
            rows = context_rows(tables, longest)
            mask = None
            if min(lens) < longest:
                valid = torch.arange(longest, device=device) < torch.tensor(lens, device=device)[:, None]
                rows = rows.masked_fill(~valid, 0)  # padding reads row 0, which the mask hides
                mask = valid[:, None, None, :]
            k_index, v_index = gather_index(rows)
            token_rows = torch.cumsum(torch.tensor(batch.query_lens), 0)[decode_ids] - 1
            first = int(token_rows[0])
            contiguous = token_rows.tolist() == list(range(first, first + len(decode_ids)))
            decode_rows = slice(first, first + len(decode_ids)) if contiguous else token_rows.to(device)
            decodes = _Decodes(decode_rows, k_index, v_index, (len(decode_ids), kv_heads, longest), mask)
        return cls(k_rows, k_rows + bs, decodes, prefills, kv_heads)


def paged_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache_layer: torch.Tensor, plan: AttentionPlan
) -> torch.Tensor:
    """q [T, heads, head_dim], k/v [T, kv_heads, head_dim] of the new tokens -> [T, heads * head_dim]."""
    num_tokens, num_heads, head_dim = q.shape
    slots = cache_layer.view(-1, plan.kv_heads, head_dim)
    slots.index_copy_(0, plan.k_rows, k)
    slots.index_copy_(0, plan.v_rows, v)
    flat = cache_layer.view(-1, head_dim)

    groups = len(plan.prefills) + (plan.decodes is not None)
    out = None if groups == 1 else q.new_empty(num_tokens, num_heads * head_dim)
    d = plan.decodes
    if d is not None:
        b, kv_heads, length = d.shape
        ks = flat.index_select(0, d.k_index).view(b, kv_heads, length, head_dim)
        vs = flat.index_select(0, d.v_index).view(b, kv_heads, length, head_dim)
        qs = q[d.rows].unflatten(1, (kv_heads, num_heads // kv_heads))
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=d.mask).reshape(b, -1)
        if out is None:
            return o
        out[d.rows] = o
    for p in plan.prefills:
        # [1, heads, tokens, head_dim]: the fused CUDA kernels take only 4-D inputs.
        qs = q[p.rows].transpose(0, 1)[None]
        if p.k_index is None:
            ks, vs = k[p.rows].transpose(0, 1)[None], v[p.rows].transpose(0, 1)[None]
        else:
            ks = flat.index_select(0, p.k_index).view(1, plan.kv_heads, -1, head_dim)
            vs = flat.index_select(0, p.v_index).view(1, plan.kv_heads, -1, head_dim)
        o = F.scaled_dot_product_attention(
            qs, ks, vs, attn_mask=p.mask, is_causal=p.mask is None, enable_gqa=True
        )[0].transpose(0, 1)
        if out is None:
            return o.reshape(num_tokens, -1)
        out[p.rows] = o.flatten(1)
    return out
