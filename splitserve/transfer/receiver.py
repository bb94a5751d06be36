"""The decode side: accepts sender connections and lands KV bytes in reserved blocks.

Threads: one accepts, one per connection reads frames (and answers with acks and shm credits), one
housekeeper fails tickets at their deadline and delivers acks that other threads decided on, so no
caller of cancel() ever waits on a socket.

Late-writer rule: every write into a ticket's blocks happens under that ticket's lock, after checking
the ticket is alive, one recv (or one ring copy) at a time; ending a ticket takes the same lock. So
once cancel() or any failure returns, nothing writes those blocks again and the caller may reuse them.

Over NIXL the sender WRITEs our blocks itself, so that rule cannot hold by locking: a ticket that ends
before every layer landed is quarantined until its sender fences it (nixl_receiver.py), cancel() says
so by returning False, and on_fenced(ticket) says when the blocks may be reused.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import os
import socket
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from splitserve.model.kv_cache import PagedKVCache
from splitserve.transfer.channel import Channel, Stalled, consume, tune
from splitserve.transfer.frames import (
    Abort, Ack, Claim, Credit, Done, Error, Fenced, Grant, Heartbeat, HelloAck, Landed, Layer, ProtocolError,
)
from splitserve.transfer.handshake import HandshakeError, server_ack, server_hello
from splitserve.transfer.layout import CacheBytes, KVLayout
from splitserve.transfer.nixl_receiver import NixlLanding
from splitserve.transfer.shm_ring import DEFAULT_NUM_SLOTS, DEFAULT_SLOT_BYTES, ReceiverRing
from splitserve.transfer.staging import Staging, device_for

log = logging.getLogger(__name__)

KEEP_FINISHED = 4096  # outcomes remembered for wait_layer() and for telling late senders why
KEEP_HANDSHAKE_ERRORS = 32
NOTE_POLL_S = 0.0005  # nixl: how often notifications are polled while a ticket is open (NIXL has no blocking wait)
IDLE_NOTE_POLL_S = 0.02


@dataclass
class ReceiverStats:
    bytes_received: int = 0  # payload written into KV blocks
    bytes_discarded: int = 0  # payload for unknown, finished or cancelled tickets
    frames: int = 0
    tickets_completed: int = 0
    failures: Counter = field(default_factory=Counter)  # by cause; "sender_abort" without its message
    connections_accepted: int = 0
    connections_dropped: Counter = field(default_factory=Counter)  # by cause
    handshakes_refused: int = 0
    late_notes: int = 0  # nixl: notifications for tickets already ended (their blocks were still quarantined)

    def as_dict(self) -> dict:
        return {**self.__dict__, "failures": dict(self.failures), "connections_dropped": dict(self.connections_dropped)}


class _Ticket:
    def __init__(self, ticket_id: str, block_ids: np.ndarray, deadline: float, num_layers: int) -> None:
        self.id = ticket_id
        self.block_ids = block_ids
        self.deadline = deadline
        self.lock = threading.Lock()
        self.dead = False  # ended (complete, failed or cancelled): its blocks are off limits
        self.conn: _Conn | None = None  # the one connection allowed to send it, fixed by its first frame
        self.received = bytearray(num_layers * len(block_ids))  # 1 per (layer, block index) landed
        self.missing = [len(block_ids)] * num_layers  # blocks still to land, per layer
        self.done: Done | None = None  # nixl: the sender's done notification (it may overtake a layer's)

    def complete(self) -> bool:
        return not any(self.missing)


class _Conn:
    def __init__(self, ch: Channel, node: str, ring: ReceiverRing | None) -> None:
        self.ch = ch
        self.node = node
        self.ring = ring
        self.tickets: set[str] = set()  # live tickets bound to this connection
        self.told: OrderedDict[str, None] = OrderedDict()  # unknown tickets already answered
        self.peer: str | None = None  # nixl: the sender's agent name
        self.quarantined: set[str] = set()  # nixl: ended tickets it may still be writing
        self.host: torch.Tensor | None = None  # device caches: this connection's staging buffer


class KVReceiver:
    def __init__(
        self,
        kv_cache: PagedKVCache,
        layout: KVLayout,
        secret: bytes,
        host: str = "127.0.0.1",
        port: int = 0,
        transport: str = "tcp",
        *,
        node_id: str | None = None,
        stall_timeout: float = 2.0,
        num_slots: int = DEFAULT_NUM_SLOTS,
        slot_bytes: int = DEFAULT_SLOT_BYTES,
        fence_grace: float = 6.0,
        staging: Staging | None = None,
    ) -> None:
        if transport not in ("tcp", "shm", "nixl"):
            raise ValueError(f"transport must be 'tcp', 'shm' or 'nixl', got {transport!r}")
        self.layout = layout
        got = KVLayout.from_cache(kv_cache, layout.model_fingerprint)
        if got != layout:
            raise ValueError(f"KV cache does not match the transfer layout: cache {got}, layout {layout}")
        self._num_blocks = kv_cache.num_blocks
        self._kv = kv_cache
        # Sockets land bytes in host memory: in the cache itself, or (device caches) through staging buffers.
        # NIXL registers the tensor wherever it lives.
        device = device_for(kv_cache.tensor)
        self._staging = staging or (Staging(device, layout.block_bytes) if device else None)
        self._cache = CacheBytes(kv_cache, layout) if self._staging is None else None
        self._nixl = NixlLanding(kv_cache.tensor, layout) if transport == "nixl" else None
        # Quarantined blocks whose sender vanished are released this long after: past the sender's own
        # WRITE timeout (KVSender's default 5 s), after which it has cancelled whatever it still had posted.
        self._fence_grace = fence_grace
        self._secret = secret
        self.node_id = node_id or f"{socket.gethostname()}:{os.getpid()}"
        self._stall = stall_timeout
        self._num_slots = num_slots
        self._slot_bytes = max(slot_bytes, layout.block_bytes)
        self._listener = socket.create_server((host, port), backlog=128)
        port = self._listener.getsockname()[1]
        # The name part is informational: each connection gets its own ring, named in hello_ack.
        self.endpoint = f"shm://kv{os.getpid()}@{host}:{port}" if transport == "shm" else f"{transport}://{host}:{port}"
        # (ticket_id, first_token or None): every block of every layer landed and the sender said done.
        self.on_complete: Callable[[str, int | None], None] = lambda ticket_id, first_token: None
        self.on_failed: Callable[[str, str], None] = lambda ticket_id, cause: None
        # nixl: a ticket whose cancel() (or failure) left it quarantined may now have its blocks reused.
        self.on_fenced: Callable[[str], None] = lambda ticket_id: None
        self.last_handshake_errors: list[str] = []
        self.stats = ReceiverStats()

        self._lock = threading.Lock()  # tickets, finished, deadlines, outbox, connections, stats
        self._progress = threading.Condition(self._lock)  # a layer landed or a ticket ended
        self._wake = threading.Condition(self._lock)  # housekeeper: new deadline, ack to send, close
        self._tickets: dict[str, _Ticket] = {}
        self._finished: OrderedDict[str, str] = OrderedDict()  # ticket id -> "" (complete) or cause
        self._deadlines: list[tuple[float, int, _Ticket]] = []
        self._quarantine: dict[str, _Ticket] = {}  # nixl: ended, but their sender may still be writing
        self._graces: list[tuple[float, int, _Ticket]] = []  # quarantined tickets whose sender is gone
        self._peers: dict[str, _Conn] = {}  # nixl: sender agent name -> its connection
        self._seq = itertools.count()
        self._outbox: list[tuple[_Conn, Ack]] = []
        self._channels: set[Channel] = set()
        self._threads: set[threading.Thread] = set()
        self._closed = False

    # ---- the worker's API ----

    def start(self) -> None:
        for target, name in ((self._accept_loop, "kv-accept"), (self._housekeep, "kv-housekeeper")):
            self._spawn(target, name)
        if self._nixl is not None:
            self._spawn(self._poll_notes, "kv-nixl-notes")

    def close(self) -> None:
        """Stop serving: pending tickets end silently (the worker is going away), connections close."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            tickets = list(self._tickets.values())
            channels = list(self._channels)
            self._wake.notify_all()
        for t in tickets:
            self._end(t, "receiver_closed")
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept() on Linux; close() alone does not
        except OSError:
            pass
        self._listener.close()
        for ch in channels:
            ch.shutdown()
        for th in list(self._threads):
            if th is not threading.current_thread():
                th.join(timeout=2.0)

    def expect(self, ticket_id: str, block_ids: list[int], deadline: float) -> None:
        ids = np.asarray(block_ids, dtype=np.intp).reshape(-1)
        n = self._num_blocks
        if len(ids) and (ids.min() < 0 or ids.max() >= n or len(np.unique(ids)) != len(ids)):
            raise ValueError(f"block ids must be distinct and in [0, {n}): {block_ids}")
        with self._lock:
            if self._closed:
                raise RuntimeError("receiver is closed")
            if ticket_id in self._tickets or ticket_id in self._quarantine:
                raise ValueError(f"ticket {ticket_id!r} is already expected")
            self._finished.pop(ticket_id, None)
            t = _Ticket(ticket_id, ids, deadline, self.layout.num_layers)
            self._tickets[ticket_id] = t
            heapq.heappush(self._deadlines, (deadline, next(self._seq), t))
            self._wake.notify()

    def wait_layer(self, ticket_id: str, layer: int, timeout: float) -> bool:
        """True once every block of `layer` has landed; False on timeout or if the ticket failed."""
        if not 0 <= layer < self.layout.num_layers:
            raise ValueError(f"layer {layer} out of range [0, {self.layout.num_layers})")
        end = time.monotonic() + timeout
        with self._progress:
            while True:
                t = self._tickets.get(ticket_id)
                if t is None:
                    return self._finished.get(ticket_id) == ""
                if not t.missing[layer]:
                    return True
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._progress.wait(left)

    def cancel(self, ticket_id: str) -> bool:
        """End the ticket (no on_failed call). True: no byte is ever written into its blocks again. False
        (nixl only): its sender may still be writing them; they are reusable after on_fenced(ticket_id)."""
        with self._lock:
            t = self._tickets.get(ticket_id)
        if t is not None and self._end(t, "cancelled"):
            self._post(t, "cancelled")
        return self.fenced(ticket_id)

    def fenced(self, ticket_id: str) -> bool:
        """False while an ended ticket is quarantined (its sender may still WRITE its blocks)."""
        with self._lock:
            return ticket_id not in self._quarantine

    # ---- ticket lifecycle ----

    def _end(self, t: _Ticket, cause: str) -> bool:
        """The one way a ticket stops being writable; False if it had already ended."""
        with t.lock:  # waits out an in-flight recv into its blocks
            if t.dead:
                return False
            t.dead = True
        with self._lock:
            self._tickets.pop(t.id, None)
            self._finished[t.id] = cause
            while len(self._finished) > KEEP_FINISHED:
                self._finished.popitem(last=False)
            if t.conn is not None:
                t.conn.tickets.discard(t.id)
                if t.conn.peer is not None and cause and any(t.missing):
                    # A WRITE for a layer that has not landed may still be on its way: quarantine.
                    self._quarantine[t.id] = t
                    t.conn.quarantined.add(t.id)
                    if t.conn.peer not in self._peers:  # its sender is already gone
                        heapq.heappush(self._graces, (time.monotonic() + self._fence_grace, next(self._seq), t))
                        self._wake.notify()
            if cause:
                self.stats.failures[cause.partition(":")[0]] += 1
            else:
                self.stats.tickets_completed += 1
            self._progress.notify_all()
        return True

    def _fail(self, t: _Ticket, cause: str, tell_sender: bool = False) -> None:
        if self._end(t, cause):
            if tell_sender:
                self._post(t, cause)
            log.warning("KV ticket %s failed: %s", t.id, cause)
            self._call(self.on_failed, t.id, cause)

    def _post(self, t: _Ticket, cause: str) -> None:
        """Tell the ticket's sender, from the housekeeper thread: callers never block on a socket."""
        if t.conn is not None:
            with self._lock:
                self._outbox.append((t.conn, Ack(ticket_id=t.id, error=f"receiver ended the ticket: {cause}")))
                self._wake.notify()

    def _call(self, fn: Callable, *args: object) -> None:
        try:
            fn(*args)
        except Exception:
            log.exception("KV receiver callback %s%r raised", getattr(fn, "__name__", fn), args)

    def _housekeep(self) -> None:
        while True:
            with self._lock:
                while not (self._closed or self._outbox or self._next_due() <= time.monotonic()):
                    self._wake.wait(self._next_due() - time.monotonic() if self._next_due() < math.inf else None)
                if self._closed:
                    return
                now = time.monotonic()
                due, graced = [], []
                while self._deadlines and self._deadlines[0][0] <= now:
                    due.append(heapq.heappop(self._deadlines)[2])
                while self._graces and self._graces[0][0] <= now:
                    graced.append(heapq.heappop(self._graces)[2])
                outbox, self._outbox = self._outbox, []
            for t in due:
                self._fail(t, "deadline", tell_sender=True)
            for t in graced:
                self._release(t, "sender gone for the grace period")
            for conn, ack in outbox:
                try:
                    conn.ch.send(ack)
                except OSError:
                    conn.ch.shutdown()  # its reader thread reports the drop

    def _next_due(self) -> float:
        return min(self._deadlines[0][0] if self._deadlines else math.inf, self._graces[0][0] if self._graces else math.inf)

    def _release(self, t: _Ticket, why: str) -> None:
        """Quarantine over: nothing can write the ticket's blocks any more."""
        with self._lock:
            if self._quarantine.pop(t.id, None) is None:
                return
            if t.conn is not None:
                t.conn.quarantined.discard(t.id)
        log.info("KV ticket %s fenced: %s", t.id, why)
        self._call(self.on_fenced, t.id)

    # ---- connections ----

    def _spawn(self, target: Callable, name: str, *args: object) -> None:
        th = threading.Thread(target=self._run, args=(target, *args), name=name, daemon=True)
        with self._lock:
            self._threads.add(th)
        th.start()

    def _run(self, target: Callable, *args: object) -> None:
        try:
            target(*args)
        finally:
            with self._lock:
                self._threads.discard(threading.current_thread())

    def _accept_loop(self) -> None:
        while True:
            try:
                sock, addr = self._listener.accept()
            except OSError:
                return  # closed
            self._spawn(self._serve, f"kv-conn-{addr[0]}:{addr[1]}", sock)

    def _serve(self, sock: socket.socket) -> None:
        tune(sock)
        try:
            ch = Channel(sock, send_timeout=self._stall)
        except OSError:
            sock.close()  # gone before we could look at it
            return
        with self._lock:
            if self._closed:
                ch.close()
                return
            self._channels.add(ch)
        conn = self._handshake(ch)
        cause, why = "peer_closed", "closed by peer"
        try:
            if conn is not None:
                self._read_loop(conn)
        except ProtocolError as e:
            cause, why = "malformed", str(e)
        except Stalled as e:
            cause, why = "stalled", str(e)
        except OSError as e:  # PeerClosed, resets, send timeouts
            why = str(e) or type(e).__name__
        finally:
            with self._lock:
                self._channels.discard(ch)
            if conn is not None:
                if cause != "peer_closed":
                    try:  # best effort: the sender's error then says why, not just "connection lost"
                        ch.send(Error(message=f"{cause}: {why}"))
                    except OSError:
                        pass
                self._drop(conn, cause, why)
            ch.close()

    def _handshake(self, ch: Channel) -> _Conn | None:
        try:
            hello, nonce = server_hello(ch, self.layout, self._secret, self.node_id, self._stall)
            peer = self._accept_transport(hello)
            try:
                ring = ReceiverRing(self._num_slots, self._slot_bytes) if hello.transport == "shm" else None
            except OSError as e:
                raise HandshakeError(f"receiver {self.node_id!r} cannot create an shm ring: {e}") from e
            ack = HelloAck(
                node_id=self.node_id,
                idle_timeout=self._stall,
                mac=b"",
                shm_name=ring.name if ring else "",
                slot_bytes=ring.slot_bytes if ring else 0,
                num_slots=ring.num_slots if ring else 0,
                **(self._nixl.ack_fields() if peer else {}),
            )
            conn = _Conn(ch, hello.node_id, ring)
            if peer:
                conn.peer = peer
                with self._lock:
                    self._peers[peer] = conn
            try:
                server_ack(ch, self._secret, nonce, hello, ack)
            except OSError:
                if ring is not None:
                    ring.close()
                raise
        except (HandshakeError, ProtocolError) as e:
            self._refused(f"from {ch.peer}: {e}")  # recorded before the peer can see the refusal
            try:
                ch.send(Error(message=str(e)))
            except OSError:
                pass
            return None
        except OSError as e:  # probes and scanners that hang up, or never speak
            log.info("KV connection from %s ended during handshake: %s", ch.peer, e)
            return None
        with self._lock:
            self.stats.connections_accepted += 1
        log.info("KV sender %s connected from %s over %s", hello.node_id, ch.peer, hello.transport)
        return conn

    def _accept_transport(self, hello) -> str | None:  # type: ignore[no-untyped-def]
        """Refuse what cannot work here, naming both sides; the sender's NIXL agent name over nixl."""
        who = f"sender {hello.node_id!r} ({hello.transport}, cache on {hello.device}) -> receiver {self.node_id!r}"
        if hello.transport == "nixl":
            if self._nixl is None:
                raise HandshakeError(f"{who}: the receiver serves {self.endpoint.split(':')[0]}, not nixl")
            return self._nixl.accept(hello, self.node_id)
        return None

    def _refused(self, message: str) -> None:
        log.warning("KV handshake refused %s", message)
        with self._lock:
            self.stats.handshakes_refused += 1
            self.last_handshake_errors.append(message)
            del self.last_handshake_errors[:-KEEP_HANDSHAKE_ERRORS]

    def _drop(self, conn: _Conn, cause: str, why: str) -> None:
        with self._lock:
            bound = [self._tickets[tid] for tid in conn.tickets if tid in self._tickets]
            self.stats.connections_dropped[cause] += 1
        (log.warning if bound or cause == "malformed" else log.info)(
            "KV connection from %s (%s) closed: %s: %s; failing %d ticket(s)", conn.ch.peer, conn.node, cause, why, len(bound)
        )
        for t in bound:
            self._fail(t, cause)
        if conn.ring is not None:
            conn.ring.close()
        if conn.peer is not None:
            with self._lock:
                self._peers.pop(conn.peer, None)
                at = time.monotonic() + self._fence_grace
                for tid in conn.quarantined:
                    heapq.heappush(self._graces, (at, next(self._seq), self._quarantine[tid]))
                self._wake.notify()
            self._nixl.agent.remove_peer(conn.peer)

    # ---- frames ----

    def _read_loop(self, conn: _Conn) -> None:
        while True:
            frame = conn.ch.read_frame(self._stall)
            if conn.ring is not None:
                conn.ring.unlink()  # the sender mapped the ring before sending anything
            with self._lock:
                self.stats.frames += 1
            if isinstance(frame, Layer):
                self._on_layer(conn, frame)
            elif isinstance(frame, Done):
                self._on_done(conn, frame)
            elif isinstance(frame, Abort):
                t = self._lookup(conn, frame.ticket_id)
                if t is not None:
                    self._fail(t, f"sender_abort:{frame.reason}")
                if conn.peer is not None:  # a NIXL sender aborts only with nothing in flight
                    self._on_fenced(conn, frame.ticket_id)
            elif isinstance(frame, Claim) and conn.peer is not None:
                self._on_claim(conn, frame)
            elif isinstance(frame, Fenced) and conn.peer is not None:
                self._on_fenced(conn, frame.ticket_id)
            elif not isinstance(frame, Heartbeat):
                raise ProtocolError(f"unexpected {type(frame).__name__} frame from a sender")

    def _lookup(self, conn: _Conn, ticket_id: str) -> _Ticket | None:
        with self._lock:
            t = self._tickets.get(ticket_id)
        if t is not None and t.conn not in (None, conn):
            raise ProtocolError(f"ticket {ticket_id!r} is already being sent over another connection")
        return t

    def _on_layer(self, conn: _Conn, f: Layer) -> None:
        lay, k = self.layout, f.num_blocks
        if conn.peer is not None:
            raise ProtocolError("layer bytes on a nixl connection")
        if f.dtype != lay.dtype or tuple(f.block_shape) != lay.block_shape:
            raise ProtocolError(f"layer frame carries {f.dtype} {f.block_shape}, expected {lay.dtype} {lay.block_shape}")
        if k < 1 or f.payload_len != k * lay.block_bytes:
            raise ProtocolError(f"payload_len {f.payload_len} != {k} blocks x {lay.block_bytes} bytes")
        if f.layer >= lay.num_layers:
            raise ProtocolError(f"layer {f.layer} out of range [0, {lay.num_layers})")
        ring = conn.ring
        if ring is None and f.slot != -1:
            raise ProtocolError("ring slot named on a tcp connection")
        if ring is not None and not (0 <= f.slot < ring.num_slots and f.payload_len <= ring.slot_bytes):
            raise ProtocolError(f"slot {f.slot} / payload {f.payload_len} outside the ring ({ring.num_slots} x {ring.slot_bytes})")
        t = self._claim(conn, f)
        landed = False
        if t is not None and self._staging is not None:
            landed = self._land_staged(conn, t, f, t.block_ids[f.first_block : f.first_block + k])
        elif t is not None:
            ids = t.block_ids[f.first_block : f.first_block + k]
            if ring is None:
                landed = self._recv_blocks(conn, t, self._cache.views(f.layer, ids.tolist()))
            else:
                with t.lock:
                    if not t.dead:
                        self._cache.array[f.layer][ids] = ring.slot(f.slot, k, lay.block_bytes)
                        landed = True
        elif ring is None:
            conn.ch.discard(f.payload_len, self._stall)
        if ring is not None:
            conn.ch.send(Credit(slot=f.slot))
        if landed:
            self._landed(t, f, k)
        else:
            with self._lock:
                self.stats.bytes_discarded += f.payload_len
            self._tell(conn, f.ticket_id)

    def _claim(self, conn: _Conn, f: Layer) -> _Ticket | None:
        """The live ticket a layer frame may write, bound to this connection from its first frame."""
        t = self._lookup(conn, f.ticket_id)
        if t is None:
            return None
        n = len(t.block_ids)
        if f.first_block + f.num_blocks > n:
            raise ProtocolError(f"blocks [{f.first_block}, {f.first_block + f.num_blocks}) outside ticket {t.id!r} of {n} blocks")
        at = f.layer * n + f.first_block
        if any(t.received[at : at + f.num_blocks]):
            raise ProtocolError(f"ticket {t.id!r} layer {f.layer}: blocks sent twice")
        with self._lock:
            if t.conn is None and not t.dead:
                t.conn = conn
                conn.tickets.add(t.id)
        return t

    def _recv_blocks(self, conn: _Conn, t: _Ticket, bufs: list[memoryview]) -> bool:
        """Receive straight into the blocks; if the ticket ends midway, the rest goes to scratch."""
        while bufs:
            with t.lock:
                if t.dead:
                    break
                n = conn.ch.try_recv(bufs)
            if n:
                consume(bufs, n)
            else:
                conn.ch.wait_readable(self._stall)  # outside the lock: cancel() never waits on a slow peer
        conn.ch.discard(sum(map(len, bufs)), self._stall)
        return not bufs

    def _land_staged(self, conn: _Conn, t: _Ticket, f: Layer, ids: np.ndarray) -> bool:
        """Device cache: the payload into a host buffer (or the ring slot), then into the blocks, under the
        ticket's lock and waited for, so the late-writer rule holds for the device copy too."""
        if conn.ring is None:
            if conn.host is None or conn.host.numel() < f.payload_len:
                conn.host = self._staging.device.host_buffer(f.payload_len)
            conn.ch.recv_exact([memoryview(conn.host.numpy())[: f.payload_len]], self._stall)
            src = conn.host
        else:
            src = torch.from_numpy(conn.ring.slot(f.slot, f.num_blocks, self.layout.block_bytes)).reshape(-1)
        with t.lock:
            if t.dead:
                return False
            self._staging.land(self._kv, f.layer, ids.tolist(), src)
        return True

    def _landed(self, t: _Ticket, f: Layer, k: int) -> None:
        with t.lock:
            if t.dead:
                return
            n = len(t.block_ids)
            at = f.layer * n + f.first_block
            t.received[at : at + k] = b"\x01" * k
            t.missing[f.layer] -= k
        with self._lock:
            self.stats.bytes_received += f.payload_len
            if not t.missing[f.layer]:
                self._progress.notify_all()

    def _on_done(self, conn: _Conn, f: Done) -> None:
        t = self._lookup(conn, f.ticket_id)
        if t is None:
            self._tell(conn, f.ticket_id, again=True)
        elif not t.complete():
            conn.ch.send(Ack(ticket_id=t.id, error="receiver ended the ticket: done before every block arrived"))
            self._fail(t, "malformed")
        elif self._end(t, ""):
            # Callback before ack: when the sender's wait() says True, this worker already knows.
            self._call(self.on_complete, t.id, f.first_token)
            conn.ch.send(Ack(ticket_id=t.id))

    def _tell(self, conn: _Conn, ticket_id: str, again: bool = False) -> None:
        """Answer frames for a ticket we will not take, once, so its sender stops and frees its blocks."""
        if ticket_id in conn.told and not again:
            return
        conn.told[ticket_id] = None
        while len(conn.told) > KEEP_FINISHED:
            conn.told.popitem(last=False)
        with self._lock:
            cause = self._finished.get(ticket_id)
        why = f"ended: {cause or 'already complete'}" if cause is not None else "unknown (never expected, or forgotten)"
        conn.ch.send(Ack(ticket_id=ticket_id, error=f"receiver does not take ticket {ticket_id!r}: {why}"))

    # ---- nixl ----

    def _on_claim(self, conn: _Conn, f: Claim) -> None:
        """Grant the ticket's blocks to this connection alone, or refuse (ended, unknown, someone else's)."""
        t = self._lookup(conn, f.ticket_id)
        granted = False
        if t is not None:
            with t.lock:  # against _end: a ticket is quarantined only if it was granted before it ended
                with self._lock:
                    if not t.dead and t.conn is None:
                        t.conn = conn
                        conn.tickets.add(t.id)
                        granted = True
        if granted:
            conn.ch.send(Grant(ticket_id=t.id, block_ids=tuple(int(b) for b in t.block_ids)))
        else:
            self._tell(conn, f.ticket_id, again=True)

    def _on_fenced(self, conn: _Conn, ticket_id: str) -> None:
        with self._lock:
            t = self._quarantine.get(ticket_id)
        if t is not None and t.conn is conn:
            self._release(t, "its sender fenced it")

    def _poll_notes(self) -> None:
        while True:
            with self._lock:
                if self._closed:
                    return
                busy = bool(self._tickets)
            notes = self._nixl.drain()
            for peer, f in notes:
                self._on_note(peer, f)
            if not notes:
                time.sleep(NOTE_POLL_S if busy else IDLE_NOTE_POLL_S)

    def _on_note(self, peer: str, f: Landed | Done | None) -> None:
        with self._lock:
            conn = self._peers.get(peer)
            t = self._tickets.get(f.ticket_id) if f is not None else None
        if conn is None or t is None or t.conn is not conn:
            # Late (the ticket ended), or from a peer that is gone: the bytes went to blocks we still hold
            # in quarantine, or to a ticket that completed; nothing to do but count it.
            with self._lock:
                self.stats.late_notes += 1
            if f is None and conn is not None:
                conn.ch.shutdown()  # garbage from an authenticated peer: drop it, as a malformed frame would be
            return
        if isinstance(f, Landed):
            n = len(t.block_ids)
            with t.lock:
                if t.dead:
                    return
                if f.layer >= self.layout.num_layers or not t.missing[f.layer]:
                    bad = f"ticket {t.id!r} layer {f.layer}: landed twice or out of range"
                else:
                    bad = ""
                    t.received[f.layer * n : (f.layer + 1) * n] = b"\x01" * n
                    t.missing[f.layer] = 0
            if bad:
                self._fail(t, "malformed", tell_sender=True)
                return
            with self._lock:
                self.stats.bytes_received += n * self.layout.block_bytes
                self.stats.frames += 1
                self._progress.notify_all()
        else:
            t.done = f
        if t.done is not None and t.complete() and self._end(t, ""):
            self._call(self.on_complete, t.id, t.done.first_token)
            with self._lock:
                self._outbox.append((conn, Ack(ticket_id=t.id)))
                self._wake.notify()
