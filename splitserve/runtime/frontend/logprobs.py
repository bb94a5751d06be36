"""Logprobs as OpenAI's two APIs spell them: the legacy completions lists and chat's per-token objects."""

from __future__ import annotations

from collections.abc import Callable

from pydantic import BaseModel

from splitserve.runtime.engine_client import TokenLogprobs

# A token id's text, for logprobs (the frontend's tokenizer).
TokenText = Callable[[int], str]


class CompletionLogprobs(BaseModel):
    """The legacy completions format: parallel lists, one entry per output token."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]

    @classmethod
    def of(cls, token_ids: list[int], lps: list[TokenLogprobs], token_text: TokenText) -> CompletionLogprobs:
        tokens = [token_text(t) for t in token_ids]
        offsets, at = [], 0
        for t in tokens:
            offsets.append(at)
            at += len(t)
        return cls(
            tokens=tokens,
            token_logprobs=[lp.logprob for lp in lps],
            top_logprobs=[{token_text(i): v for i, v in lp.top} for lp in lps],
            text_offset=offsets,
        )


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]

    @classmethod
    def of(cls, token_ids: list[int], lps: list[TokenLogprobs], token_text: TokenText) -> ChatLogprobs:
        def top(token_id: int, logprob: float) -> TopLogprob:
            text = token_text(token_id)
            return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode("utf-8", "replace")))

        content = []
        for t, lp in zip(token_ids, lps):
            head = top(t, lp.logprob)
            content.append(ChatTokenLogprob(**head.model_dump(), top_logprobs=[top(i, v) for i, v in lp.top]))
        return cls(content=content)
