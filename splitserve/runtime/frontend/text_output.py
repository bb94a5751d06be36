"""One request's token stream as text deltas, with stop strings applied.

Workers speak tokens; stop strings are text, so they are matched here. Text that might be the start of a
stop string is held back until the next tokens settle it: a client never receives text that a later
match would have to take back.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Protocol

from splitserve.runtime.engine_client import TokenOutput


class Detokenizer(Protocol):
    def add(self, token_ids: list[int]) -> str:
        """The text the new tokens complete (never half a character)."""
        ...


@dataclass(frozen=True)
class TextDelta:
    text: str
    # Set on the request's last delta: the engine's reason, or "stop" for a matched stop string.
    finish_reason: str | None = None


class TextOutput:
    def __init__(self, detokenizer: Detokenizer, stop: Sequence[str] = (), stop_token_ids: Collection[int] = ()) -> None:
        """stop_token_ids: tokens that end the request (EOS, the client's stop ids); like stop strings, their
        text is not part of the answer."""
        self._detokenizer = detokenizer
        self._stop = tuple(stop)
        self._stop_token_ids = stop_token_ids
        self._pending = ""  # decoded but not yet released
        self.token_ids: list[int] = []  # tokens that count as output: up to the one that completed a stop string
        self.finish_reason: str | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add(self, out: TokenOutput) -> TextDelta:
        """The text that `out` makes safe to send. Once finished, further outputs add nothing: when a stop
        string matched first, the caller must abort the engine request."""
        if self.finished:
            return TextDelta("")
        self.token_ids += out.new_token_ids
        ids = out.new_token_ids
        if out.finish_reason == "stop" and ids and ids[-1] in self._stop_token_ids:
            ids = ids[:-1]
        self._pending += self._detokenizer.add(ids)

        match = self._earliest_stop()
        if match is not None:
            return self._finish(self._pending[:match], "stop")
        if out.finished:
            return self._finish(self._pending, out.finish_reason or "stop")
        keep = self._possible_stop_start()
        text, self._pending = self._pending[: len(self._pending) - keep], self._pending[len(self._pending) - keep :]
        return TextDelta(text)

    def _finish(self, text: str, reason: str) -> TextDelta:
        self._pending = ""
        self.finish_reason = reason
        return TextDelta(text, reason)

    def _earliest_stop(self) -> int | None:
        # Released text holds no stop-string start, so a match can only begin within the pending text.
        found = [i for s in self._stop if (i := self._pending.find(s)) >= 0]
        return min(found, default=None)

    def _possible_stop_start(self) -> int:
        """Length of the longest end of the pending text that some stop string begins with."""
        for size in range(min(len(self._pending), max(map(len, self._stop), default=1) - 1), 0, -1):
            tail = self._pending[-size:]
            if any(s.startswith(tail) for s in self._stop):
                return size
        return 0
