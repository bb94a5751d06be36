"""Control messages between the frontend and the workers (JSON over HTTP; the KV bytes travel elsewhere)."""

from __future__ import annotations

import msgspec

from splitserve.core.blocks import KVEvent
from splitserve.core.request import SamplingParams
from splitserve.runtime.engine import StepCounters
from splitserve.runtime.engine_client import TokenOutput


class Params(msgspec.Struct, frozen=True):
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    @classmethod
    def of(cls, p: SamplingParams) -> "Params":
        return cls(p.max_tokens, p.temperature, p.top_p, p.top_k, p.seed, tuple(p.stop_token_ids), p.ignore_eos)

    def sampling(self) -> SamplingParams:
        return SamplingParams(
            max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
            seed=self.seed, stop_token_ids=tuple(self.stop_token_ids), ignore_eos=self.ignore_eos,
        )


class Ticket(msgspec.Struct, frozen=True):
    """Where a prefill worker sends a request's KV: the decode worker's endpoint and reserved blocks."""

    ticket_id: str
    endpoint: str
    block_ids: list[int]  # destination blocks still to fill, in prompt order
    first_block: int  # index of the first of them in the prompt's blocks (earlier ones are cached there)
    deadline_s: float  # seconds from issue until the decode worker gives the reservation up


class GenerateRequest(msgspec.Struct):
    request_id: str
    prompt: list[int]
    params: Params
    output_token_ids: list[int] = []  # tokens already produced elsewhere (recompute after a failed transfer)


class DecodeRequest(msgspec.Struct):
    request_id: str
    prompt: list[int]
    params: Params
    deadline_s: float


class PrefillRequest(msgspec.Struct):
    request_id: str
    prompt: list[int]
    params: Params
    ticket: Ticket


class PrefillResult(msgspec.Struct):
    first_token: int
    num_cached_tokens: int
    queue_s: float
    prefill_s: float


class StreamEvent(msgspec.Struct, omit_defaults=True):
    """One line of a worker's NDJSON token stream."""

    tokens: list[int] = []
    finished: bool = False
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    queue_time: float | None = None
    error: str | None = None
    ticket: Ticket | None = None  # decode role: the first event, once blocks are reserved
    no_room: bool = False  # decode role: no blocks now; nothing was reserved
    kv_wait_s: float | None = None  # decode role: reservation to complete KV

    @classmethod
    def of(cls, out: TokenOutput, kv_wait_s: float | None = None) -> "StreamEvent":
        return cls(
            tokens=out.new_token_ids, finished=out.finished, finish_reason=out.finish_reason,
            num_prompt_tokens=out.num_prompt_tokens, num_cached_tokens=out.num_cached_tokens,
            queue_time=out.queue_time, error=out.error, kv_wait_s=kv_wait_s,
        )

    def output(self, request_id: str) -> TokenOutput:
        return TokenOutput(
            request_id, list(self.tokens), self.finished, self.finish_reason, self.num_prompt_tokens,
            self.num_cached_tokens, self.queue_time, self.error,
        )


class WorkerInfo(msgspec.Struct):
    role: str
    model_name: str
    fingerprint: str
    max_model_len: int
    block_size: int
    num_blocks: int
    transfer_endpoint: str | None
    generation: int  # grows with each restart (nanosecond start time): the router's index orders them
    pid: int
    kv_layout: str  # dtype, block size and per-block shape: what KV peers must agree on
    kv_bytes_per_token: int
    num_layers: int


class WorkerState(msgspec.Struct):
    """What the router polls from a worker: load, KV events since a sequence number, measurements."""

    generation: int
    last_seq: int  # the worker's latest KV event
    events: list[KVEvent] | None  # None: some were dropped, ask again with snapshot=1
    snapshot: list[int] | None  # cached block hashes as of last_seq, when asked for
    free_blocks: int
    total_blocks: int
    running: int  # requests holding blocks there: running, admitted after transfer, or reserved
    queued_prefill_tokens: int
    counters: StepCounters
    link_bytes: float  # prefill role: bytes and wire seconds of measured layer sends
    link_s: float


encoder = msgspec.json.Encoder()
