"""A request's state as the scheduler sees it: tokens, progress, blocks. No text, no clock."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    WAITING_FOR_KV = "waiting_for_kv"  # decode side: blocks reserved, KV arriving from a prefill worker
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in FINISHED


# A module tuple, not the members looked up on the class each call: this property runs for every
# sequence of every step, and the class lookups were 8 % of a planner simulation's CPU time. (A tuple, not a
# set: `in` finds a member by identity, where a set would call the enum's Python-level __hash__.)
FINISHED = (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED)


# Below this temperature a request samples greedily (the rule vLLM states too): dividing logits by a
# temperature such as 1e-45 overflows to inf, and the softmax of infs is NaN.
MIN_TEMPERATURE = 1e-5


GRAMMAR_KINDS = ("json_schema", "json_object", "regex", "ebnf")


@dataclass(frozen=True)
class GrammarSpec:
    """A constraint on the output's text (structured output). Plain data: it travels with the request to
    whichever worker samples its tokens, which compiles it into a token mask."""

    kind: str  # one of GRAMMAR_KINDS
    spec: str = ""  # the JSON schema as JSON text, the regex or the EBNF grammar; empty for json_object


@dataclass(frozen=True)
class SamplingParams:
    """Per-request generation settings. Stop *strings* are text, so the frontend handles them."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k cut
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    grammar: GrammarSpec | None = None
    # None: no logprobs; k >= 0: each sampled token's log-probability and the k most likely alternatives.
    logprobs: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE or self.top_k == 1


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    eos_token_ids: frozenset[int] = frozenset()
    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    # Tokens whose KV is in this request's blocks (cached prefix + computed so far).
    num_computed_tokens: int = 0
    # Prompt tokens served from the prefix cache at first admission (reported as cached_tokens).
    num_cached_tokens: int = -1
    block_ids: list[int] = field(default_factory=list)
    # Chained hashes of this request's full blocks, extended as tokens arrive.
    block_hashes: list[int] = field(default_factory=list)
    first_scheduled_time: float | None = None
    num_preemptions: int = 0
    # Prefill side: keep the blocks after finishing, until their KV has been sent (release_held).
    hold_kv: bool = False

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def finished(self) -> bool:
        return self.status.finished

    def token_slice(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output, without building the whole list (decode asks for one)."""
        n = len(self.prompt_token_ids)
        if start >= n:
            return self.output_token_ids[start - n : end - n]
        if end <= n:
            return self.prompt_token_ids[start:end]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - n]

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)

    def stop_reason(self, max_model_len: int) -> RequestStatus | None:
        """Why this request must stop after its latest token, or None to keep going."""
        return stop_reason(self.output_token_ids, self.params, self.eos_token_ids, self.num_tokens, max_model_len)


def stop_reason(
    output_token_ids: list[int], params: SamplingParams, eos_token_ids: frozenset[int], num_tokens: int, max_model_len: int
) -> RequestStatus | None:
    """Shared by the scheduler and the frontend (which sees the prefill worker's first token first)."""
    last = output_token_ids[-1]
    if not params.ignore_eos and last in eos_token_ids:
        return RequestStatus.FINISHED_STOPPED
    if last in params.stop_token_ids:
        return RequestStatus.FINISHED_STOPPED
    if len(output_token_ids) >= params.max_tokens or num_tokens >= max_model_len:
        return RequestStatus.FINISHED_LENGTH
    return None
