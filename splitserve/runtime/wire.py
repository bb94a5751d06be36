"""The wire between the frontend and the workers: every control message type (JSON over HTTP; the KV bytes
travel elsewhere; a worker's state report is the core `router_feed.WorkerReport`) and every HTTP call the
frontend makes to a worker (`WorkerClient`)."""

from __future__ import annotations

import asyncio
import hashlib
import time
from typing import AsyncIterator

import httpx
import msgspec

from splitserve.core.request import SamplingParams
from splitserve.runtime.engine_client import TokenLogprobs, TokenOutput


class Ticket(msgspec.Struct, frozen=True):
    """Where a prefill worker sends a request's KV: the decode worker's endpoint and reserved blocks."""

    ticket_id: str
    endpoint: str
    block_ids: list[int]  # destination blocks still to fill, in prompt order
    first_block: int  # index of the first of them in the prompt's blocks (earlier ones are cached there)
    deadline_s: float  # seconds from issue until the decode worker gives the reservation up
    # The prompt the blocks were reserved for (`prompt_digest`): a prefill worker sends KV only for that exact
    # token chain, so the decode worker's prefix cache can never hold one prompt's KV under another's hashes.
    prompt_digest: str


def prompt_digest(prompt: list[int]) -> str:
    return hashlib.blake2b(msgspec.json.encode(prompt), digest_size=16).hexdigest()


class GenerateRequest(msgspec.Struct):
    request_id: str
    prompt: list[int]
    params: SamplingParams  # the core's own settings: msgspec carries the dataclass as it is
    output_token_ids: list[int] = []  # tokens already produced elsewhere (recompute after a failed transfer)


class DecodeRequest(msgspec.Struct):
    request_id: str
    prompt: list[int]
    params: SamplingParams
    deadline_s: float


class PrefillRequest(msgspec.Struct):
    request_id: str
    prompt: list[int]
    params: SamplingParams
    ticket: Ticket


class PrefillResult(msgspec.Struct):
    first_token: int
    num_cached_tokens: int
    queue_s: float
    prefill_s: float
    logprobs: TokenLogprobs | None = None  # the first token's, when the request asked for logprobs


class StreamEvent(msgspec.Struct, omit_defaults=True):
    """One line of a worker's NDJSON stream: an increment of the request's output, exactly as the engine made
    it (`out`), and on the decode role's stream the answer to a reservation (its `ticket`, sent with the
    output that says how much of the prompt is cached there, or `no_room`) and the KV wait."""

    out: TokenOutput | None = None
    ticket: Ticket | None = None  # decode role: the first event, once blocks are reserved
    no_room: bool = False  # decode role: no blocks now; nothing was reserved
    kv_wait_s: float | None = None  # decode role, with the first tokens: reservation to complete KV


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
    # Prompt tokens it computes in a step that also decodes (a decode worker's cap; None: none): the router's
    # cost of prefilling locally there.
    prefill_tokens_while_decoding: int | None = None


encoder = msgspec.json.Encoder()


class WorkerError(Exception):
    """The worker could not be reached, or answered with an error."""


class WorkerClient:
    def __init__(self, url: str, http: httpx.AsyncClient, info: WorkerInfo) -> None:
        self.url = url.rstrip("/")
        self.http = http
        self.info = info
        self.in_flight = 0  # requests this frontend has on the worker now
        self.prompt_tokens_in_flight = 0  # prompt tokens of this frontend's prefill calls it has not answered
        self.draining = False  # takes no new requests
        # Set when the frontend drops the worker (its heartbeat went silent or it left): every call still
        # waiting on it ends then. Calls have no read timeout of their own: a slow stream is not a failure.
        self.lost = asyncio.Event()
        # When it last answered anything (a stream line, a reply): a worker that talks is alive, though its
        # /health may be slow under a burst (its event loop busy with hundreds of streams).
        self.last_heard = 0.0
        self.refused = False  # the last health check found nothing listening

    @classmethod
    async def connect(cls, url: str, http: httpx.AsyncClient) -> "WorkerClient":
        try:
            r = await http.get(url.rstrip("/") + "/internal/info", timeout=5.0)
        except httpx.HTTPError as exc:
            raise WorkerError(f"worker at {url} unreachable: {exc}") from exc
        if r.status_code == 401:
            raise WorkerError(f"worker at {url} refused this frontend's signature: it holds another deployment secret")
        if r.status_code != 200:
            raise WorkerError(f"worker at {url} answered {r.status_code}: {r.text[:300]}")
        return cls(url, http, msgspec.json.decode(r.content, type=WorkerInfo))

    async def prefill(self, body: msgspec.Struct, timeout: float) -> PrefillResult:
        try:
            r = await self.http.post(self.url + "/internal/prefill", content=encoder.encode(body), timeout=timeout)
        except httpx.HTTPError as exc:
            raise WorkerError(f"prefill worker {self.url}: {type(exc).__name__}: {exc}") from exc
        self.last_heard = time.monotonic()
        if r.status_code != 200:
            raise WorkerError(f"prefill worker {self.url} answered {r.status_code}: {r.text[:300]}")
        return msgspec.json.decode(r.content, type=PrefillResult)

    async def stream(self, path: str, body: msgspec.Struct) -> AsyncIterator[StreamEvent]:
        """NDJSON events of a worker stream. Closing the iterator closes the connection, which the worker
        takes as an abort. No read timeout: a live worker's stream may be slow (a long queue); a dead or
        partitioned one is found by the heartbeat, which sets `lost`."""
        timeout = httpx.Timeout(5.0, read=None)
        try:
            async with self.http.stream("POST", self.url + path, content=encoder.encode(body), timeout=timeout) as r:
                if r.status_code != 200:
                    await r.aread()
                    raise WorkerError(f"worker {self.url}{path} answered {r.status_code}: {r.text[:300]}")
                async for line in r.aiter_lines():
                    self.last_heard = time.monotonic()
                    if line:
                        yield msgspec.json.decode(line, type=StreamEvent)
        except httpx.HTTPError as exc:
            raise WorkerError(f"worker {self.url} lost: {type(exc).__name__}: {exc}") from exc

    async def connect_to(self, endpoint: str) -> None:
        """Prefill worker: open and handshake the KV connection to a decode worker's endpoint."""
        try:
            r = await self.http.post(self.url + "/internal/connect", json={"endpoint": endpoint}, timeout=10.0)
        except httpx.HTTPError as exc:
            raise WorkerError(f"prefill worker {self.url}: {exc}") from exc
        if r.status_code != 200:
            raise WorkerError(r.json().get("error", r.text))

    async def abort(self, request_id: str) -> None:
        try:
            await self.http.post(self.url + "/internal/abort", json={"request_id": request_id}, timeout=2.0)
        except httpx.HTTPError:
            pass  # the worker is gone: nothing of the request survives there

    async def healthy(self, timeout_s: float = 2.0) -> bool:
        """200 from its /health. `refused` says whether nothing listens at its address (it is gone for
        sure), as against a slow or unhealthy answer."""
        self.refused = False
        try:
            return (await self.http.get(self.url + "/health", timeout=timeout_s)).status_code == 200
        except httpx.ConnectError:
            self.refused = True
            return False
        except httpx.HTTPError:
            return False
