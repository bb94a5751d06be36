"""Prefill role: compute a prompt, stream each layer's KV to the decode worker named by the ticket while
computing the next layer, return the first token at once, and keep the blocks until the transfer is over."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field, replace

from splitserve.core.scheduler import SchedulerOutput
from splitserve.model.kv_cache import PagedKVCache
from splitserve.runtime.worker.async_engine import AsyncEngine
from splitserve.runtime.wire import PrefillRequest, PrefillResult, prompt_digest
from splitserve.runtime.worker.metrics import WorkerMetrics
from splitserve.transfer import KVSender, TicketSend

log = logging.getLogger(__name__)


class PrefillFailed(Exception):
    pass


class WrongTicket(ValueError):
    """A ticket reserved for another prompt: its KV must not land in those blocks."""


@dataclass
class Outgoing:
    send: TicketSend
    first_block: int
    num_blocks: int
    deadline_s: float  # the decode side gives the reservation up after this: no point waiting longer
    started: float = field(default_factory=time.monotonic)
    compute_done: float | None = None  # when the last layer's KV was in the cache


class SendHooks:
    """Layer hooks for one step: queue each finished layer's KV of the prompts completing in this step."""

    def __init__(self, sends: list[tuple[Outgoing, list[int]]], kv_cache: PagedKVCache, num_layers: int, pipelined: bool):
        self.sends = sends
        self.kv_cache = kv_cache
        self.last_layer = num_layers - 1
        self.pipelined = pipelined

    def before_layer(self, layer: int) -> None:
        pass

    def after_layer(self, layer: int) -> None:
        if self.pipelined:
            self._send(layer)
        elif layer == self.last_layer:  # the baseline: everything after the last layer
            for lyr in range(self.last_layer + 1):
                self._send(lyr)
        if layer == self.last_layer:
            now = time.monotonic()
            for og, _ in self.sends:
                og.compute_done = now

    def _send(self, layer: int) -> None:
        for og, blocks in self.sends:
            if not og.send.stopped:  # failed meanwhile (the receiver gave up): the other requests still send
                og.send.send_layer(layer, self.kv_cache, blocks)


class PrefillRole:
    def __init__(self, engine: AsyncEngine, sender: KVSender, metrics: WorkerMetrics, pipelined: bool = True) -> None:
        self.engine = engine
        self.sender = sender
        self.metrics = metrics
        self.pipelined = pipelined
        # Read by the engine thread (hooks_for), written by the event loop: single dict operations only.
        self._outgoing: dict[str, Outgoing] = {}
        # The link's speed, measured on the last layer of each transfer (its wire time alone: it starts
        # when both the layer is computed and the previous layer is sent), for the router's cost model.
        self.link_bytes = 0.0
        self.link_s = 0.0

    def hooks_for(self, out: SchedulerOutput) -> SendHooks | None:
        sends = []
        for s in out.seqs:
            og = self._outgoing.get(s.request.request_id)
            if og is not None and s.sample:  # the step that completes the prompt has every block's KV
                sends.append((og, s.request.block_ids[og.first_block : og.first_block + og.num_blocks]))
        if not sends:
            return None
        return SendHooks(sends, self.engine.kv_cache, self.engine.num_layers, self.pipelined)

    def before_abort(self, request_id: str) -> None:
        og = self._outgoing.pop(request_id, None)
        if og is not None:
            og.send.abort("prefill aborted")

    async def prefill(self, req: PrefillRequest) -> PrefillResult:
        rid, ticket = req.request_id, req.ticket
        if prompt_digest(req.prompt) != ticket.prompt_digest:
            raise WrongTicket(f"ticket {ticket.ticket_id} was reserved for another prompt; no KV is sent")
        send = await asyncio.to_thread(self.sender.start_ticket, ticket.endpoint, ticket.ticket_id, len(ticket.block_ids))
        og = Outgoing(send, ticket.first_block, len(ticket.block_ids), ticket.deadline_s)
        self._outgoing[rid] = og
        params = replace(req.params, max_tokens=1)
        out = None
        try:  # a refusal at the door (a full queue) ends the ticket too
            stream = self.engine.generate(
                rid, req.prompt, params,
                admit=lambda e: e.add_request(rid, req.prompt, params, time.monotonic(), hold_kv=True),
            )
            async for out in stream:
                pass
        finally:
            # Failed, or cancelled (the frontend hung up: its client left): the stream's own cleanup aborts
            # the request on the engine thread, which drops it from the queue or stops it before its next
            # step; the ticket is aborted there too, between steps, never under a layer being sent.
            if out is None or out.error or not out.new_token_ids:
                self.engine.submit(lambda: self._drop(rid, og, "prefill failed" if out else "prefill aborted"))
                self.metrics.transfer_failures.labels(cause="prefill_failed" if out else "prefill_aborted").inc()
        if out is None or out.error or not out.new_token_ids:
            raise PrefillFailed(out.error if out else "prefill produced no token")
        first = out.new_token_ids[0]
        send.finish(first_token=first)
        asyncio.get_running_loop().create_task(self._complete(rid, og))
        elapsed = time.monotonic() - og.started
        queue_s = out.queue_time or 0.0
        return PrefillResult(
            first, out.num_cached_tokens, queue_s, max(0.0, elapsed - queue_s), out.logprobs[0] if out.logprobs else None
        )

    def _drop(self, rid: str, og: Outgoing, reason: str) -> None:
        """Engine thread: end the request's ticket unless the abort already did."""
        if self._outgoing.get(rid) is og:
            del self._outgoing[rid]
        if not og.send.stopped:
            og.send.abort(reason)

    async def _complete(self, rid: str, og: Outgoing) -> None:
        """Once the transfer is over either way, the blocks may go — never earlier: the sender reads them
        until its writer thread settles the ticket (acknowledged, failed or aborted)."""
        try:
            ok = await asyncio.to_thread(og.send.wait, og.deadline_s + 5.0)
            while not og.send.done:  # the receiver never answered: stop sending, wait for the writer to let go
                og.send.abort("no answer from the decode worker")
                await asyncio.to_thread(og.send.wait, 1.0)
            m = self.metrics
            if ok:
                # Until the receiver's ack: bytes the kernel still buffered count as exposed, too.
                last = og.send.settled_at or time.monotonic()
                m.transfer_bytes.inc(og.send.bytes_sent)
                m.transfer_duration.observe(last - og.started)
                if og.compute_done is not None:
                    m.exposed_transfer.observe(max(0.0, last - og.compute_done))
                    self._measure_link(og)
            else:
                m.transfer_failures.labels(cause=_cause(og.send.error)).inc()
                log.warning("transfer for %s failed: %s", rid, og.send.error)
        finally:
            self._outgoing.pop(rid, None)
            self.engine.release_held(rid)

    def _measure_link(self, og: Outgoing) -> None:
        # The last layer leaves once it is computed and the one before it is out; it has landed at the ack.
        times = og.send.layer_sent_times
        start = max(og.compute_done or 0.0, times[-2] if len(times) > 1 else 0.0)
        end = og.send.settled_at or times[-1]
        if end > start:
            self.link_bytes += og.send.bytes_sent / len(times)
            self.link_s += end - start


def _cause(error: str | None) -> str:
    return (error or "timeout").split(":")[0].strip()[:32] or "unknown"
