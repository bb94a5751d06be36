"""The wire format: a 4-byte big-endian header length, a msgpack header, then (layer frames over TCP only)
the raw bytes of `num_blocks` whole (layer, block) units. Over NIXL this socket is the control channel
only: KV bytes and their per-layer notifications go through the NIXL agents (see nixl_sender.py).

Every header is a tagged msgspec Struct, so decoding validates kinds, field names and types in one step;
anything else is a protocol violation and costs the peer its connection.
"""

from __future__ import annotations

import struct
from typing import Annotated, Union

import msgspec

PROTOCOL_VERSION = 2  # 2: nixl control frames and the device field
MAX_HEADER_BYTES = 64 * 1024
LENGTH = struct.Struct(">I")

Name = Annotated[str, msgspec.Meta(max_length=256)]
Text = Annotated[str, msgspec.Meta(max_length=4096)]
Count = Annotated[int, msgspec.Meta(ge=0, le=1 << 40)]
Address = Annotated[int, msgspec.Meta(ge=0, le=(1 << 63) - 1)]  # msgspec bounds stop at int64; user-space pointers fit
Nonce = Annotated[bytes, msgspec.Meta(min_length=16, max_length=64)]


class _Frame(msgspec.Struct, tag_field="kind", forbid_unknown_fields=True, frozen=True):
    pass


# Handshake, in order: challenge (receiver), hello (sender), then hello_ack or error (receiver).
class Challenge(_Frame, tag="challenge"):
    protocol_version: int
    nonce: Nonce


class Hello(_Frame, tag="hello"):
    protocol_version: int
    model_fingerprint: Name
    num_layers: Count
    block_size: Count
    kv_dtype: Name
    kv_layout: Name
    node_id: Name
    transport: Name
    nonce: Nonce
    mac: bytes
    device: Name = "cpu"  # where the sender's KV cache lives ("cpu", "cuda"): tcp/shm stage through host memory
    nixl_metadata: Annotated[bytes, msgspec.Meta(max_length=32768)] = b""  # nixl: the sender's agent metadata, for the receiver to send it notifications
    nixl_mem_types: tuple[Name, ...] = ()  # nixl: memory kinds the sender's backend can move ("DRAM", "VRAM")


class HelloAck(_Frame, tag="hello_ack"):
    node_id: Name
    idle_timeout: float  # the receiver drops a connection silent this long: senders heartbeat well inside it
    mac: bytes
    shm_name: Name = ""  # shm transport: the ring for this connection, `num_slots` slots of `slot_bytes`
    slot_bytes: Count = 0
    num_slots: Count = 0
    # nixl: the receiver's agent and its registered KV cache, [layer][block] of block_bytes each.
    nixl_metadata: Annotated[bytes, msgspec.Meta(max_length=32768)] = b""
    nixl_addr: Address = 0
    nixl_num_blocks: Count = 0
    nixl_mem: Name = ""
    nixl_dev: Count = 0


class Error(_Frame, tag="error"):
    message: Text


# Sender -> receiver.
class Layer(_Frame, tag="layer"):
    ticket_id: Name
    layer: Count
    first_block: Count  # index into the ticket's block list, not a block id
    num_blocks: Count
    dtype: Name
    block_shape: tuple[Count, ...]
    payload_len: Count
    slot: int = -1  # shm: the ring slot holding the payload; -1: the payload follows on the socket


class Done(_Frame, tag="done"):
    ticket_id: Name
    # The token the prefill worker sampled: the decode side needs it to start, and getting it with "KV
    # complete" in one frame means there is no moment where it has one but not the other.
    first_token: int | None = None


class Abort(_Frame, tag="abort"):
    ticket_id: Name
    reason: Text


class Heartbeat(_Frame, tag="heartbeat"):
    pass


class Landed(_Frame, tag="landed"):
    """nixl: the notification that rides on a layer's WRITE; the receiver sees it only after the bytes."""

    ticket_id: Name
    layer: Count


class Claim(_Frame, tag="claim"):
    """nixl: may this connection WRITE into the ticket's blocks? Asked before any WRITE is posted, so the
    receiver always knows which peer can still write a reservation."""

    ticket_id: Name


class Fenced(_Frame, tag="fenced"):
    """nixl: every WRITE this sender posted for the ticket is finished or cancelled, and it posts no more:
    the receiver may reuse the blocks."""

    ticket_id: Name


# Receiver -> sender.
class Ack(_Frame, tag="ack"):
    """A ticket's outcome: error "" means every byte landed and the receiver completed it."""

    ticket_id: Name
    error: Text = ""


class Credit(_Frame, tag="credit"):
    """shm: the receiver has copied a slot out; the sender may fill it again."""

    slot: Count


class Grant(_Frame, tag="grant"):
    """nixl: the claim is granted; WRITE layer l of the ticket's i-th block to block_ids[i] of layer l."""

    ticket_id: Name
    block_ids: tuple[Count, ...]


Frame = Union[Challenge, Hello, HelloAck, Error, Layer, Done, Abort, Heartbeat, Landed, Claim, Fenced, Ack, Credit, Grant]

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Frame)


class ProtocolError(Exception):
    """The peer broke the protocol: the connection cannot be trusted to stay in sync and is closed."""


def encode(frame: Frame) -> bytes:
    body = _encoder.encode(frame)
    return LENGTH.pack(len(body)) + body


def header_length(prefix: bytes | memoryview) -> int:
    (n,) = LENGTH.unpack(prefix)
    if not 0 < n <= MAX_HEADER_BYTES:
        raise ProtocolError(f"header length {n} outside 1..{MAX_HEADER_BYTES}")
    return n


def decode(body: bytes | memoryview) -> Frame:
    try:
        return _decoder.decode(body)
    except msgspec.DecodeError as e:  # ValidationError is a subclass
        raise ProtocolError(f"bad header: {e}") from None


def note(frame: Frame) -> bytes:
    """A frame as a NIXL notification (no length prefix: NIXL delivers whole messages)."""
    return _encoder.encode(frame)


def read_note(message: bytes) -> Frame:
    return decode(message)


def canonical(frame: Frame) -> bytes:
    """The bytes a handshake MAC covers: the frame without its mac field."""
    return _encoder.encode(msgspec.structs.replace(frame, mac=b""))
