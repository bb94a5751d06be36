"""Once per connection: agree on the KV layout and prove both ends hold the deployment secret.

    receiver -> challenge(nonce_r)
    sender   -> hello(layout..., nonce_s, mac_s = HMAC(secret, "client" | nonce_r | nonce_s | hello))
    receiver -> hello_ack(..., mac_r = HMAC(secret, "server" | nonce_r | nonce_s | ack))  or  error(why)

Both MACs cover both nonces and the whole message, so neither can be replayed on another connection
nor have its fields swapped. A mismatch is refused here, once, with a message naming both sides'
values, instead of every request failing later.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

import msgspec

from splitserve.transfer.channel import Channel
from splitserve.transfer.frames import PROTOCOL_VERSION, Challenge, Error, Frame, Hello, HelloAck, canonical
from splitserve.transfer.layout import KVLayout

TRANSPORTS = ("tcp", "shm", "nixl")


class HandshakeError(Exception):
    pass


def _mac(secret: bytes, role: bytes, nonce_r: bytes, nonce_s: bytes, frame: Frame) -> bytes:
    return hmac.new(secret, b"splitserve-kv/" + role + nonce_r + nonce_s + canonical(frame), hashlib.sha256).digest()


def client_handshake(ch: Channel, layout: KVLayout, secret: bytes, node_id: str, transport: str, timeout: float,
                     **offer: object) -> HelloAck:
    """The sender's side; raises HandshakeError when refused or when the receiver cannot prove the secret.
    `offer`: the transport's optional hello fields (device, NIXL agent metadata), covered by the MAC too."""
    challenge = ch.expect(Challenge, timeout)
    if isinstance(challenge, Error):
        raise HandshakeError(challenge.message)
    nonce = secrets.token_bytes(32)
    hello = Hello(
        protocol_version=PROTOCOL_VERSION,
        model_fingerprint=layout.model_fingerprint,
        num_layers=layout.num_layers,
        block_size=layout.block_size,
        kv_dtype=layout.dtype,
        kv_layout=layout.shape_str,
        node_id=node_id,
        transport=transport,
        nonce=nonce,
        mac=b"",
        **offer,
    )
    ch.send(msgspec.structs.replace(hello, mac=_mac(secret, b"client", challenge.nonce, nonce, hello)))
    reply = ch.expect(HelloAck, timeout)
    if isinstance(reply, Error):
        raise HandshakeError(reply.message)
    if not hmac.compare_digest(reply.mac, _mac(secret, b"server", challenge.nonce, nonce, reply)):
        raise HandshakeError(f"receiver {ch.peer} ({reply.node_id}) failed to prove the shared secret: wrong secret on one side")
    return reply


def server_hello(ch: Channel, layout: KVLayout, secret: bytes, node_id: str, timeout: float) -> tuple[Hello, bytes]:
    """The receiver's first half: returns the accepted hello and our nonce, or raises HandshakeError
    (the caller records it, then sends the message as an error frame)."""
    nonce = secrets.token_bytes(32)
    ch.send(Challenge(protocol_version=PROTOCOL_VERSION, nonce=nonce))
    hello = ch.expect(Hello, timeout)
    if isinstance(hello, Error):
        raise HandshakeError(f"sender {ch.peer} sent an error instead of hello: {hello.message}")
    problem = _refusal(hello, layout, secret, nonce, node_id)
    if problem:
        raise HandshakeError(problem)
    return hello, nonce


def server_ack(ch: Channel, secret: bytes, nonce: bytes, hello: Hello, ack: HelloAck) -> None:
    ch.send(msgspec.structs.replace(ack, mac=_mac(secret, b"server", nonce, hello.nonce, ack)))


def _refusal(hello: Hello, layout: KVLayout, secret: bytes, nonce: bytes, node_id: str) -> str:
    who = f"sender {hello.node_id!r} -> receiver {node_id!r}"
    if hello.protocol_version != PROTOCOL_VERSION:
        return f"{who}: protocol version mismatch: sender {hello.protocol_version} != receiver {PROTOCOL_VERSION}"
    # Authenticate before describing our layout: an unauthenticated peer learns nothing about us.
    if not hmac.compare_digest(hello.mac, _mac(secret, b"client", nonce, hello.nonce, hello)):
        return f"{who}: authentication failed: the sender's HMAC does not match the receiver's secret"
    ours = {
        "model_fingerprint": layout.model_fingerprint,
        "num_layers": layout.num_layers,
        "block_size": layout.block_size,
        "kv_dtype": layout.dtype,
        "kv_layout": layout.shape_str,
    }
    diffs = [f"{k}: sender {getattr(hello, k)!r} != receiver {v!r}" for k, v in ours.items() if getattr(hello, k) != v]
    if hello.transport not in TRANSPORTS:
        diffs.append(f"transport: sender {hello.transport!r} not in receiver's {TRANSPORTS}")
    return f"{who}: KV layout mismatch: " + "; ".join(diffs) if diffs else ""
