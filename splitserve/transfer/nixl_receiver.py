"""The decode side of the NIXL transport: the registered KV cache, the agents of connected senders, and
the notifications that say a layer's WRITE has landed.

What NIXL does not give us is a fence: a WRITE is one-sided, so once a peer holds our cache's
registration it can write any block of it, and ending a ticket here does not stop a WRITE already
posted there. So a sender must claim a ticket before its first WRITE (the receiver then knows the one
peer that can still write those blocks), and a ticket that ends early stays quarantined until that peer
says `Fenced` (nothing posted for it is still in flight), or, if the peer is gone, for a grace period
past the sender's own WRITE timeout. The receiver's owner must not reuse a quarantined ticket's blocks.
"""

from __future__ import annotations

import logging

import torch

from splitserve.transfer.frames import Done, Frame, Hello, Landed, ProtocolError, read_note
from splitserve.transfer.handshake import HandshakeError
from splitserve.transfer.layout import KVLayout
from splitserve.transfer.nixl_agent import NixlAgent

log = logging.getLogger(__name__)


class NixlLanding:
    def __init__(self, cache: torch.Tensor, layout: KVLayout) -> None:
        self.agent = NixlAgent("kv-recv")
        self.region = self.agent.register(cache, layout.block_bytes)

    def accept(self, hello: Hello, receiver_id: str) -> str:
        """Add the sender's agent (it must be able to move our memory kind); returns its agent name."""
        who = f"sender {hello.node_id!r} ({hello.transport}, cache on {hello.device}) -> receiver {receiver_id!r}"
        if self.region.mem not in hello.nixl_mem_types:
            raise HandshakeError(f"{who}: the receiver's KV cache is {self.region.mem} but the sender's NIXL backend "
                                 f"moves only {list(hello.nixl_mem_types) or 'nothing'}")
        try:
            return self.agent.add_peer(hello.nixl_metadata)
        except Exception as e:  # NIXL's binding errors: bad or foreign metadata
            raise HandshakeError(f"{who}: cannot add the sender's NIXL agent: {e}") from e

    def ack_fields(self) -> dict:
        r = self.region
        return dict(nixl_metadata=self.agent.metadata(), nixl_addr=r.addr, nixl_num_blocks=r.num_blocks,
                    nixl_mem=r.mem, nixl_dev=r.dev)

    def drain(self) -> list[tuple[str, Frame | None]]:
        """New notifications as (sender agent, Landed or Done); None for one that does not parse."""
        out: list[tuple[str, Frame | None]] = []
        for peer, messages in self.agent.notifications().items():
            for m in messages:
                try:
                    f = read_note(m)
                except ProtocolError:
                    f = None
                out.append((peer, f if isinstance(f, (Landed, Done)) else None))
        return out
