"""A scripted EngineClient: replies with chosen token ids and records what the frontend asked of it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from splitserve.core.request import SamplingParams
from splitserve.model.tokenizer import Tokenizer
from splitserve.runtime.engine_client import EngineOverloaded, EngineStats, EngineUnavailable, TokenOutput


class FakeEngine:
    model_name = "tiny-test"

    def __init__(self, tokenizer: Tokenizer, max_model_len: int = 256) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        # The script: one output per token of `reply`, the last finished with `finish_reason`.
        self.reply: list[int] = tokenizer.encode("Hello world", add_special_tokens=False)
        self.finish_reason = "length"
        self.num_cached_tokens = 0
        self.queue_time = 0.02
        self.first_token_delay = 0.0  # time "queued" before the first output
        self.token_delay = 0.0
        self.endless = False  # cycle through `reply` until aborted
        self.overloaded_retry_after: float | None = None
        self.unavailable = False
        self.raise_after: int | None = None  # raise RuntimeError after this many outputs
        self.error_output: str | None = None  # finish the first output with reason "error" and this message
        self.is_healthy = True
        # What happened.
        self.calls: list[tuple[str, list[int], SamplingParams]] = []
        self.aborts: list[str] = []
        self.closed: list[str] = []
        self.prefix_queries = 0
        self.prefix_hits = 0
        self._aborted: set[str] = set()

    def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> AsyncIterator[TokenOutput]:
        self.calls.append((request_id, list(prompt_token_ids), params))
        return self._stream(request_id, len(prompt_token_ids))

    async def _stream(self, request_id: str, num_prompt: int) -> AsyncIterator[TokenOutput]:
        try:
            if self.overloaded_retry_after is not None:
                raise EngineOverloaded(self.overloaded_retry_after)
            if self.unavailable:
                raise EngineUnavailable("engine is draining")
            self.prefix_queries += num_prompt
            self.prefix_hits += self.num_cached_tokens
            await asyncio.sleep(self.first_token_delay)
            if self.error_output is not None:
                yield TokenOutput(request_id, [], True, "error", num_prompt, error=self.error_output)
                return
            i = 0
            while True:
                if request_id in self._aborted:
                    yield TokenOutput(request_id, [], True, "abort", num_prompt, self.num_cached_tokens)
                    return
                if self.raise_after is not None and i >= self.raise_after:
                    raise RuntimeError("GPU fell off the bus")
                last = not self.endless and i == len(self.reply) - 1
                yield TokenOutput(
                    request_id,
                    [self.reply[i % len(self.reply)]],
                    finished=last,
                    finish_reason=self.finish_reason if last else None,
                    num_prompt_tokens=num_prompt,
                    num_cached_tokens=self.num_cached_tokens,
                    queue_time=self.queue_time if i == 0 else None,
                )
                if last:
                    return
                i += 1
                await asyncio.sleep(self.token_delay)
        finally:
            self.closed.append(request_id)

    async def abort(self, request_id: str) -> None:
        await asyncio.sleep(0.001)  # as a remote engine's would, the abort takes a round trip
        self.aborts.append(request_id)
        self._aborted.add(request_id)

    def stats(self) -> EngineStats:
        running = len(self.calls) - len(self.closed)
        return EngineStats(running, 3, 75, 100, self.prefix_queries, self.prefix_hits)

    def healthy(self) -> bool:
        return self.is_healthy
