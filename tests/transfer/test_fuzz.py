"""Garbage thrown at a receiver over real sockets costs only the connection it came on: afterwards a good
sender still completes a ticket, its blocks hold the right bytes, and no other block was written."""

from __future__ import annotations

import socket
import time

import msgspec
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from splitserve.transfer import KVLayout, KVReceiver, KVSender
from splitserve.transfer.channel import consume, parse_endpoint
from splitserve.transfer.frames import LENGTH, MAX_HEADER_BYTES, Layer, encode
from tests.transfer.conftest import SECRET, STALL, Recorder, closed_by_peer, layout_of, make_cache, raw_client

SRC_IDS, DST_IDS = [0, 1, 2], [10, 11, 12]
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


class Target:
    def __init__(self) -> None:
        self.src, self.dst = make_cache(seed=9), make_cache()
        self.layout = layout_of(self.src)
        self.receiver = KVReceiver(self.dst, self.layout, SECRET, stall_timeout=STALL)
        self.rec = Recorder(self.receiver)
        self.receiver.start()
        self.sender = KVSender(self.layout, SECRET)
        self.rounds = 0

    def connect(self) -> socket.socket:
        _, host, port = parse_endpoint(self.receiver.endpoint)
        return socket.create_connection((host, port), timeout=5)

    def still_serves(self) -> None:
        """A good ticket completes with the right bytes, and every other block is still zero."""
        self.rounds += 1
        tid = f"good-{self.rounds}"
        self.dst.tensor[:, DST_IDS] = 0
        self.receiver.expect(tid, DST_IDS, time.monotonic() + 5)
        ticket = self.sender.start_ticket(self.receiver.endpoint, tid, len(SRC_IDS))
        for layer in range(self.layout.num_layers):
            ticket.send_layer(layer, self.src, SRC_IDS)
        ticket.finish()
        assert ticket.wait(5), ticket.error
        assert self.rec.wait(tid) == ""
        assert torch.equal(self.dst.tensor[:, DST_IDS], self.src.tensor[:, SRC_IDS])
        others = [b for b in range(self.dst.num_blocks) if b not in DST_IDS]
        assert not self.dst.tensor[:, others].any()

    def close(self) -> None:
        self.sender.close()
        self.receiver.close()


@pytest.fixture(scope="module")
def target():
    t = Target()
    yield t
    t.close()


def throw(sock: socket.socket, data: bytes) -> None:
    """Send, then half-close: whatever the bytes were, the receiver must end up closing its side."""
    try:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass  # it may already have hung up on us mid-send: that is the point
    assert closed_by_peer(sock)
    sock.close()


@FUZZ
@given(data=st.binary(max_size=2048))
def test_unauthenticated_garbage(target, data):
    sock = target.connect()
    throw(sock, data)
    target.still_serves()


def _frames(layout: KVLayout) -> st.SearchStrategy[bytes]:
    """Authenticated-stream garbage: random bytes, random headers, and layer frames with one field wrong."""
    scalars = st.one_of(st.integers(-(2**63), 2**64 - 1), st.text(max_size=20), st.binary(max_size=20), st.none(), st.floats())
    keys = st.sampled_from(["kind", "ticket_id", "layer", "first_block", "num_blocks", "dtype", "block_shape", "payload_len", "slot", "x"])
    kinds = st.sampled_from(["layer", "done", "abort", "hello", "hello_ack", "error", "ack", "credit", "challenge", "heartbeat", "bogus"])
    random_header = st.dictionaries(keys, st.one_of(scalars, kinds, st.lists(scalars, max_size=6)), max_size=10).map(
        lambda d: (b := msgspec.msgpack.encode(d), LENGTH.pack(len(b)) + b)[1]
    )
    good = dict(ticket_id="good-1", layer=0, first_block=0, num_blocks=2, dtype=layout.dtype, block_shape=layout.block_shape, payload_len=2 * layout.block_bytes)
    broken = st.sampled_from([
        dict(layer=layout.num_layers), dict(first_block=2), dict(num_blocks=0), dict(num_blocks=4, payload_len=4 * layout.block_bytes),
        dict(payload_len=layout.block_bytes), dict(dtype="float16"), dict(block_shape=(2, 4, 2, 9)), dict(slot=0),
    ])
    # "good-1" is never live while garbage flies, so the only valid frames here are for an unknown ticket.
    unknown_ok = st.just(encode(Layer(**good)) + bytes(2 * layout.block_bytes))
    bad_layer = broken.map(lambda change: encode(Layer(**{**good, "ticket_id": "live-decoy", **change})))
    truncated = st.integers(0, 2 * layout.block_bytes - 1).map(lambda n: encode(Layer(**good)) + bytes(n))
    return st.lists(st.one_of(st.binary(max_size=512), random_header, unknown_ok, bad_layer, truncated), min_size=1, max_size=4).map(b"".join)


@FUZZ
@given(blob=_frames(layout_of(make_cache())))
def test_authenticated_garbage(target, blob):
    # Two blocks: every "broken" variant of a frame naming it is invalid for it.
    target.receiver.expect("live-decoy", [20, 21], time.monotonic() + 60)
    ch, _ = raw_client(target.receiver, target.layout)
    throw(ch.sock, blob)
    target.receiver.cancel("live-decoy")
    assert target.rec.outcomes.pop("live-decoy", None) is None  # a bad frame never binds, so never fails, it
    target.still_serves()


def test_oversized_header_closes_without_reading_on(target):
    ch, _ = raw_client(target.receiver, target.layout)
    dropped = target.receiver.stats.connections_dropped["malformed"]
    ch.sock.sendall(LENGTH.pack(MAX_HEADER_BYTES + 1))  # and nothing more: no EOF to hide behind
    assert closed_by_peer(ch.sock, timeout=STALL / 2)
    assert target.receiver.stats.connections_dropped["malformed"] == dropped + 1
    ch.close()
    target.still_serves()


def test_a_malformed_frame_fails_only_tickets_bound_to_its_connection(target):
    target.receiver.expect("bound", [20, 21], time.monotonic() + 30)
    target.receiver.expect("bystander", [22, 23], time.monotonic() + 30)
    ch, _ = raw_client(target.receiver, target.layout)
    lay = target.layout
    frame = Layer(ticket_id="bound", layer=0, first_block=0, num_blocks=2, dtype=lay.dtype, block_shape=lay.block_shape, payload_len=2 * lay.block_bytes)
    ch.send(frame, [memoryview(target.src.tensor[0, 0:2].contiguous().view(torch.uint8).numpy().tobytes())])
    ch.send(msgspec.structs.replace(frame, layer=0))  # the same blocks again: malformed
    assert target.rec.wait("bound", 2) == "malformed"
    assert closed_by_peer(ch.sock)
    ch.close()
    assert "bystander" not in target.rec.outcomes
    target.receiver.cancel("bystander")
    target.dst.tensor[:, [20, 21]] = 0
    target.still_serves()


def test_a_handshake_that_never_comes_is_dropped(target):
    sock = target.connect()
    assert closed_by_peer(sock, timeout=STALL * 4)  # challenge sent, hello never arrives: stalled
    sock.close()


@given(st.lists(st.binary(min_size=0, max_size=9), max_size=6), st.integers(0, 60))
def test_consume_drops_exactly_n_bytes(chunks, n):
    bufs = [memoryview(c) for c in chunks]
    joined = b"".join(chunks)
    n = min(n, len(joined))
    consume(bufs, n)
    assert b"".join(bytes(b) for b in bufs) == joined[n:]


@pytest.mark.parametrize("endpoint", ["udp://h:1", "tcp://h", "tcp://:5", "h:5"])
def test_bad_endpoints_are_refused(endpoint):
    with pytest.raises(ValueError):
        parse_endpoint(endpoint)
