"""Mismatches are refused once, at connect time, naming both sides' values; the receiver keeps serving."""

from __future__ import annotations

import secrets
import socket
import threading
import time

import msgspec
import pytest
import torch

from splitserve.transfer import HandshakeError, KVLayout
from splitserve.transfer.channel import Channel, parse_endpoint
from splitserve.transfer.frames import PROTOCOL_VERSION, Challenge, Error, Hello, HelloAck
from splitserve.transfer.handshake import _mac, client_handshake
from tests.transfer.conftest import FINGERPRINT, SECRET, assert_landed, layout_of, make_cache


def good_ticket_completes(receiver, rec, make_sender, ticket_id: str) -> None:
    src, dst_ids = make_cache(seed=7), [3, 5, 7]
    receiver.expect(ticket_id, dst_ids, time.monotonic() + 5)
    ticket = make_sender(layout_of(src)).start_ticket(receiver.endpoint, ticket_id, 3)
    for layer in range(3):
        ticket.send_layer(layer, src, [0, 1, 2])
    ticket.finish()
    assert ticket.wait(5), ticket.error
    assert rec.wait(ticket_id) == ""
    return src


@pytest.mark.parametrize(
    "sender_cache, fingerprint, named",
    [
        (dict(), "other-model", ["'other-model'", f"'{FINGERPRINT}'", "model_fingerprint"]),
        (dict(block_size=8), FINGERPRINT, ["block_size: sender 8 != receiver 4", "kv_layout"]),
        (dict(dtype=torch.bfloat16), FINGERPRINT, ["kv_dtype: sender 'bfloat16' != receiver 'float32'"]),
    ],
    ids=["fingerprint", "block_size", "dtype"],
)
def test_layout_mismatch_is_refused_naming_both_values(sender_cache, fingerprint, named, make_receiver, make_sender):
    dst = make_cache()
    receiver, rec = make_receiver(dst)
    sender = make_sender(layout_of(make_cache(**sender_cache), fingerprint))
    with pytest.raises(HandshakeError) as err:
        sender.start_ticket(receiver.endpoint, "never", 3)
    for text in named:
        assert text in str(err.value)
    assert len(receiver.last_handshake_errors) == 1
    for text in named:
        assert text in receiver.last_handshake_errors[0]
    assert receiver.stats.handshakes_refused == 1
    src = good_ticket_completes(receiver, rec, make_sender, "after")
    assert_landed(src, [0, 1, 2], dst, [3, 5, 7])


def test_wrong_secret_is_refused_and_the_receiver_keeps_serving(make_receiver, make_sender):
    dst = make_cache()
    receiver, rec = make_receiver(dst)
    with pytest.raises(HandshakeError, match="authentication failed"):
        make_sender(layout_of(dst), secret=b"not-the-secret").start_ticket(receiver.endpoint, "never", 3)
    assert "authentication failed" in receiver.last_handshake_errors[-1]
    # An unauthenticated peer learns nothing about our layout.
    assert FINGERPRINT not in receiver.last_handshake_errors[-1]
    good_ticket_completes(receiver, rec, make_sender, "after")


def test_a_receiver_without_the_secret_is_not_trusted(make_sender):
    """Mutual: the sender checks the receiver's MAC too, so it never streams KV to an impostor."""
    server = socket.create_server(("127.0.0.1", 0))

    def impostor() -> None:
        sock, _ = server.accept()
        ch = Channel(sock, send_timeout=5)
        ch.send(Challenge(protocol_version=PROTOCOL_VERSION, nonce=secrets.token_bytes(32)))
        hello = ch.read_frame(5)
        ack = HelloAck(node_id="impostor", idle_timeout=2.0, mac=b"")
        ch.send(msgspec.structs.replace(ack, mac=_mac(b"guess", b"server", b"x" * 32, hello.nonce, ack)))
        time.sleep(0.5)
        ch.close()

    th = threading.Thread(target=impostor)
    th.start()
    sender = make_sender(layout_of(make_cache()))
    with pytest.raises(HandshakeError, match="failed to prove the shared secret"):
        sender.start_ticket(f"tcp://127.0.0.1:{server.getsockname()[1]}", "t", 1)
    th.join()
    server.close()


def _hello(layout: KVLayout, nonce_r: bytes, secret: bytes = SECRET, **changes) -> Hello:
    hello = Hello(
        protocol_version=PROTOCOL_VERSION, model_fingerprint=layout.model_fingerprint, num_layers=layout.num_layers,
        block_size=layout.block_size, kv_dtype=layout.dtype, kv_layout=layout.shape_str, node_id="hand",
        transport="tcp", nonce=secrets.token_bytes(32), mac=b"",
    )
    hello = msgspec.structs.replace(hello, **changes)
    return msgspec.structs.replace(hello, mac=_mac(secret, b"client", nonce_r, hello.nonce, hello))


def _open(receiver) -> tuple[Channel, Challenge]:
    _, host, port = parse_endpoint(receiver.endpoint)
    ch = Channel(socket.create_connection((host, port), timeout=5), send_timeout=5)
    return ch, ch.read_frame(5)


def test_a_hello_cannot_be_replayed_on_another_connection(make_receiver):
    cache = make_cache()
    receiver, _ = make_receiver(cache)
    first, challenge = _open(receiver)
    captured = _hello(layout_of(cache), challenge.nonce)
    second, _ = _open(receiver)
    second.send(captured)  # valid MAC, but bound to the first connection's nonce
    reply = second.read_frame(5)
    assert isinstance(reply, Error) and "authentication failed" in reply.message
    first.send(captured)
    assert isinstance(first.read_frame(5), HelloAck)
    first.close()
    second.close()


@pytest.mark.parametrize(
    "changes, named",
    [
        (dict(protocol_version=PROTOCOL_VERSION + 1), f"sender {PROTOCOL_VERSION + 1} != receiver {PROTOCOL_VERSION}"),
        (dict(transport="rdma"), "transport: sender 'rdma'"),
        (dict(num_layers=4), "num_layers: sender 4 != receiver 3"),
    ],
    ids=["version", "transport", "num_layers"],
)
def test_other_refusals_name_both_sides(changes, named, make_receiver):
    cache = make_cache()
    receiver, _ = make_receiver(cache)
    ch, challenge = _open(receiver)
    ch.send(_hello(layout_of(cache), challenge.nonce, **changes))
    reply = ch.read_frame(5)
    assert isinstance(reply, Error) and named in reply.message
    assert named in receiver.last_handshake_errors[-1]
    ch.close()


def test_client_handshake_surfaces_the_refusal(make_receiver):
    cache = make_cache()
    receiver, _ = make_receiver(cache)
    _, host, port = parse_endpoint(receiver.endpoint)
    ch = Channel(socket.create_connection((host, port), timeout=5), send_timeout=5)
    with pytest.raises(HandshakeError, match="num_layers: sender 2 != receiver 3"):
        client_handshake(ch, KVLayout(FINGERPRINT, 2, 4, 2, 8, "float32"), SECRET, "x", "tcp", 5)
    ch.close()
