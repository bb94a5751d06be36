"""Dead, stalled and late peers: every ticket ends in seconds with its cause, and once the receiver
has let go of a ticket's blocks nothing writes them again."""

from __future__ import annotations

import inspect
import multiprocessing as mp
import os
import signal
import socket
import threading
import time

import pytest
import torch

from splitserve.transfer import KVReceiver, KVSender
from splitserve.transfer.channel import Channel
from splitserve.transfer.frames import Ack, Done, HelloAck, Layer
from splitserve.transfer.handshake import server_ack, server_hello
from tests.transfer.conftest import SECRET, STALL, assert_landed, checksum, layout_of, make_cache, raw_client

SRC_IDS = [5, 2, 17, 9, 30, 11, 0]
DEFAULT_STALL = inspect.signature(KVReceiver).parameters["stall_timeout"].default
DST_IDS = [1, 3, 4, 8, 20, 31, 12]


def payload(cache, layer: int, ids: list[int]) -> bytes:
    return cache.tensor[layer, ids].contiguous().view(torch.uint8).numpy().tobytes()


def layer_frame(layout, ticket_id: str, layer: int, first: int, k: int) -> Layer:
    return Layer(
        ticket_id=ticket_id, layer=layer, first_block=first, num_blocks=k, dtype=layout.dtype,
        block_shape=layout.block_shape, payload_len=k * layout.block_bytes,
    )


def _doomed_sender(endpoint: str, conn) -> None:
    """Runs in a child process: starts a ticket, sends one layer, then waits to be killed."""
    src = make_cache(seed=1)
    ticket = KVSender(layout_of(src), SECRET).start_ticket(endpoint, "doomed", len(SRC_IDS))
    ticket.send_layer(0, src, SRC_IDS)
    conn.send("sent")
    time.sleep(60)


@pytest.mark.parametrize("transport", ["tcp", "shm", "nixl"])
def test_sender_process_killed_mid_ticket(transport, make_receiver):
    receiver, rec = make_receiver(make_cache(), transport)
    receiver.expect("doomed", DST_IDS, time.monotonic() + 30)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_doomed_sender, args=(receiver.endpoint, child), daemon=True)
    proc.start()
    try:
        assert parent.poll(30) and parent.recv() == "sent"
        assert receiver.wait_layer("doomed", 0, 5)
        os.kill(proc.pid, signal.SIGKILL)
        killed = time.monotonic()
        assert rec.wait("doomed", 5) == "peer_closed"
        assert rec.times["doomed"] - killed < 5
    finally:
        proc.kill()
        proc.join(5)


def test_socket_closed_mid_payload_is_peer_closed(make_receiver):
    src = make_cache(seed=1)
    receiver, rec = make_receiver(make_cache())
    layout = layout_of(src)
    receiver.expect("t", DST_IDS, time.monotonic() + 30)
    ch, _ = raw_client(receiver, layout)
    ch.send(layer_frame(layout, "t", 0, 0, 7))
    ch.sock.sendall(payload(src, 0, SRC_IDS)[: 3 * layout.block_bytes])
    ch.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # reset, like a crash
    ch.sock.close()
    assert rec.wait("t", 2) == "peer_closed"


@pytest.mark.parametrize("stall_timeout", [STALL, DEFAULT_STALL], ids=["fast", "default"])
def test_stalled_sender_is_detected_within_the_bound(stall_timeout, make_receiver):
    src = make_cache(seed=1)
    layout = layout_of(src)
    receiver, rec = make_receiver(make_cache(), stall_timeout=stall_timeout)
    receiver.expect("t", DST_IDS, time.monotonic() + 30)
    ch, ack = raw_client(receiver, layout)
    ch.send(layer_frame(layout, "t", 0, 0, 7))
    ch.sock.sendall(payload(src, 0, SRC_IDS)[: len(payload(src, 0, SRC_IDS)) // 2])  # half a layer, then silence
    last_byte = time.monotonic()
    assert rec.wait("t", 6) == "stalled"
    took = rec.times["t"] - last_byte
    assert ack.idle_timeout * 0.9 <= took < 5
    ch.close()


def test_a_slow_but_alive_sender_is_not_stalled(make_receiver, make_sender):
    """Prefill may compute longer than the idle limit between layers: heartbeats keep the ticket alive."""
    src, dst = make_cache(seed=2), make_cache()
    receiver, rec = make_receiver(dst)
    receiver.expect("slow", DST_IDS, time.monotonic() + 30)
    ticket = make_sender(layout_of(src)).start_ticket(receiver.endpoint, "slow", len(SRC_IDS))
    ticket.send_layer(0, src, SRC_IDS)
    time.sleep(3 * STALL)
    for layer in (1, 2):
        ticket.send_layer(layer, src, SRC_IDS)
    ticket.finish()
    assert ticket.wait(5), ticket.error
    assert rec.wait("slow") == ""
    assert_landed(src, SRC_IDS, dst, DST_IDS)


def test_deadline_with_no_sender(make_receiver):
    receiver, rec = make_receiver(make_cache())
    deadline = time.monotonic() + 0.3
    receiver.expect("late", DST_IDS, deadline)
    assert rec.wait("late", 3) == "deadline"
    assert deadline <= rec.times["late"] < deadline + 0.5
    assert not receiver.wait_layer("late", 0, 0)


@pytest.mark.parametrize("transport", ["tcp", "shm", "nixl"])
def test_deadline_mid_ticket_fails_both_sides_and_blocks_stay_put(transport, make_receiver, make_sender):
    src, dst = make_cache(seed=3), make_cache()
    receiver, rec = make_receiver(dst, transport)
    receiver.expect("t", DST_IDS, time.monotonic() + 0.5)
    ticket = make_sender(layout_of(src)).start_ticket(receiver.endpoint, "t", len(SRC_IDS))
    ticket.send_layer(0, src, SRC_IDS)
    assert rec.wait("t", 3) == "deadline"
    before = checksum(dst, list(range(dst.num_blocks)))
    assert ticket.wait(3) is False  # the receiver told the sender, which frees its blocks now
    assert "deadline" in ticket.error
    ticket2 = make_sender(layout_of(src)).start_ticket(receiver.endpoint, "t-again", len(SRC_IDS))
    for layer in range(3):  # frames for the dead ticket would be discarded; prove nothing moved
        ticket2.send_layer(layer, src, SRC_IDS)
    ticket2.finish()
    assert not ticket2.wait(3)
    assert checksum(dst, list(range(dst.num_blocks))) == before


def test_cancel_during_an_inflight_payload_stops_all_writes(make_receiver):
    src, dst = make_cache(seed=4), make_cache()
    layout = layout_of(src)
    receiver, rec = make_receiver(dst, stall_timeout=5.0)
    receiver.expect("c", DST_IDS, time.monotonic() + 30)
    receiver.expect("sync", [25, 26], time.monotonic() + 30)
    ch, _ = raw_client(receiver, layout)
    body = payload(src, 0, SRC_IDS)
    half = len(body) // 2
    ch.send(layer_frame(layout, "c", 0, 0, 7))
    ch.sock.sendall(body[:half])
    deadline = time.monotonic() + 5
    while not dst.tensor[0, DST_IDS[0]].any():  # the receiver is inside the payload, writing blocks
        assert time.monotonic() < deadline
        time.sleep(0.005)
    receiver.cancel("c")
    others = [b for b in range(dst.num_blocks) if b not in (25, 26)]
    frozen = checksum(dst, others)
    # The late writer carries on: the rest of the payload, another layer, done.
    ch.sock.sendall(body[half:])
    ch.send(layer_frame(layout, "c", 1, 0, 7), [memoryview(payload(src, 1, SRC_IDS))])
    ch.send(Done(ticket_id="c"))
    # A ticket behind them on the same stream completes: everything before it was read and discarded.
    ch.send(layer_frame(layout, "sync", 0, 0, 2), [memoryview(payload(src, 0, [1, 2]))])
    for layer in (1, 2):
        ch.send(layer_frame(layout, "sync", layer, 0, 2), [memoryview(payload(src, layer, [1, 2]))])
    ch.send(Done(ticket_id="sync"))
    assert rec.wait("sync") == ""
    assert checksum(dst, others) == frozen
    assert "c" not in rec.outcomes  # cancel is the caller's own decision: no on_failed
    assert receiver.stats.bytes_discarded > 0
    acks = []
    while not any(a.ticket_id == "sync" for a in acks):
        acks.append(ch.read_frame(5))
    assert any(isinstance(a, Ack) and a.ticket_id == "c" and "cancelled" in a.error for a in acks)
    ch.close()


@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_cancel_between_layers_fails_the_sender_and_freezes_blocks(transport, make_receiver, make_sender):
    src, dst = make_cache(seed=5), make_cache()
    receiver, rec = make_receiver(dst, transport)
    receiver.expect("c", DST_IDS, time.monotonic() + 30)
    ticket = make_sender(layout_of(src)).start_ticket(receiver.endpoint, "c", len(SRC_IDS))
    ticket.send_layer(0, src, SRC_IDS)
    assert receiver.wait_layer("c", 0, 5)
    receiver.cancel("c")
    frozen = checksum(dst, list(range(dst.num_blocks)))
    for layer in (1, 2):
        ticket.send_layer(layer, src, SRC_IDS)
    ticket.finish()
    assert not ticket.wait(5)
    assert "cancelled" in ticket.error
    assert checksum(dst, list(range(dst.num_blocks))) == frozen
    assert not receiver.wait_layer("c", 0, 0)


@pytest.mark.parametrize("transport", ["tcp", "shm", "nixl"])
def test_receiver_gone_fails_the_sender_fast(transport, make_receiver, make_sender):
    src = make_cache(seed=6)
    receiver, _ = make_receiver(make_cache(), transport)
    receiver.expect("t", DST_IDS, time.monotonic() + 30)
    ticket = make_sender(layout_of(src)).start_ticket(receiver.endpoint, "t", len(SRC_IDS))
    ticket.send_layer(0, src, SRC_IDS)
    receiver.close()
    t0 = time.monotonic()
    assert not ticket.wait(5)
    assert time.monotonic() - t0 < 2
    assert "closed" in ticket.error  # either the receiver's last word on the ticket or the dropped connection


def test_no_ack_after_done_fails_the_sender_within_its_timeout(make_sender):
    """A receiver that swallows bytes but never confirms: the sender still lets go of its blocks."""
    src = make_cache(seed=7)
    layout = layout_of(src)
    server = socket.create_server(("127.0.0.1", 0))

    def black_hole() -> None:
        sock, _ = server.accept()
        ch = Channel(sock, send_timeout=5)
        hello, nonce = server_hello(ch, layout, SECRET, "hole", 5)
        server_ack(ch, SECRET, nonce, hello, HelloAck(node_id="hole", idle_timeout=2.0, mac=b""))
        try:
            while sock.recv(1 << 16):
                pass
        except OSError:
            pass
        sock.close()

    th = threading.Thread(target=black_hole, daemon=True)
    th.start()
    sender = make_sender(layout, timeout=0.5)
    ticket = sender.start_ticket(f"tcp://127.0.0.1:{server.getsockname()[1]}", "t", 2)
    for layer in range(3):
        ticket.send_layer(layer, src, [0, 1])
    ticket.finish()
    assert not ticket.wait(5)
    assert "no completion ack" in ticket.error
    sender.close()
    th.join(5)
    server.close()
