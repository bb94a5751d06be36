"""Token sampling for one step: greedy, temperature, top-k, top-p, with per-request seeds.

A seeded request draws only from its own generator, so its text does not depend on which other
requests happen to share its batch.

No setting the API accepts can fail a draw, and so the batch: a temperature too small to divide by
samples greedily (`SamplingParams.greedy`), top-p always keeps the most likely token (a top_p of 1e-300
is 0 in float32, which would drop every token), and a row whose distribution is still not finite falls
back to its argmax.

Structured output masks the rows of constrained requests (all of a step's at once) before any of this, on a
copy: `logits` stays the model's, which is what logprobs report.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from splitserve.core.request import SamplingParams
from splitserve.runtime.engine_client import TokenLogprobs
from splitserve.runtime.worker.grammar import GrammarMasks


class Sampler:
    def __init__(self, grammars: GrammarMasks | None = None) -> None:
        self._generators: dict[str, torch.Generator] = {}
        self._shared = torch.Generator()
        self._shared.seed()
        self._grammars = grammars

    def forget(self, request_id: str) -> None:
        self._generators.pop(request_id, None)
        if self._grammars is not None:
            self._grammars.forget(request_id)

    def sample(
        self, logits: torch.Tensor, request_ids: list[str], params: list[SamplingParams],
        outputs: Sequence[Sequence[int]] = (),
    ) -> list[int]:
        """One token per row of `logits` ([N, vocab], float32). `outputs[i]`: the tokens row i's request has
        produced so far, wherever they were produced (its grammar, if it has one, resumes after them)."""
        tokens = logits.argmax(dim=-1).tolist()
        masked = self._masked(logits, request_ids, params, outputs)
        for row, (rid, p) in enumerate(zip(request_ids, params)):
            row_logits = masked.get(row)
            if row_logits is None:
                row_logits = logits[row]
            elif p.greedy:
                tokens[row] = int(row_logits.argmax().item())
            if not p.greedy:
                tokens[row] = self._draw(row_logits, p, self._generator(rid, p))
        return tokens

    @staticmethod
    def logprobs(logits: torch.Tensor, tokens: list[int], params: list[SamplingParams]) -> list[TokenLogprobs | None]:
        """Each sampled token's log-probability under the model and its request's top-k, for the rows whose
        request asked for logprobs."""
        rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        result: list[TokenLogprobs | None] = [None] * len(tokens)
        if not rows:
            return result
        lp = torch.log_softmax(logits[rows].float(), dim=-1)
        chosen = lp[torch.arange(len(rows)), torch.tensor([tokens[i] for i in rows])].tolist()
        k = max(params[i].logprobs or 0 for i in rows)
        top_v, top_i = lp.topk(min(k, lp.shape[-1]), dim=-1) if k else (lp[:, :0], lp[:, :0].long())
        top_v, top_i = top_v.tolist(), top_i.tolist()
        for j, row in enumerate(rows):
            n = params[row].logprobs or 0
            result[row] = TokenLogprobs(chosen[j], list(zip(top_i[j][:n], top_v[j][:n])))
        return result

    def _masked(
        self, logits: torch.Tensor, request_ids: list[str], params: list[SamplingParams], outputs: Sequence[Sequence[int]]
    ) -> dict[int, torch.Tensor]:
        """The grammar-masked logits of the constrained rows, by row (one batched mask for the step)."""
        rows = [i for i, p in enumerate(params) if p.grammar is not None]
        if not rows:
            return {}
        if self._grammars is None:
            raise ValueError("this engine has no grammar support, but a request asks for structured output")
        sub = logits[rows].float()  # a copy: the model's logits stay unmasked for logprobs
        self._grammars.apply(
            sub, [request_ids[i] for i in rows], [params[i].grammar for i in rows], [outputs[i] for i in rows]
        )
        return dict(zip(rows, sub))

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
