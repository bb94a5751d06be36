"""Greedy references from transformers, and the one rule for comparing greedy token streams."""

from __future__ import annotations

import torch

# Two correct implementations may differ in float summation order; a flipped greedy token is then
# acceptable only where the reference's top-2 logit gap at that step is this small.
TIE_GAP = 1e-4


@torch.inference_mode()
def hf_greedy(model, prompt: list[int], max_new: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy continuation by full recomputation each step (no cache: the plainest reference), with the
    logits of every step; EOS does not stop it (our requests use ignore_eos)."""
    ids = list(prompt)
    step_logits = []
    for _ in range(max_new):
        logits = model(torch.tensor([ids])).logits[0, -1].float()
        step_logits.append(logits)
        ids.append(int(logits.argmax()))
    return ids[len(prompt):], step_logits


def assert_greedy_match(ours: list[int], ref: list[int], ref_logits: list[torch.Tensor]) -> None:
    """Equal up to the first step where the reference itself is a near-tie; after a legitimate flip the
    continuations diverge, so comparison stops there."""
    assert len(ours) == len(ref), f"length {len(ours)} != {len(ref)}"
    for step, (a, b) in enumerate(zip(ours, ref)):
        if a == b:
            continue
        top2 = torch.topk(ref_logits[step], 2).values
        gap = float(top2[0] - top2[1])
        assert gap < TIE_GAP, f"token {step}: ours {a} != reference {b} with a top-2 logit gap of {gap:.3g}"
        return
