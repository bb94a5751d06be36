"""Greedy decoding with our model and with transformers, and comparing the two up to float summation order."""

from __future__ import annotations

import math

import torch

from splitserve.model.batch import SeqInput, build_forward_batch
from splitserve.model.kv_cache import PagedKVCache
from splitserve.model.loader import LoadedModel

# Logits this close can swap order from summation order alone: a different greedy pick there is not a bug.
TIE_GAP = 1e-4


def assert_greedy_match(
    ours: list[int], ref: list[int], ref_logits: list[torch.Tensor] | torch.Tensor, tie_gap: float = TIE_GAP
) -> None:
    """ours == ref, except that from a step where our token's reference logit is within `tie_gap` of the
    reference's best, the continuations may differ (each then conditions on a different token)."""
    assert len(ours) == len(ref), f"lengths differ: {len(ours)} vs {len(ref)}"
    for step, (a, b) in enumerate(zip(ours, ref)):
        if a == b:
            continue
        logits = ref_logits[step].float()
        gap = float(logits.max() - logits[a])
        assert gap < tie_gap, (
            f"greedy token {step} differs: ours {a}, reference {b} (logit gap {gap:.2e}, not a tie)\n"
            f"ours: {ours}\nref:  {ref}"
        )
        return


def greedy(loaded: LoadedModel, prompts: list[list[int]], steps: int, block_size: int = 16) -> list[list[int]]:
    """Our greedy continuation of several prompts, prefilled together and then decoded in one batch per step."""
    width = math.ceil(max(map(len, prompts)) / block_size) + math.ceil(steps / block_size) + 1
    cache = PagedKVCache(loaded.config, width * len(prompts), block_size, loaded.dtype, loaded.device)
    tables = [list(range(i * width, (i + 1) * width)) for i in range(len(prompts))]
    seqs = [list(p) for p in prompts]
    inputs = [SeqInput(list(p), 0, t, True) for p, t in zip(prompts, tables)]
    outs: list[list[int]] = [[] for _ in prompts]
    for _ in range(steps):
        next_ids = loaded.model(build_forward_batch(inputs, block_size, loaded.device), cache).argmax(-1).tolist()
        inputs = []
        for seq, out, table, tok in zip(seqs, outs, tables, next_ids):
            out.append(tok)
            inputs.append(SeqInput([tok], len(seq), table, True))
            seq.append(tok)
    return outs


@torch.no_grad()
def ref_greedy(ref: torch.nn.Module, prompt: list[int], steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """transformers' greedy tokens and the raw logits of each step (EOS does not stop it)."""
    ids = torch.tensor([prompt])
    out = ref.generate(
        ids,
        # Explicit: else generate masks every prompt token equal to pad_token_id (SmolLM2's pad is <|im_end|>).
        attention_mask=torch.ones_like(ids),
        max_new_tokens=steps,
        do_sample=False,
        eos_token_id=None,
        output_logits=True,
        return_dict_in_generate=True,
    )
    return out.sequences[0, len(prompt) :].tolist(), [step[0] for step in out.logits]
