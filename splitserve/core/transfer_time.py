"""How long a prompt's KV takes to cross the link: the one formula that the router's cost model, the
simulator and the planner all use, so none of them can disagree with another about it.

Unpipelined: one message after the prefill ends, all of it exposed. Pipelined: layer i is sent while layer
i+1 is computed; each layer's message takes x = latency + bytes / layers / bandwidth on the wire. The first
can leave once the first layer is computed and the link is free; the last cannot land before the compute
ends plus one message. With c seconds of compute per layer and a free link, the last layer lands
max(x, L x - (L-1) c) after the compute ends: one layer's transfer when the link keeps up, the backlog
L (x - c) + c when it does not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Transfer:
    total_s: float  # the link's busy time: every message's latency and bytes
    exposed_s: float  # beyond the end of the prefill that produced the KV


def transfer_end(
    nbytes: float, bandwidth: float, latency_s: float, pipelined: bool, layers: int, *,
    compute_end: float, first_layer_end: float, link_free: float = -math.inf,
) -> float:
    """When the last byte lands, on a clock shared by the arguments: the prefill's compute ends at
    `compute_end`, its first layer at `first_layer_end`, and the link finishes earlier sends at `link_free`."""
    if nbytes <= 0:
        return compute_end
    if not pipelined:
        return max(compute_end, link_free) + latency_s + nbytes / bandwidth
    x = latency_s + nbytes / layers / bandwidth
    return max(max(first_layer_end, link_free) + layers * x, compute_end + x)


def transfer(
    nbytes: float, bandwidth: float, latency_s: float, pipelined: bool, layers: int, layer_compute_s: float = 0.0
) -> Transfer:
    """One prompt's KV over a free link, after a prefill of `layer_compute_s` per layer."""
    if nbytes <= 0:
        return Transfer(0.0, 0.0)
    end = transfer_end(
        nbytes, bandwidth, latency_s, pipelined, layers, compute_end=0.0, first_layer_end=-(layers - 1) * layer_compute_s
    )
    messages = layers if pipelined else 1
    return Transfer(messages * latency_s + nbytes / bandwidth, end)
