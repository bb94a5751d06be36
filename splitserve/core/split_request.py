"""The life of one split request, as a pure state machine: the frontend's pool client drives it with what
its workers say, the simulator with virtual events, and both carry out the very same actions.

h11's rule holds here: everything that affects the transitions lives in this one file. No clock, no I/O:
`handle(event, now)` takes what happened and returns what to do; `now` only stamps the phase record.

    ROUTING ──Routed──► RESERVING ──Reserved──► PREFILLING ──FirstToken──► DECODING ──Tokens(finished)──► DONE
       ▲                    │                       │    └─FirstToken(stops)─────────────────────────────► DONE
       └──Refused(no room)──┘                       │                        │
       (or a failed reserve call)     PeerFailed, TransferFailed, Deadline   PeerFailed, TransferFailed
                                                    ▼                        ▼
                                      RECOMPUTE (on_transfer_failure="recompute") or FAILED ("fail")
    Abort from any live state: ABORTED.

Reserve on the decode worker D first (never prefill what cannot be decoded); then the prefill worker P
computes the prompt, streams its KV into D's blocks and returns the first token, which goes to the client at
once; D streams the rest. D may speak before P's reply reaches the caller (the KV and the first token land
there first): its tokens wait here until the first token is out. Whatever fails ends the split path: every
worker still holding something for the request is told to release it, and the request is recomputed on a
decode worker after the tokens the client already has, or failed with the cause. Which workers are lost or
suspect is reported as an action: membership is the caller's business.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Hashable, Literal, Union

from splitserve.core.request import SamplingParams, stop_reason

Worker = Hashable  # whatever names a worker to the caller: a URL, a simulated worker
Side = Literal["prefill", "decode"]


class SplitRequestError(Exception):
    """An event the request's state does not allow: a bug in the caller, never a worker's fault."""


class State(enum.Enum):
    ROUTING = "routing"  # waiting to be placed (again) on a decode and a prefill worker
    RESERVING = "reserving"  # asked D for the prompt's blocks
    PREFILLING = "prefilling"  # blocks reserved on D; P computes the prompt and sends its KV
    DECODING = "decoding"  # the client has the first token; D streams the rest
    DONE = "done"
    RECOMPUTE = "recompute"  # handed to a decode worker that computes the request whole
    FAILED = "failed"
    ABORTED = "aborted"

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL


_TERMINAL = frozenset({State.DONE, State.RECOMPUTE, State.FAILED, State.ABORTED})
_D_ENDED_IT = ("stop", "length")  # D's finish reasons that end the request well


# --- events: what happened ---


@dataclass(frozen=True)
class Routed:
    decode: Worker
    prefill: Worker


@dataclass(frozen=True)
class Reserved:
    decode_cached_tokens: int  # prompt tokens D already holds: their KV is not sent


@dataclass(frozen=True)
class Refused:
    error: str | None = None  # None: no room now (route again, or wait); else D rejects the request itself


@dataclass(frozen=True)
class FirstToken:
    token: int
    cached_tokens: int  # prompt tokens P found in its prefix cache
    queue_s: float
    prefill_s: float


@dataclass(frozen=True)
class KvComplete:
    kv_wait_s: float | None = None  # D's own measure of reservation to complete KV, if it gives one


@dataclass(frozen=True)
class Tokens:
    """Tokens from D; the last output also says why D finished the request."""

    tokens: tuple[int, ...]
    finish_reason: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class PeerFailed:
    """A call to a worker failed: unreachable, its stream broken, or an error answer."""

    side: Side
    cause: str


@dataclass(frozen=True)
class TransferFailed:
    cause: str  # as D's receiver saw it: the peer closed, stalled, or the ticket's deadline passed


@dataclass(frozen=True)
class Deadline:
    """The first token did not come back within the ticket's deadline."""


@dataclass(frozen=True)
class Abort:
    """The client left, or the caller gave the request up."""


Event = Union[Routed, Reserved, Refused, FirstToken, KvComplete, Tokens, PeerFailed, TransferFailed, Deadline, Abort]


# --- actions: what the caller does ---
# Values like the events, but slotted rather than frozen: one is made for every token, and a frozen
# dataclass costs several times as much to make (the simulator feels it).


@dataclass(slots=True)
class Reserve:
    decode: Worker


@dataclass(slots=True)
class Retry:
    """No room on D now: place the request again after a wait (the runtime), or keep it first in D's queue
    (the simulator, where D answers between its steps)."""


@dataclass(slots=True)
class SendPrompt:
    prefill: Worker
    decode: Worker


@dataclass(slots=True)
class Emit:
    tokens: tuple[int, ...]
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None


@dataclass(slots=True)
class Release:
    """Abort the request on this worker: it may still hold blocks or compute for it."""

    worker: Worker
    side: Side


@dataclass(slots=True)
class Suspect:
    """The worker failed a call: check its health, and remove it if it does not answer."""

    worker: Worker


@dataclass(slots=True)
class WorkerLost:
    """The worker broke a request's stream: take it out of the pools."""

    worker: Worker


@dataclass(slots=True)
class Recompute:
    """Compute the request whole on `decode` (None: D is gone, pick another decode worker), continuing after
    `produced`, the tokens the client already has."""

    decode: Worker | None
    produced: tuple[int, ...]


@dataclass(slots=True)
class Fail:
    reason: Literal["refused", "transfer_failed"]  # refused: D rejects the request itself (a client error)
    message: str


Action = Union[Reserve, Retry, SendPrompt, Emit, Release, Suspect, WorkerLost, Recompute, Fail]


class SplitRequest:
    """One request on the split path, from its placement on D and P to its end."""

    __slots__ = ("params", "eos_token_ids", "prompt_len", "max_model_len", "on_transfer_failure", "state",
                 "decode", "prefill", "decode_cached_tokens", "cached_tokens", "queue_s", "prefill_s", "kv_wait_s",
                 "reserved_at", "first_token_at", "kv_complete_at", "emitted", "causes", "_p_holds", "_d_holds",
                 "_early")

    def __init__(
        self, params: SamplingParams, eos_token_ids: frozenset[int], prompt_len: int, max_model_len: int,
        on_transfer_failure: str = "recompute",
    ) -> None:
        if on_transfer_failure not in ("recompute", "fail"):
            raise ValueError("on_transfer_failure must be 'recompute' or 'fail'")
        self.params, self.eos_token_ids = params, eos_token_ids
        self.prompt_len, self.max_model_len = prompt_len, max_model_len
        self.on_transfer_failure = on_transfer_failure
        self.state = State.ROUTING
        self.decode: Worker | None = None
        self.prefill: Worker | None = None
        # The phase record.
        self.decode_cached_tokens = 0
        self.cached_tokens = 0
        self.queue_s: float | None = None
        self.prefill_s: float | None = None
        self.kv_wait_s: float | None = None
        self.reserved_at: float | None = None
        self.first_token_at: float | None = None
        self.kv_complete_at: float | None = None
        self.emitted: list[int] = []  # what the client has: a recompute continues after these
        self.causes: list[str] = []  # failures and fallbacks, in order
        self._p_holds = False  # P has the prompt and has not answered
        self._d_holds = False  # D holds the reservation and has not ended the request
        self._early: list[Tokens] = []  # D's outputs that came before the first token

    @property
    def done(self) -> bool:
        return self.state in _TERMINAL

    def handle(self, event: Event, now: float) -> list[Action]:
        try:
            on = _HANDLERS[type(event)]
        except KeyError:
            raise SplitRequestError(f"not an event: {event!r}") from None
        return on(self, event, now)

    def _illegal(self, event: Event) -> SplitRequestError:
        return SplitRequestError(f"{type(event).__name__} in state {self.state.value}")

    # --- placement and reservation ---

    def _routed(self, ev: Routed, now: float) -> list[Action]:
        if self.state is not State.ROUTING:
            raise self._illegal(ev)
        self.decode, self.prefill = ev.decode, ev.prefill
        self.state = State.RESERVING
        return [Reserve(ev.decode)]

    def _reserved(self, ev: Reserved, now: float) -> list[Action]:
        if self.state is not State.RESERVING:
            raise self._illegal(ev)
        self.state = State.PREFILLING
        self.decode_cached_tokens = ev.decode_cached_tokens
        self.reserved_at = now
        self._d_holds = self._p_holds = True
        return [SendPrompt(self.prefill, self.decode)]

    def _refused(self, ev: Refused, now: float) -> list[Action]:
        if self.state is not State.RESERVING:
            raise self._illegal(ev)
        if ev.error is not None:
            self.state = State.FAILED
            return [Fail("refused", ev.error)]
        self.state = State.ROUTING
        return [Retry()]

    # --- the prefill worker's answer ---

    def _first_token(self, ev: FirstToken, now: float) -> list[Action]:
        if self.state is not State.PREFILLING:
            raise self._illegal(ev)
        self._p_holds = False
        self.cached_tokens, self.queue_s, self.prefill_s = ev.cached_tokens, ev.queue_s, ev.prefill_s
        self.first_token_at = now
        self.emitted.append(ev.token)
        stop = stop_reason([ev.token], self.params, self.eos_token_ids, self.prompt_len + 1, self.max_model_len)
        if stop is not None:
            self.state = State.DONE
            acts: list[Action] = [Emit((ev.token,), True, stop.value)]
            if self._d_holds:
                self._d_holds = False
                acts.append(Release(self.decode, "decode"))
            return acts
        self.state = State.DECODING
        acts = [Emit((ev.token,))]
        early, self._early = self._early, []
        for out in early:
            acts += self._decoded(out)
        return acts

    def _deadline(self, ev: Deadline, now: float) -> list[Action]:
        if self.state is not State.PREFILLING:
            raise self._illegal(ev)
        return [Suspect(self.prefill), *self._fallback("no first token within the transfer deadline", True)]

    # --- the decode worker's stream ---

    def _kv_complete(self, ev: KvComplete, now: float) -> list[Action]:
        if self.state not in (State.PREFILLING, State.DECODING) or self.kv_complete_at is not None:
            raise self._illegal(ev)
        self.kv_complete_at = now
        self.kv_wait_s = ev.kv_wait_s if ev.kv_wait_s is not None else now - self.reserved_at
        return []

    def _tokens(self, ev: Tokens, now: float) -> list[Action]:
        if self.state is State.DECODING:
            return self._decoded(ev)
        if self.state is not State.PREFILLING or not self._d_holds:
            raise self._illegal(ev)
        if ev.finish_reason is not None and ev.finish_reason not in _D_ENDED_IT:
            self._d_holds = False
            return self._fallback(ev.error or f"decode worker ended the request ({ev.finish_reason})", True)
        if ev.finish_reason is not None:
            self._d_holds = False  # the first token, still on its way here, ended the request
        self._early.append(ev)
        return []

    def _decoded(self, ev: Tokens) -> list[Action]:
        self.emitted += ev.tokens
        if ev.finish_reason is None:
            return [Emit(ev.tokens)]
        self._d_holds = False
        self.state = State.DONE
        return [Emit(ev.tokens, True, ev.finish_reason, ev.error)]

    def _transfer_failed(self, ev: TransferFailed, now: float) -> list[Action]:
        if self.state not in (State.PREFILLING, State.DECODING) or not self._d_holds or self.kv_complete_at is not None:
            raise self._illegal(ev)
        self._d_holds = False  # D gave the reservation up itself
        return self._fallback(ev.cause, True)

    # --- failures ---

    def _peer_failed(self, ev: PeerFailed, now: float) -> list[Action]:
        if self.state is State.RESERVING and ev.side == "decode":
            self.causes.append(ev.cause)
            self.state = State.ROUTING
            return [Suspect(self.decode), Retry()]
        if ev.side == "prefill" and self.state is State.PREFILLING:
            self._p_holds = False  # its call is over: it answered with an error, or cannot be reached
            return [Suspect(self.prefill), *self._fallback(ev.cause, True)]
        if ev.side == "decode" and self._d_holds and self.state in (State.PREFILLING, State.DECODING):
            self._d_holds = False  # its stream is gone, and with it whatever it held for the request
            return [WorkerLost(self.decode), *self._fallback(ev.cause, False)]
        raise self._illegal(ev)

    def _fallback(self, cause: str, decode_usable: bool) -> list[Action]:
        """The split path is over: release what is held, then recompute or fail."""
        self.causes.append(cause)
        acts: list[Action] = self._release()
        if self.on_transfer_failure == "fail":
            self.state = State.FAILED
            return acts + [Fail("transfer_failed", f"KV transfer failed: {cause}")]
        self.state = State.RECOMPUTE
        # The recompute is a request of its own on the decode worker; the reservation was released above.
        return acts + [Recompute(self.decode if decode_usable else None, tuple(self.emitted))]

    def _abort(self, ev: Abort, now: float) -> list[Action]:
        if self.done:
            raise self._illegal(ev)
        self.state = State.ABORTED
        return self._release()

    def _release(self) -> list[Action]:
        acts: list[Action] = []
        if self._p_holds:
            self._p_holds = False
            acts.append(Release(self.prefill, "prefill"))
        if self._d_holds:
            self._d_holds = False
            acts.append(Release(self.decode, "decode"))
        self._early = []
        return acts


_HANDLERS = {
    Routed: SplitRequest._routed,
    Reserved: SplitRequest._reserved,
    Refused: SplitRequest._refused,
    FirstToken: SplitRequest._first_token,
    KvComplete: SplitRequest._kv_complete,
    Tokens: SplitRequest._tokens,
    PeerFailed: SplitRequest._peer_failed,
    TransferFailed: SplitRequest._transfer_failed,
    Deadline: SplitRequest._deadline,
    Abort: SplitRequest._abort,
}
