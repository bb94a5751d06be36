"""The prefill side of the NIXL transport, for one connection: WRITEs of each layer's blocks straight into
the decode worker's reserved blocks, polled to completion on the connection's writer thread.

Ownership: a ticket's source blocks are read by NIXL until every WRITE it posted is DONE, ERR or cancelled,
so the ticket settles (and the prefill worker frees them) only then. The receiver's blocks are written by
us until the same moment, so whenever the receiver ends a ticket early we answer with `Fenced` only once
nothing of ours is still in flight, and we send `Abort` only in that state too.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from splitserve.model.kv_cache import PagedKVCache
from splitserve.transfer.frames import Done, HelloAck, Landed, ProtocolError, note
from splitserve.transfer.layout import KVLayout
from splitserve.transfer.nixl_agent import NixlAgent, Region


@dataclass
class _Posted:
    layer: int
    handle: Any
    nbytes: int
    at: float


@dataclass
class _Plan:
    """One ticket's WRITE state; writer thread only."""

    dst_ids: tuple[int, ...] | None = None  # from the receiver's grant
    posted: list[_Posted] = field(default_factory=list)  # in flight
    first_token: int | None = None
    finishing: bool = False  # finish() called: notify "done" once every WRITE is DONE
    draining: str | None = None  # the ticket ended early with this error: fence, then settle
    abort_reason: str | None = None  # ...and tell the receiver why (our abort) rather than just "fenced"


class NixlPath:
    """What a sender connection does differently over NIXL. Every method runs on the writer thread."""

    def __init__(self, agent: NixlAgent, peer: str, dst: Region, layout: KVLayout, timeout: float) -> None:
        self.agent = agent
        self.peer = peer
        self.dst = dst
        self.layout = layout
        self.timeout = timeout  # a WRITE still in flight this long is cancelled and its ticket fails
        self._plans: dict[str, _Plan] = {}

    def plan(self, ticket_id: str) -> _Plan:
        return self._plans.setdefault(ticket_id, _Plan())

    def busy(self) -> bool:
        """Anything to poll for: the writer polls fast instead of sleeping a heartbeat."""
        return any(p.posted or p.finishing or p.draining for p in self._plans.values())

    def grant(self, ticket_id: str, block_ids: tuple[int, ...], num_blocks: int) -> str | None:
        """Record the receiver's destination blocks; an error if they cannot be what we send."""
        if len(block_ids) != num_blocks or any(b >= self.dst.num_blocks for b in block_ids):
            return f"grant of {len(block_ids)} blocks (ids < {self.dst.num_blocks}) for a ticket of {num_blocks}"
        self.plan(ticket_id).dst_ids = block_ids
        return None

    def post_layer(self, ticket_id: str, layer: int, cache: PagedKVCache, src_ids: list[int]) -> None:
        p = self.plan(ticket_id)
        if p.dst_ids is None:
            raise ConnectionError(f"ticket {ticket_id!r}: a layer before the receiver granted the claim")
        src = self.agent.register(cache.tensor, self.layout.block_bytes)
        handle = self.agent.write(src, self.dst, layer, src_ids, p.dst_ids, self.peer,
                                  note(Landed(ticket_id=ticket_id, layer=layer)))
        p.posted.append(_Posted(layer, handle, len(src_ids) * self.layout.block_bytes, time.monotonic()))

    def finish(self, ticket_id: str, first_token: int | None) -> None:
        p = self.plan(ticket_id)
        p.first_token, p.finishing = first_token, True

    def end(self, ticket_id: str, error: str, abort_reason: str | None = None) -> None:
        """The ticket stops: post nothing more; fence (or abort) once its WRITEs are over."""
        p = self.plan(ticket_id)
        p.finishing = False
        p.draining = p.draining or error
        p.abort_reason = p.abort_reason or abort_reason

    def poll(self, now: float, landed: Callable[[str, int, int, float], None]) -> list[tuple[str, str, str | None, str | None]]:
        """Advance every ticket. Calls landed(ticket, layer, nbytes, now) per finished WRITE; returns
        (ticket, what, error, abort_reason) for tickets that reached a new state: "done" (the done notification
        went out: await the ack) or "fenced" (nothing in flight after an early end: tell the receiver, settle)."""
        out = []
        for tid, p in list(self._plans.items()):
            still = []
            for w in p.posted:
                state = self.agent.state(w.handle)
                if state == "DONE":
                    self.agent.cancel(w.handle)  # frees the handle; nothing left to cancel
                    landed(tid, w.layer, w.nbytes, now)
                elif state == "ERR" or now - w.at > self.timeout:
                    if not self.agent.cancel(w.handle):
                        still.append(w)  # NIXL cannot cancel it: it may still land, so keep waiting
                        continue
                    p.draining = p.draining or ("nixl WRITE failed" if state == "ERR" else
                                                f"stalled: a WRITE still in flight after {self.timeout:.1f}s")
                    p.finishing = False
                else:
                    still.append(w)
            p.posted = still
            if still:
                continue
            if p.draining:
                out.append((tid, "fenced", p.draining, p.abort_reason))
                del self._plans[tid]
            elif p.finishing:
                self.agent.notify(self.peer, note(Done(ticket_id=tid, first_token=p.first_token)))
                out.append((tid, "done", None, None))
                del self._plans[tid]
        return out

    def forget(self, ticket_id: str) -> None:
        self._plans.pop(ticket_id, None)

    def close(self) -> None:
        """The connection is gone: cancel whatever is still in flight (best effort) and drop the peer."""
        for p in self._plans.values():
            for w in p.posted:
                self.agent.cancel(w.handle)
        self._plans.clear()
        self.agent.remove_peer(self.peer)


def nixl_path(agent: NixlAgent, ack: HelloAck, layout: KVLayout, timeout: float) -> NixlPath:
    """The connection's NIXL side from the receiver's hello_ack: its agent and its registered cache."""
    if not ack.nixl_metadata or ack.nixl_mem not in ("DRAM", "VRAM") or ack.nixl_num_blocks < 1:
        raise ProtocolError("receiver offered no NIXL agent or KV region")
    peer = agent.add_peer(ack.nixl_metadata)
    return NixlPath(agent, peer, Region(ack.nixl_addr, ack.nixl_num_blocks, layout.block_bytes, ack.nixl_mem, ack.nixl_dev),
                    layout, timeout)
