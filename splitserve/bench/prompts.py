"""Turn RequestSpecs into token-id prompts of exactly the requested length.

A prompt is its prefix blocks (each block id always gives the same tokens) followed by tokens unique to the
request, so requests that share leading block ids share exactly those leading tokens and nothing more.
Prompts are built one at a time as they are sent: a production trace's prompts would not fit in memory at
once. Everything is keyed by a per-run salt: a second run against the same server must not find the first
run's prompts in the prefix cache.
"""

from __future__ import annotations

import numpy as np

from splitserve.bench.vocab import Vocab, VocabError
from splitserve.workload.requests import RequestSpec

_BLOCK, _UNIQUE = 1, 2  # stream tags, so a block id and a request index never draw the same tokens
_MASK64 = (1 << 64) - 1


class PromptBuilder:
    def __init__(self, vocab: Vocab, salt: int) -> None:
        allowed = np.setdiff1d(np.arange(vocab.size), np.fromiter(vocab.special_ids, dtype=np.int64))
        if len(allowed) < 2:
            raise VocabError(f"vocabulary of {vocab.source} has no ordinary tokens to build prompts from")
        self._allowed = allowed
        self._salt = salt & _MASK64

    def _draw(self, tag: int, key: int, n: int) -> np.ndarray:
        rng = np.random.default_rng([self._salt, tag, key & _MASK64, (key >> 64) & _MASK64])
        return self._allowed[rng.integers(0, len(self._allowed), n)]

    def block(self, block_id: int, block_tokens: int) -> np.ndarray:
        """The tokens of one prefix block: a function of (salt, id, size) only. Drawn anew each time rather
        than cached, because a production trace holds far more distinct blocks than memory should."""
        return self._draw(_BLOCK, block_id, block_tokens)

    def build(self, index: int, spec: RequestSpec) -> list[int]:
        """The prompt of the `index`-th request: exactly spec.input_len token ids."""
        parts = [self.block(b, spec.block_tokens) for b in spec.prefix_blocks]
        prefix = np.concatenate(parts)[: spec.input_len] if parts else np.empty(0, dtype=np.int64)
        unique = self._draw(_UNIQUE, index, spec.input_len - len(prefix))
        return np.concatenate([prefix, unique]).tolist()
