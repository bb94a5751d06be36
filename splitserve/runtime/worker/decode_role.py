"""Decode role: reserve blocks for a prompt, hand out a transfer ticket, admit the request once its KV and
first token have landed, and stream the rest. A failed transfer ends the stream with "transfer_failed"
(the frontend then recomputes or fails the request), never with tokens decoded from incomplete KV."""

from __future__ import annotations

import logging
import time
from typing import AsyncIterator

from splitserve.runtime.worker.async_engine import AsyncEngine, NoRoom
from splitserve.runtime.worker.engine import Engine
from splitserve.runtime.engine_client import TokenOutput
from splitserve.runtime.wire import DecodeRequest, StreamEvent, Ticket, prompt_digest
from splitserve.runtime.worker.metrics import WorkerMetrics
from splitserve.transfer import KVReceiver

log = logging.getLogger(__name__)


class DecodeRole:
    def __init__(self, engine: AsyncEngine, receiver: KVReceiver, metrics: WorkerMetrics) -> None:
        self.engine = engine
        self.receiver = receiver
        self.metrics = metrics
        self._tickets: dict[str, Ticket] = {}
        self._reserved_at: dict[str, float] = {}
        self._kv_wait: dict[str, float] = {}  # reservation to complete KV, reported with the next event
        self._quarantined: dict[str, list[int]] = {}  # nixl: blocks a WRITE may still land in (engine thread)
        receiver.on_complete = self._kv_complete
        receiver.on_failed = self._kv_failed
        receiver.on_fenced = self._kv_fenced

    def before_abort(self, request_id: str) -> None:
        """Engine thread, before blocks are freed: no byte may land in them afterwards. Over NIXL the
        receiver cannot promise that at once (a WRITE is one-sided); then the blocks keep one more
        reference, so no other request gets them, until the sender has fenced the ticket."""
        ticket = self._tickets.pop(request_id, None)
        if ticket is not None and not self.receiver.cancel(request_id):
            self.engine.engine.pool.take(ticket.block_ids)
            self._quarantined[request_id] = list(ticket.block_ids)
        self._reserved_at.pop(request_id, None)
        self._kv_wait.pop(request_id, None)

    async def decode(self, req: DecodeRequest) -> AsyncIterator[StreamEvent]:
        rid = req.request_id
        params = req.params
        try:
            stream = self.engine.generate(rid, req.prompt, params, admit=lambda e: self._reserve(e, req))
            async for out in stream:
                ticket = self._tickets.get(rid)
                if not out.new_token_ids and not out.finished and ticket is not None:
                    yield StreamEvent(out, ticket=ticket)
                    continue
                yield StreamEvent(out, kv_wait_s=self._kv_wait.pop(rid, None))
        except NoRoom:
            yield StreamEvent(no_room=True)

    def _reserve(self, engine: Engine, req: DecodeRequest) -> TokenOutput:
        r = engine.reserve(req.request_id, req.prompt, req.params, time.monotonic())
        if r is None:
            raise NoRoom()
        first_block = r.num_cached_tokens // engine.config.block_size
        blocks = r.block_ids[first_block:]
        now = time.monotonic()
        self.receiver.expect(req.request_id, blocks, now + req.deadline_s)
        self._tickets[req.request_id] = Ticket(
            req.request_id, self.receiver.endpoint, blocks, first_block, req.deadline_s, prompt_digest(req.prompt)
        )
        self._reserved_at[req.request_id] = now
        return TokenOutput(req.request_id, [], num_prompt_tokens=len(req.prompt), num_cached_tokens=r.num_cached_tokens)

    # --- receiver threads ---

    def _kv_complete(self, ticket_id: str, first_token: int) -> None:
        def arrived() -> None:
            if self._tickets.pop(ticket_id, None) is None:
                return  # aborted meanwhile: its blocks are already gone
            reserved = self._reserved_at.pop(ticket_id, None)
            if reserved is not None:
                self._kv_wait[ticket_id] = time.monotonic() - reserved
                self.metrics.kv_wait.observe(self._kv_wait[ticket_id])
            self.engine.kv_arrived(ticket_id, first_token)

        self.engine.submit(arrived)

    def _kv_fenced(self, ticket_id: str) -> None:
        def release() -> None:
            blocks = self._quarantined.pop(ticket_id, None)
            if blocks is not None:
                self.engine.engine.pool.release(blocks)

        self.engine.submit(release)  # after any abort already queued: it is the one that quarantines

    def _kv_failed(self, ticket_id: str, cause: str) -> None:
        self.metrics.transfer_failures.labels(cause=cause.split(":")[0]).inc()
        log.warning("KV transfer for %s failed: %s", ticket_id, cause)
        self.engine.abort_from_thread(ticket_id, "transfer_failed", f"KV transfer failed: {cause}")

