"""A framed socket: whole frames out with scatter-gather sends, exact reads in with an idle limit.

Sends block in the kernel under SO_SNDTIMEO: a whole frame, however many iovecs, goes out in one
sendmsg() that returns when done, as sendall() on a plain socket would (a Python-level timeout would
wake us to resend at every free window, and re-pin every buffer each time). Reads never block
(MSG_DONTWAIT) and wait in our own poll(): a read tries first and polls only when nothing is queued,
and a caller can wait for bytes *without* holding a lock, then take the lock only for the recv itself
(see the receiver's late-writer rule).
"""

from __future__ import annotations

import os
import select
import socket
import struct
import threading
from typing import Sequence
from urllib.parse import urlsplit

from splitserve.transfer import frames
from splitserve.transfer.frames import Frame, ProtocolError

IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
RECV_IOVECS = 128  # recvmsg_into pins every buffer it is handed: pass only what one read can fill
SOCKET_BUFFER_BYTES = 4 << 20
_SCRATCH = memoryview(bytearray(1 << 20))  # discarded payloads land here; nobody reads it, so threads may share it


class PeerClosed(ConnectionError):
    pass


class Stalled(TimeoutError):
    pass


def tune(sock: socket.socket) -> None:
    # Headers are tiny and must not wait for Nagle; big buffers let a whole layer sit in flight.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER_BYTES)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER_BYTES)


def parse_endpoint(endpoint: str) -> tuple[str, str, int]:
    """"tcp://host:port", "shm://name@host:port" or "nixl://host:port" (the control socket) -> (transport, host, port)."""
    parts = urlsplit(endpoint)
    if parts.scheme not in ("tcp", "shm", "nixl") or not parts.hostname or not parts.port:
        raise ValueError(f"bad KV endpoint {endpoint!r}: want tcp://host:port, shm://name@host:port or nixl://host:port")
    return parts.scheme, parts.hostname, parts.port


class Channel:
    def __init__(self, sock: socket.socket, send_timeout: float) -> None:
        self.peer = "%s:%s" % sock.getpeername()[:2]
        sock.setblocking(True)
        sec, frac = divmod(send_timeout, 1.0)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", int(sec), int(frac * 1e6)))
        self.sock = sock
        self.send_timeout = send_timeout
        self._readable = select.poll()
        self._readable.register(sock.fileno(), select.POLLIN)
        self._send_lock = threading.Lock()

    def send(self, frame: Frame, payload: Sequence[memoryview] = ()) -> None:
        """One whole frame, header and payload (flat byte views) in the same sendmsg calls: no copies."""
        bufs = [memoryview(frames.encode(frame)), *payload]
        with self._send_lock:  # frames from two threads must not interleave on the wire
            while bufs:  # more than one round only past IOV_MAX buffers, or when SO_SNDTIMEO cut a send short
                try:
                    consume(bufs, self.sock.sendmsg(bufs[:IOV_MAX]))
                except BlockingIOError:  # SO_SNDTIMEO expired with nothing sent
                    raise TimeoutError(f"send to {self.peer} blocked for {self.send_timeout:.1f}s") from None

    def wait_readable(self, idle_timeout: float | None) -> None:
        if not self._readable.poll(-1 if idle_timeout is None else max(1, int(idle_timeout * 1000))):
            raise Stalled(f"no bytes from {self.peer} for {idle_timeout:.1f}s")

    def try_recv(self, bufs: list[memoryview]) -> int:
        """One scatter read of whatever is queued into `bufs`; 0 if nothing is. Never blocks."""
        try:
            n = self.sock.recvmsg_into(bufs[:RECV_IOVECS], 0, socket.MSG_DONTWAIT)[0]
        except BlockingIOError:
            return 0
        if n == 0:
            raise PeerClosed(f"{self.peer} closed the connection")
        return n

    def recv_exact(self, bufs: list[memoryview], idle_timeout: float | None) -> None:
        while bufs:
            n = self.try_recv(bufs)
            if n:
                consume(bufs, n)
            else:
                self.wait_readable(idle_timeout)

    def discard(self, nbytes: int, idle_timeout: float | None) -> None:
        while nbytes:
            n = self.try_recv([_SCRATCH[: min(nbytes, len(_SCRATCH))]])
            if n:
                nbytes -= n
            else:
                self.wait_readable(idle_timeout)

    def read_frame(self, idle_timeout: float | None) -> Frame:
        prefix = bytearray(frames.LENGTH.size)
        self.recv_exact([memoryview(prefix)], idle_timeout)
        body = bytearray(frames.header_length(prefix))
        self.recv_exact([memoryview(body)], idle_timeout)
        return frames.decode(body)

    def expect(self, kind: type, idle_timeout: float | None) -> Frame:
        frame = self.read_frame(idle_timeout)
        if not isinstance(frame, (kind, frames.Error)):
            raise ProtocolError(f"expected {kind.__name__}, got {type(frame).__name__}")
        return frame

    def shutdown(self) -> None:
        """Wake every thread blocked on this socket; safe from any thread (close() is the owner's job)."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already disconnected

    def close(self) -> None:
        self.shutdown()
        self.sock.close()


def consume(bufs: list[memoryview], n: int) -> None:
    """Drop the first `n` bytes from a list of flat byte buffers, in place."""
    full = 0
    while full < len(bufs) and n >= len(bufs[full]):
        n -= len(bufs[full])
        full += 1
    del bufs[:full]
    if n:
        bufs[0] = bufs[0][n:]
