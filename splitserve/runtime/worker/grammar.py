"""Structured output: a request's grammar (a JSON schema, any JSON, a regex, an EBNF grammar) as a mask on
its next-token logits, on xgrammar.

xgrammar rather than outlines-core: it compiles all four kinds (free JSON nests without bound, so it is not
a regular language, and a regex engine like outlines-core cannot express `json_object`), compiles a schema in milliseconds, fills a
batch's masks as bitmasks, and is the engine vLLM and SGLang use by default.

A request's matcher is kept in step with its output tokens, not with what this worker sampled: before each
mask it is advanced over the request's tokens it has not seen yet. So a request whose first tokens were
produced elsewhere — the decode worker after the prefill worker's first token, a recompute after a failed
transfer — resumes from exactly the grammar state those tokens reached, and a preempted request keeps its own.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from splitserve.core.request import GrammarSpec
from splitserve.model.tokenizer import Tokenizer

if TYPE_CHECKING:
    import xgrammar

log = logging.getLogger(__name__)

# Compiled grammars are cached by their spec (xgrammar's own cache); bounded so that many distinct schemas
# cannot grow a worker's memory without limit.
COMPILE_CACHE_BYTES = 256 << 20
JSON_OBJECT_SCHEMA = '{"type": "object"}'


@dataclass
class _Matcher:
    matcher: "xgrammar.GrammarMatcher"
    seen: int = 0  # output tokens advanced over
    broken: bool = False  # a token the grammar rejects: the request is no longer masked (logged once)


class GrammarMasks:
    """Per-worker: compiles grammars for one tokenizer and keeps each constrained request's matcher."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        """vocab_size: the model's logits width (it may exceed the tokenizer's vocabulary: padding rows)."""
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._compiler: "xgrammar.GrammarCompiler | None" = None  # built on first use: workers start without it
        self._matchers: dict[str, _Matcher] = {}

    def apply(self, logits: torch.Tensor, rid: Sequence[str], specs: Sequence[GrammarSpec], outputs: Sequence[Sequence[int]]) -> None:
        """Mask rows of `logits` ([len(rid), vocab], modified in place): row i may only take the tokens that
        request rid[i]'s grammar allows after its output tokens outputs[i]."""
        import xgrammar as xgr

        bitmask = xgr.allocate_token_bitmask(len(rid), self._vocab_size)
        masked = []
        for i, (r, spec, out) in enumerate(zip(rid, specs, outputs)):
            m = self._matcher(r, spec)
            self._catch_up(r, m, out)
            if not m.broken and not m.matcher.is_terminated():
                m.matcher.fill_next_token_bitmask(bitmask, i)
                masked.append(i)
        if masked:
            xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=self._vocab_size, indices=masked)

    def forget(self, request_id: str) -> None:
        self._matchers.pop(request_id, None)

    def _matcher(self, request_id: str, spec: GrammarSpec) -> _Matcher:
        m = self._matchers.get(request_id)
        if m is None:
            import xgrammar as xgr

            m = self._matchers[request_id] = _Matcher(xgr.GrammarMatcher(self._compile(spec)))
        return m

    @staticmethod
    def _catch_up(request_id: str, m: _Matcher, output: Sequence[int]) -> None:
        while m.seen < len(output) and not m.broken:
            token = output[m.seen]
            m.seen += 1
            if not m.matcher.accept_token(token):
                m.broken = True
                log.error("request %s: token %d breaks its grammar; its output is no longer constrained", request_id, token)

    def _compile(self, spec: GrammarSpec) -> "xgrammar.CompiledGrammar":
        compiler = self._compiler or self._make_compiler()
        if spec.kind == "json_schema":
            return compiler.compile_json_schema(spec.spec, any_whitespace=False)
        if spec.kind == "json_object":
            # OpenAI's json_object is an object, not any JSON value (xgrammar's builtin JSON grammar allows all).
            return compiler.compile_json_schema(JSON_OBJECT_SCHEMA, any_whitespace=False)
        if spec.kind == "regex":
            return compiler.compile_regex(spec.spec)
        if spec.kind == "ebnf":
            return compiler.compile_grammar(spec.spec)
        raise ValueError(f"unknown grammar kind {spec.kind!r}")

    def _make_compiler(self) -> "xgrammar.GrammarCompiler":
        import xgrammar as xgr

        tok = self._tokenizer
        vocab = [tok.backend.id_to_token(i) or "" for i in range(tok.vocab_size)]
        info = xgr.TokenizerInfo(
            vocab, _vocab_type(tok), vocab_size=self._vocab_size, stop_token_ids=sorted(tok.eos_token_ids)
        )
        # Two threads: workers share few cores with their engine thread.
        self._compiler = xgr.GrammarCompiler(info, max_threads=2, cache_limit_bytes=COMPILE_CACHE_BYTES)
        return self._compiler


def _vocab_type(tok: Tokenizer) -> "xgrammar.VocabType":
    """How vocabulary entries spell bytes: GPT-2 byte-level ('Ġ' for a space), SentencePiece byte fallback
    ('<0x0A>'), or raw text — read from the tokenizer's decoder, as the `tokenizers` library defines it."""
    import xgrammar as xgr

    decoder = json.loads(tok.backend.to_str()).get("decoder") or {}
    kinds = {d.get("type") for d in decoder.get("decoders", [decoder])}
    if "ByteLevel" in kinds:
        return xgr.VocabType.BYTE_LEVEL
    if "ByteFallback" in kinds:
        return xgr.VocabType.BYTE_FALLBACK
    return xgr.VocabType.RAW
