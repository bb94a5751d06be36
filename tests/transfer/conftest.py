"""Shared pieces for the KV transfer tests: a tiny model shape, caches, receivers that close themselves,
and a recorder for the receiver's callbacks."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import torch

from splitserve.core.model_spec import ModelSpec
from splitserve.model.kv_cache import PagedKVCache
from splitserve.transfer import KVLayout, KVReceiver, KVSender
from splitserve.transfer.channel import Channel, parse_endpoint
from splitserve.transfer.frames import HelloAck
from splitserve.transfer.handshake import client_handshake

SECRET = b"test-secret"
FINGERPRINT = "tiny-fp"
TINY = ModelSpec(
    vocab_size=32, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8,
    rms_norm_eps=1e-6, rope_theta=10000.0, rope_scaling=None, max_position_embeddings=256,
    tie_word_embeddings=True, attention_bias=False, architecture="llama",
)
STALL = 0.5  # receivers in tests give up on silent peers fast; the default (2 s) has its own test


def make_cache(dtype: torch.dtype = torch.float32, num_blocks: int = 32, block_size: int = 4, seed: int | None = None) -> PagedKVCache:
    cache = PagedKVCache(TINY, num_blocks, block_size, dtype, "cpu")
    if seed is not None:
        cache.tensor.copy_(torch.randn(cache.tensor.shape, generator=torch.Generator().manual_seed(seed)))
    return cache


def layout_of(cache: PagedKVCache, fingerprint: str = FINGERPRINT) -> KVLayout:
    return KVLayout.from_cache(cache, fingerprint)


def assert_landed(src: PagedKVCache, src_ids: list[int], dst: PagedKVCache, dst_ids: list[int]) -> None:
    for layer in range(src.tensor.shape[0]):
        a = src.tensor[layer, src_ids].contiguous().view(torch.uint8)
        b = dst.tensor[layer, dst_ids].contiguous().view(torch.uint8)
        assert torch.equal(a, b), f"layer {layer} differs"


def checksum(cache: PagedKVCache, ids: list[int]) -> bytes:
    return cache.tensor[:, ids].contiguous().view(torch.uint8).numpy().tobytes()


class Recorder:
    """Collects on_complete / on_failed calls; wait() blocks until a ticket has an outcome."""

    def __init__(self, receiver: KVReceiver) -> None:
        self.outcomes: dict[str, str] = {}  # ticket -> "" (complete) or cause
        self.times: dict[str, float] = {}
        self.first_tokens: dict[str, int | None] = {}
        self._cond = threading.Condition()
        receiver.on_complete = self._complete
        receiver.on_failed = self._record

    def _complete(self, ticket_id: str, first_token: int | None) -> None:
        self.first_tokens[ticket_id] = first_token
        self._record(ticket_id, "")

    def _record(self, ticket_id: str, cause: str) -> None:
        with self._cond:
            assert ticket_id not in self.outcomes, f"two outcomes for {ticket_id}"
            self.outcomes[ticket_id] = cause
            self.times[ticket_id] = time.monotonic()
            self._cond.notify_all()

    def wait(self, ticket_id: str, timeout: float = 5.0) -> str | None:
        with self._cond:
            self._cond.wait_for(lambda: ticket_id in self.outcomes, timeout)
            return self.outcomes.get(ticket_id)


@pytest.fixture
def make_receiver():
    made: list[KVReceiver] = []

    def make(cache: PagedKVCache, transport: str = "tcp", secret: bytes = SECRET, layout: KVLayout | None = None, **kw) -> tuple[KVReceiver, Recorder]:
        kw.setdefault("stall_timeout", STALL)
        r = KVReceiver(cache, layout or layout_of(cache), secret, transport=transport, **kw)
        rec = Recorder(r)
        r.start()
        made.append(r)
        return r, rec

    yield make
    for r in made:
        r.close()


@pytest.fixture
def make_sender():
    made: list[KVSender] = []

    def make(layout: KVLayout, secret: bytes = SECRET, **kw) -> KVSender:
        s = KVSender(layout, secret, **kw)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def raw_client(receiver: KVReceiver, layout: KVLayout, secret: bytes = SECRET, transport: str = "tcp") -> tuple[Channel, HelloAck]:
    """A hand-driven, authenticated connection: tests write exactly the frames (and faults) they want."""
    _, host, port = parse_endpoint(receiver.endpoint)
    ch = Channel(socket.create_connection((host, port), timeout=5), send_timeout=5)
    return ch, client_handshake(ch, layout, secret, "test-client", transport, timeout=5)


def closed_by_peer(sock: socket.socket, timeout: float = 5.0) -> bool:
    """True once the other end has closed: reads drain to EOF (or a reset)."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        return False
    return True
