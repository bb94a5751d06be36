"""Token sampling for one step: greedy, temperature, top-k, top-p, with per-request seeds.

A seeded request draws only from its own generator, so its text does not depend on which other
requests happen to share its batch.

No setting the API accepts can fail a draw, and so the batch: a temperature too small to divide by
samples greedily (`SamplingParams.greedy`), top-p always keeps the most likely token (a top_p of 1e-300
is 0 in float32, which would drop every token), and a row whose distribution is still not finite falls
back to its argmax.
"""

from __future__ import annotations

import torch

from splitserve.core.request import SamplingParams


class Sampler:
    def __init__(self) -> None:
        self._generators: dict[str, torch.Generator] = {}
        self._shared = torch.Generator()
        self._shared.seed()

    def forget(self, request_id: str) -> None:
        self._generators.pop(request_id, None)

    def sample(self, logits: torch.Tensor, request_ids: list[str], params: list[SamplingParams]) -> list[int]:
        """One token per row of `logits` ([N, vocab], float32)."""
        tokens = logits.argmax(dim=-1).tolist()
        for row, (rid, p) in enumerate(zip(request_ids, params)):
            if not p.greedy:
                tokens[row] = self._draw(logits[row], p, self._generator(rid, p))
        return tokens

    def _generator(self, request_id: str, p: SamplingParams) -> torch.Generator:
        if p.seed is None:
            return self._shared
        gen = self._generators.get(request_id)
        if gen is None:
            gen = self._generators[request_id] = torch.Generator().manual_seed(p.seed)
        return gen

    @staticmethod
    def _draw(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator) -> int:
        logits = logits.float() / p.temperature
        if 0 < p.top_k < logits.numel():
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            probs = sorted_logits.softmax(-1)
            # Keep the smallest set whose mass reaches top_p: drop a token if the mass before it already does.
            drop = probs.cumsum(-1) - probs >= p.top_p
            drop[0] = False
            logits = logits.scatter(0, order[drop], float("-inf"))
        probs = logits.softmax(-1)
        if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0.0:
            return int(logits.argmax().item())
        return int(torch.multinomial(probs, 1, generator=gen).item())
