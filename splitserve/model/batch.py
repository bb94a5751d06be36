"""One forward step's inputs: the new tokens of several sequences, flattened, and where their K/V live."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain

import torch


@dataclass
class SeqInput:
    token_ids: list[int]  # the new tokens to compute this step
    start_pos: int  # number of tokens already in the cache for this sequence (their KV is present)
    block_table: list[int]
    want_logits: bool  # True -> the logits of this sequence's last new token are returned


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [T] int64: the new tokens of every sequence, concatenated
    positions: torch.Tensor  # [T] int64: absolute position of each new token
    query_lens: list[int]  # new tokens per sequence
    context_lens: list[int]  # tokens in cache for each sequence *after* this step (cached + new)
    block_tables: list[list[int]]  # block ids per sequence, covering context_lens
    slot_mapping: torch.Tensor  # [T] int64: block_id*block_size+offset where each new token's K/V is written
    logits_indices: torch.Tensor  # [N] int64: rows of T whose logits are returned (in order)


def build_forward_batch(seqs: list[SeqInput], block_size: int, device: str | torch.device) -> ForwardBatch:
    if not seqs:
        raise ValueError("a forward batch needs at least one sequence")
    query_lens = [len(s.token_ids) for s in seqs]
    context_lens = [s.start_pos + n for s, n in zip(seqs, query_lens)]
    for s, n, ctx in zip(seqs, query_lens, context_lens):
        if n == 0:
            raise ValueError("every sequence in a batch needs at least one new token")
        if len(s.block_table) * block_size < ctx:
            raise ValueError(f"block table of {len(s.block_table)} blocks cannot hold {ctx} tokens")

    q = torch.tensor(query_lens)
    ends = torch.cumsum(q, 0)
    # Each token's position is its row minus its sequence's first row, plus the sequence's start_pos.
    shift = torch.repeat_interleave(ends - q - torch.tensor([s.start_pos for s in seqs]), q)
    positions = torch.arange(int(ends[-1])) - shift
    seq_of_row = torch.repeat_interleave(torch.arange(len(seqs)), q)
    tables = pad_block_tables([s.block_table for s in seqs])
    slots = tables[seq_of_row, positions // block_size] * block_size + positions % block_size
    logits_rows = [int(e) - 1 for e, s in zip(ends, seqs) if s.want_logits]
    return ForwardBatch(
        input_ids=torch.tensor(list(chain.from_iterable(s.token_ids for s in seqs)), dtype=torch.int64).to(device),
        positions=positions.to(device),
        query_lens=query_lens,
        context_lens=context_lens,
        block_tables=[s.block_table for s in seqs],
        slot_mapping=slots.to(device),
        logits_indices=torch.tensor(logits_rows, dtype=torch.int64).to(device),
    )


def pad_block_tables(tables: list[list[int]], device: str | torch.device = "cpu") -> torch.Tensor:
    """[num_seqs, longest table] int64, padded with block 0 (a real block: readers must mask what they pad)."""
    width = max(len(t) for t in tables)
    return torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int64, device=device)
