"""KV transfer data plane: prefill workers stream each layer's KV blocks to decode workers.

Only KV bytes and per-ticket done/abort/ack travel here; reservations, tickets and first tokens go over
the control plane. Transports: "tcp" (default, across hosts) and "shm" (same host, via a ring buffer).
"""

from splitserve.transfer.handshake import HandshakeError
from splitserve.transfer.layout import KVLayout
from splitserve.transfer.receiver import KVReceiver, ReceiverStats
from splitserve.transfer.sender import KVSender, TicketSend

__all__ = ["HandshakeError", "KVLayout", "KVReceiver", "KVSender", "ReceiverStats", "TicketSend"]
