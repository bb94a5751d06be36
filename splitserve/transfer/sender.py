"""The prefill side: one cached, handshaken connection per decode endpoint, each with a writer thread
that owns every send and every ticket outcome, and a reader thread for acks and shm credits.

send_layer() only queues: the engine thread never waits on the network. A ticket's future completes
only on the writer thread, between frames, so when wait() returns nothing is still reading the
source blocks and the prefill worker may free them. Over NIXL (`nixl_sender.py`) the socket carries only
control frames; the same writer thread posts the WRITEs and polls them to completion.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import socket
import threading
import time
from typing import Callable, TypeVar

import numpy as np

from splitserve.model.kv_cache import PagedKVCache

T = TypeVar("T")
from splitserve.transfer.channel import IOV_MAX, Channel, parse_endpoint, tune
from splitserve.transfer.frames import Abort, Ack, Claim, Credit, Done, Error, Fenced, Grant, Heartbeat, Layer, ProtocolError
from splitserve.transfer.handshake import HandshakeError, client_handshake
from splitserve.transfer.layout import CacheBytes, KVLayout
from splitserve.transfer.nixl_agent import NixlAgent
from splitserve.transfer.nixl_sender import NixlPath, nixl_path
from splitserve.transfer.shm_ring import SenderRing
from splitserve.transfer.staging import StagedLayer, Staging

NIXL_POLL_S = 0.0005  # the writer's poll interval while WRITEs are in flight

log = logging.getLogger(__name__)


class TicketSend:
    """One ticket's sends. A future: wait() is True once the receiver confirmed every block landed."""

    def __init__(self, conn: _Connection, ticket_id: str, num_blocks: int) -> None:
        self.ticket_id = ticket_id
        self.num_blocks = num_blocks
        self.error: str | None = None
        self.bytes_sent = 0
        # Monotonic time each layer's last byte left (NaN until then): exposed-transfer metrics.
        self.layer_sent_times: list[float] = [math.nan] * conn.layout.num_layers
        self._conn = conn
        self._event = threading.Event()
        self._granted = threading.Event()  # nixl: the receiver named the blocks we may WRITE (or the ticket ended)
        self._stop = False  # failed or aborted: the writer skips what is left of it
        self._closed = False  # finish() or abort() called
        self._done_at: float | None = None  # when "done" went out: the ack is due within the timeout
        self.settled_at: float | None = None  # when the receiver's ack (or the failure) ended it

    def send_layer(self, layer: int, kv_cache: PagedKVCache, src_block_ids: list[int]) -> None:
        if self._closed:
            raise RuntimeError(f"ticket {self.ticket_id!r}: send_layer after finish() or abort()")
        if not 0 <= layer < len(self.layer_sent_times):
            raise ValueError(f"layer {layer} out of range [0, {len(self.layer_sent_times)})")
        if len(src_block_ids) != self.num_blocks:
            raise ValueError(f"ticket {self.ticket_id!r} has {self.num_blocks} blocks, got {len(src_block_ids)} source ids")
        ids = [int(i) for i in src_block_ids]  # a private copy: the caller may reuse its list
        if ids and (min(ids) < 0 or max(ids) >= kv_cache.num_blocks):
            raise ValueError(f"source block ids outside [0, {kv_cache.num_blocks}): {src_block_ids}")
        if self._stop:  # once failed, wait() already has the answer
            return
        staging = self._conn.sender.staging
        if self._conn.nixl is not None:  # NIXL reads the cache tensor itself (registered memory, host or device)
            self._conn.submit(("layer", self, layer, kv_cache, ids))
        elif staging is not None:  # device memory: queue the copy to host now, send once its event is done
            self._conn.submit(("layer", self, layer, staging.stage(kv_cache, layer, ids), list(range(len(ids)))))
        else:  # sockets read the host cache's bytes in place
            self._conn.submit(("layer", self, layer, CacheBytes(kv_cache, self._conn.layout), ids))

    def finish(self, first_token: int | None = None) -> None:
        """Queue "done" (with the sampled first token) after the layers already queued; every layer must
        have been sent."""
        if self._closed:
            return
        self._closed = True
        self._conn.submit(("done", self, first_token))

    def abort(self, reason: str) -> None:
        self._closed = True
        self._stop = True
        self._conn.submit(("abort", self, reason))

    def wait(self, timeout: float) -> bool:
        return self._event.wait(timeout) and self.error is None

    @property
    def stopped(self) -> bool:
        """Failed or aborted: nothing more of it is sent."""
        return self._stop

    @property
    def done(self) -> bool:
        return self._event.is_set()

    def _settle(self, error: str | None) -> None:
        """Writer thread only."""
        if not self._event.is_set():
            self.error = error
            self._stop = True
            self.settled_at = time.monotonic()
            self._event.set()
            self._granted.set()


class _Connection:
    def __init__(self, sender: KVSender, endpoint: str, ch: Channel, heartbeat: float, ring: SenderRing | None,
                 nixl: NixlPath | None = None) -> None:
        self.sender = sender
        self.endpoint = endpoint
        self.layout = sender.layout
        self.ch = ch
        self.ring = ring
        self.nixl = nixl
        block_bytes = self.layout.block_bytes
        # Frames of whole blocks, bounded so one iovec list fits IOV_MAX and other tickets get turns.
        if ring is not None:
            self._frame_blocks = ring.slot_bytes // block_bytes
        else:
            self._frame_blocks = max(1, min(IOV_MAX - 1, sender.max_frame_bytes // block_bytes))
        self._heartbeat = heartbeat
        self._last_send = time.monotonic()
        self._queue: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._tickets: dict[str, TicketSend] = {}
        self.alive = True
        self._closing: str | None = None
        self._threads = [
            threading.Thread(target=self._write_loop, name=f"kv-send-{endpoint}", daemon=True),
            threading.Thread(target=self._read_loop, name=f"kv-acks-{endpoint}", daemon=True),
        ]
        for th in self._threads:
            th.start()

    def register(self, ticket_id: str, num_blocks: int) -> TicketSend | None:
        """A new ticket on this connection, or None if it has died (the caller reconnects)."""
        with self._lock:
            if not self.alive:
                return None
            if ticket_id in self._tickets:
                raise ValueError(f"ticket {ticket_id!r} is already being sent to {self.endpoint}")
            t = self._tickets[ticket_id] = TicketSend(self, ticket_id, num_blocks)
            return t

    def submit(self, item: tuple) -> None:
        self._queue.put(item)

    def close(self, reason: str) -> None:
        self._closing = reason
        self.ch.shutdown()  # a writer blocked in sendmsg fails at once
        self._queue.put(("lost", reason))
        for th in self._threads:
            th.join(timeout=2.0)

    # ---- writer thread ----

    def _write_loop(self) -> None:
        error = "connection closed"
        try:
            while True:
                polling = self.nixl is not None and self.nixl.busy()
                try:
                    item = self._queue.get(timeout=NIXL_POLL_S if polling else self._heartbeat)
                except queue.Empty:
                    item = ("idle",)
                if item[0] == "lost":
                    error = item[1]
                    break
                self._handle(item)
                now = time.monotonic()
                if self.nixl is not None:
                    self._advance_nixl(now)
                if now - self._last_send >= self._heartbeat:
                    self._send(Heartbeat())  # the receiver reads silence as a dead sender
                self._expire_acks(now)
        except (OSError, ProtocolError) as e:
            error = f"connection to {self.endpoint} failed: {e}"
        finally:
            with self._lock:
                self.alive = False
                tickets = list(self._tickets.values())
                self._tickets.clear()
            error = self._closing or error
            if tickets:
                log.warning("KV connection to %s ended with %d ticket(s) in flight: %s", self.endpoint, len(tickets), error)
            if self.nixl is not None:
                self.nixl.close()  # before settling: the source blocks stay put while a WRITE may read them
            for t in tickets:
                t._settle(error)
            self.ch.shutdown()  # the reader wakes, posts "lost" to nobody and exits
            self._threads[1].join(timeout=2.0)
            self.ch.close()
            if self.ring is not None:
                self.ring.close()

    def _handle(self, item: tuple) -> None:
        kind = item[0]
        if self.nixl is not None and self._handle_nixl(item):
            return
        if kind == "layer":
            _, t, layer, cache, ids = item
            if not t._stop:
                self._send_layer(t, layer, cache, ids)
        elif kind == "done":
            _, t, first_token = item
            if not t._stop:
                self._send(Done(ticket_id=t.ticket_id, first_token=first_token))
                t._done_at = time.monotonic()
        elif kind == "abort":
            _, t, reason = item
            if not t.done:
                self._send(Abort(ticket_id=t.ticket_id, reason=reason))
                self._settle(t, f"aborted: {reason}")
        elif kind == "ack":
            _, ticket_id, error = item
            t = self._tickets.get(ticket_id)
            if t is not None:
                self._settle(t, error or None)

    def _handle_nixl(self, item: tuple) -> bool:
        """The NIXL meaning of a queue item; False for those that mean the same as over a socket."""
        nixl, kind = self.nixl, item[0]
        if kind == "claim":
            self._send(Claim(ticket_id=item[1].ticket_id))
        elif kind == "grant":
            _, ticket_id, block_ids = item
            t = self._tickets.get(ticket_id)
            if t is not None and not t._stop:
                problem = nixl.grant(ticket_id, block_ids, t.num_blocks)
                if problem:
                    t._stop = True
                    nixl.end(ticket_id, f"bad grant: {problem}", abort_reason="bad grant")
                t._granted.set()
        elif kind == "layer":
            _, t, layer, cache, ids = item
            if not t._stop:
                try:
                    nixl.post_layer(t.ticket_id, layer, cache, ids)
                except (ConnectionError, RuntimeError, ValueError) as e:  # NIXL's own errors are RuntimeErrors
                    t._stop = True
                    nixl.end(t.ticket_id, f"nixl WRITE not posted: {e}", abort_reason="WRITE not posted")
        elif kind == "done":
            _, t, first_token = item
            if not t._stop:
                nixl.finish(t.ticket_id, first_token)
        elif kind == "abort":
            _, t, reason = item
            if not t.done:
                nixl.end(t.ticket_id, f"aborted: {reason}", abort_reason=reason)
        elif kind == "ack" and item[2]:
            # The receiver ended it early: it keeps the blocks quarantined until we say nothing is in flight.
            # Even for a ticket we already let go of (its done went out, no ack in time): the answer is due.
            _, ticket_id, error = item
            t = self._tickets.get(ticket_id)
            if t is not None:
                t._stop = True
            nixl.end(ticket_id, error)
        elif kind == "ack":
            nixl.forget(item[1])
            return False
        else:
            return False
        return True

    def _advance_nixl(self, now: float) -> None:
        def landed(ticket_id: str, layer: int, nbytes: int, at: float) -> None:
            t = self._tickets.get(ticket_id)
            if t is not None:
                t.bytes_sent += nbytes
                t.layer_sent_times[layer] = at

        for ticket_id, what, error, abort_reason in self.nixl.poll(now, landed):
            t = self._tickets.get(ticket_id)
            if what == "done":
                if t is not None:
                    t._done_at = now
            elif abort_reason is not None:
                self._send(Abort(ticket_id=ticket_id, reason=abort_reason))  # implies fenced: nothing in flight
                if t is not None:
                    self._settle(t, error)
            else:
                self._send(Fenced(ticket_id=ticket_id))
                if t is not None:
                    self._settle(t, error)

    def _send_layer(self, t: TicketSend, layer: int, cache: CacheBytes | StagedLayer, ids: list[int]) -> None:
        lay = self.layout
        src_layer = layer
        if isinstance(cache, StagedLayer):
            cache.wait()  # this layer's device -> host copy; the compute stream never waited for it
            src_layer = 0
        for first in range(0, len(ids), self._frame_blocks):
            if t._stop:  # aborted from another thread, or failed: stop between frames
                return
            chunk = ids[first : first + self._frame_blocks]
            k = len(chunk)
            header = dict(
                ticket_id=t.ticket_id, layer=layer, first_block=first, num_blocks=k,
                dtype=lay.dtype, block_shape=lay.block_shape, payload_len=k * lay.block_bytes,
            )
            if self.ring is None:
                self._send(Layer(**header), cache.views(src_layer, chunk))
            else:
                slot = self.ring.acquire(self.sender.timeout)
                # The one copy shm needs: gather the blocks into the slot ("clip": ids are checked, and
                # "raise" would buffer through a temporary).
                np.take(cache.array[src_layer], chunk, axis=0, out=self.ring.slot(slot, k, lay.block_bytes), mode="clip")
                self._send(Layer(**header, slot=slot))
            t.bytes_sent += k * lay.block_bytes
        t.layer_sent_times[layer] = time.monotonic()

    def _send(self, frame: object, payload: list[memoryview] = ()) -> None:
        self.ch.send(frame, payload)
        self._last_send = time.monotonic()

    def _settle(self, t: TicketSend, error: str | None) -> None:
        with self._lock:
            self._tickets.pop(t.ticket_id, None)
        t._settle(error)

    def _expire_acks(self, now: float) -> None:
        timeout = self.sender.timeout
        with self._lock:
            late = [t for t in self._tickets.values() if t._done_at is not None and now - t._done_at > timeout]
        for t in late:
            self._settle(t, f"no completion ack from {self.endpoint} within {timeout:.1f}s of done")

    # ---- reader thread ----

    def _read_loop(self) -> None:
        try:
            while True:
                frame = self.ch.read_frame(None)  # idle is fine here: silence from the receiver is normal
                if isinstance(frame, Ack):
                    self._queue.put(("ack", frame.ticket_id, frame.error))
                elif isinstance(frame, Credit) and self.ring is not None:
                    self.ring.release(frame.slot)
                elif isinstance(frame, Grant) and self.nixl is not None:
                    self._queue.put(("grant", frame.ticket_id, frame.block_ids))
                elif isinstance(frame, Error):
                    raise ConnectionError(f"receiver closed the connection: {frame.message}")
                else:
                    raise ProtocolError(f"unexpected {type(frame).__name__} frame from the receiver")
        except (OSError, ProtocolError) as e:
            self._queue.put(("lost", f"connection to {self.endpoint} lost: {e}"))
            if self.ring is not None:
                self.ring.wake()


class KVSender:
    def __init__(
        self,
        layout: KVLayout,
        secret: bytes,
        timeout: float = 5.0,
        *,
        node_id: str | None = None,
        max_frame_bytes: int = 4 << 20,
        staging: Staging | None = None,
    ) -> None:
        self.layout = layout
        self.staging = staging  # a device KV cache over tcp/shm: layers go through host buffers
        self.timeout = timeout
        self.max_frame_bytes = max_frame_bytes
        self.node_id = node_id or f"{socket.gethostname()}:{os.getpid()}"
        self._secret = secret
        self._lock = threading.Lock()
        self._conns: dict[str, _Connection] = {}
        self._connecting: dict[str, threading.Lock] = {}  # one handshake per endpoint at a time
        self._closed = False
        self._nixl: NixlAgent | None = None  # made on the first nixl connection: other transports never load NIXL

    def start_ticket(self, endpoint: str, ticket_id: str, num_blocks: int) -> TicketSend:
        """Raises HandshakeError if the receiver refuses us, ConnectionError if it cannot be reached.
        Over NIXL it returns once the receiver granted the claim (or refused it: the ticket has then failed)."""
        t = self._with_connection(endpoint, lambda conn: conn.register(ticket_id, num_blocks))
        if t._conn.nixl is not None:
            t._conn.submit(("claim", t))
            if not t._granted.wait(self.timeout):
                t.abort(f"no grant from {endpoint} within {self.timeout:.1f}s")
        return t

    def connect(self, endpoint: str) -> None:
        """Open (and handshake) the connection to `endpoint` now, so that a mismatch shows at deployment
        time rather than on a request. Same errors as start_ticket."""
        self._with_connection(endpoint, lambda conn: conn.alive or None)

    def _with_connection(self, endpoint: str, use: Callable[[_Connection], T | None]) -> T:
        """use(conn) on a live connection (None means the cached one died), connecting once if needed."""
        with self._lock:
            if self._closed:
                raise RuntimeError("sender is closed")
            gate = self._connecting.setdefault(endpoint, threading.Lock())
        with gate:
            conn = self._conns.get(endpoint)
            result = use(conn) if conn is not None else None
            if result is None:
                conn = self._connect(endpoint)
                with self._lock:
                    if self._closed:
                        conn.close("sender closed")
                        raise RuntimeError("sender is closed")
                    self._conns[endpoint] = conn
                result = use(conn)
        return result

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conns = list(self._conns.values())
            self._conns.clear()
        for conn in conns:
            conn.close("sender closed")

    def _connect(self, endpoint: str) -> _Connection:
        transport, host, port = parse_endpoint(endpoint)
        # Before connecting: making an agent takes a while, and the receiver allows a handshake only so long.
        agent = self._nixl_agent() if transport == "nixl" else None
        try:
            sock = socket.create_connection((host, port), timeout=self.timeout)
        except OSError as e:
            raise ConnectionError(f"cannot connect to KV receiver {endpoint}: {e}") from e
        try:
            tune(sock)
            ch = Channel(sock, send_timeout=self.timeout)
        except OSError as e:
            sock.close()
            raise ConnectionError(f"KV receiver {endpoint} hung up at once: {e}") from e
        try:
            offer = {"nixl_metadata": agent.metadata(), "nixl_mem_types": agent.mem_types} if agent else {}
            offer["device"] = self.staging.device.name if self.staging else "cpu"
            ack = client_handshake(ch, self.layout, self._secret, self.node_id, transport, self.timeout, **offer)
            ring = nixl = None
            if transport == "shm":
                if not ack.shm_name:
                    raise ProtocolError("receiver offered no shm ring")
                ring = SenderRing(ack.shm_name, ack.num_slots, ack.slot_bytes)
            if agent is not None:
                nixl = nixl_path(agent, ack, self.layout, self.timeout)
        except HandshakeError:
            ch.close()
            raise
        except (OSError, ProtocolError) as e:
            ch.close()
            raise ConnectionError(f"KV handshake with {endpoint} failed: {e}") from e
        log.info("KV connection to %s (%s) over %s", endpoint, ack.node_id, transport)
        # Four beats per idle limit: one late beat never looks like death (floored against a silly limit).
        return _Connection(self, endpoint, ch, max(0.05, ack.idle_timeout / 4), ring, nixl)

    def _nixl_agent(self) -> NixlAgent:
        with self._lock:
            if self._nixl is None:
                self._nixl = NixlAgent("kv-send")  # imports NIXL, an optional extra: only now, on first use
            return self._nixl
