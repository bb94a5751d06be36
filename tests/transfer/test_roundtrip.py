"""KV bytes land byte for byte in the ticket's blocks, over every transport, however tickets interleave."""

from __future__ import annotations

import math
import threading
import time

import pytest
import torch

from splitserve.transfer.nixl_agent import module_name
from tests.transfer.conftest import assert_landed, layout_of, make_cache

NIXL = pytest.param("nixl", marks=pytest.mark.skipif(module_name() is None, reason="NIXL not installed (make test installs it)"))

SRC_IDS = [5, 2, 17, 9, 30, 11, 0]
DST_IDS = [1, 3, 4, 8, 20, 31, 12]


def small_frames(transport: str, block_bytes: int) -> tuple[dict, dict]:
    """Receiver and sender options that cut each 7-block layer into 3 frames."""
    if transport == "shm":
        return {"slot_bytes": 3 * block_bytes, "num_slots": 2}, {}
    return {}, {"max_frame_bytes": 3 * block_bytes}


@pytest.mark.parametrize("transport", ["tcp", "shm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layers_land_in_other_block_ids(transport, dtype, make_receiver, make_sender):
    src, dst = make_cache(dtype, seed=1), make_cache(dtype)
    layout = layout_of(src)
    r_opts, s_opts = small_frames(transport, layout.block_bytes)
    receiver, rec = make_receiver(dst, transport, **r_opts)
    assert receiver.endpoint.startswith(f"{transport}://")
    receiver.expect("t", DST_IDS, time.monotonic() + 10)
    ticket = make_sender(layout, **s_opts).start_ticket(receiver.endpoint, "t", len(SRC_IDS))
    for layer in range(layout.num_layers):
        assert not receiver.wait_layer("t", layer, 0.01)
        ticket.send_layer(layer, src, SRC_IDS)
        assert receiver.wait_layer("t", layer, 5)
    ticket.finish(first_token=1234)
    assert ticket.wait(5), ticket.error
    assert rec.outcomes["t"] == ""  # on_complete runs before the sender hears the ack
    assert rec.first_tokens["t"] == 1234
    assert_landed(src, SRC_IDS, dst, DST_IDS)
    untouched = [b for b in range(dst.num_blocks) if b not in DST_IDS]
    assert not dst.tensor[:, untouched].any()
    expected = layout.num_layers * len(SRC_IDS) * layout.block_bytes
    assert ticket.bytes_sent == receiver.stats.bytes_received == expected
    assert receiver.stats.frames >= layout.num_layers * 3 + 1
    times = ticket.layer_sent_times
    assert not any(map(math.isnan, times)) and times == sorted(times)
    assert receiver.wait_layer("t", 0, 0)  # a completed ticket stays answerable


@pytest.mark.parametrize("transport", ["tcp", "shm", NIXL])
def test_interleaved_tickets_share_one_connection(transport, make_receiver, make_sender):
    src, dst = make_cache(seed=2, num_blocks=40), make_cache(num_blocks=40)
    layout = layout_of(src)
    r_opts, s_opts = small_frames(transport, layout.block_bytes)
    receiver, rec = make_receiver(dst, transport, **r_opts)
    sender = make_sender(layout, **s_opts)
    plans = {f"t{i}": (list(range(i * 10, i * 10 + 7)), list(range(39 - i * 10, 32 - i * 10, -1))) for i in range(4)}
    tickets = {}
    for tid, (src_ids, dst_ids) in plans.items():
        receiver.expect(tid, dst_ids, time.monotonic() + 10)
        tickets[tid] = sender.start_ticket(receiver.endpoint, tid, len(src_ids))
    receiver.expect("never-claimed", [0], time.monotonic() + 10)
    assert receiver.cancel("never-claimed")  # no peer was granted it: nothing can write it
    for layer in range(layout.num_layers):
        for tid, (src_ids, _) in plans.items():
            tickets[tid].send_layer(layer, src, src_ids)
    for tid in reversed(plans):
        tickets[tid].finish()
    for tid, (src_ids, dst_ids) in plans.items():
        assert tickets[tid].wait(5), tickets[tid].error
        assert rec.wait(tid) == ""
        assert_landed(src, src_ids, dst, dst_ids)
    assert receiver.stats.connections_accepted == 1
    if transport == "nixl":  # a NIXL ticket starts with a claim round trip: one after the end is refused at once
        late = sender.start_ticket(receiver.endpoint, "never-claimed", 1)
        assert not late.wait(5) and "cancelled" in late.error


@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_many_senders_one_receiver(transport, make_receiver, make_sender):
    dst = make_cache(num_blocks=40)
    receiver, rec = make_receiver(dst, transport)
    sources = [make_cache(seed=10 + i, num_blocks=8) for i in range(4)]
    errors: list[str | None] = [None] * 4

    def run(i: int) -> None:
        ticket = make_sender(layout_of(sources[i]), node_id=f"prefill-{i}").start_ticket(receiver.endpoint, f"s{i}", 8)
        for layer in range(3):
            ticket.send_layer(layer, sources[i], list(range(8)))
        ticket.finish()
        errors[i] = None if ticket.wait(5) else ticket.error or "timeout"

    for i in range(4):
        receiver.expect(f"s{i}", list(range(i * 10, i * 10 + 8)), time.monotonic() + 10)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(10)
    assert errors == [None] * 4
    for i in range(4):
        assert rec.wait(f"s{i}") == ""
        assert_landed(sources[i], list(range(8)), dst, list(range(i * 10, i * 10 + 8)))
    assert receiver.stats.connections_accepted == 4


def test_ticket_without_blocks_completes_on_done(make_receiver, make_sender):
    cache = make_cache()
    receiver, rec = make_receiver(cache)
    receiver.expect("empty", [], time.monotonic() + 5)
    ticket = make_sender(layout_of(cache)).start_ticket(receiver.endpoint, "empty", 0)
    for layer in range(3):
        ticket.send_layer(layer, cache, [])
    ticket.finish()
    assert ticket.wait(5), ticket.error
    assert rec.wait("empty") == ""


def test_sender_abort_reaches_the_receiver(make_receiver, make_sender):
    src, dst = make_cache(seed=3), make_cache()
    receiver, rec = make_receiver(dst)
    receiver.expect("a", DST_IDS, time.monotonic() + 5)
    ticket = make_sender(layout_of(src)).start_ticket(receiver.endpoint, "a", len(SRC_IDS))
    ticket.send_layer(0, src, SRC_IDS)
    ticket.abort("prefill OOM")
    assert not ticket.wait(5)
    assert ticket.error == "aborted: prefill OOM"
    assert rec.wait("a") == "sender_abort:prefill OOM"
    assert not receiver.wait_layer("a", 2, 0)
    with pytest.raises(RuntimeError):
        ticket.send_layer(1, src, SRC_IDS)


def test_done_before_every_layer_fails_both_sides(make_receiver, make_sender):
    src, dst = make_cache(seed=4), make_cache()
    receiver, rec = make_receiver(dst)
    receiver.expect("short", DST_IDS, time.monotonic() + 5)
    ticket = make_sender(layout_of(src)).start_ticket(receiver.endpoint, "short", len(SRC_IDS))
    ticket.send_layer(0, src, SRC_IDS)
    ticket.finish()
    assert not ticket.wait(5)
    assert "before every block" in ticket.error
    assert rec.wait("short") == "malformed"


def test_unknown_ticket_fails_the_sender_fast_and_writes_nothing(make_receiver, make_sender):
    src, dst = make_cache(seed=5), make_cache()
    receiver, rec = make_receiver(dst)
    ticket = make_sender(layout_of(src)).start_ticket(receiver.endpoint, "nobody-expects-me", len(SRC_IDS))
    for layer in range(3):
        ticket.send_layer(layer, src, SRC_IDS)
    ticket.finish()
    assert not ticket.wait(5)
    assert "unknown" in ticket.error
    assert not dst.tensor.any()
    assert receiver.stats.bytes_received == 0


def test_bad_arguments_are_refused_up_front(make_receiver, make_sender):
    src, dst = make_cache(seed=6), make_cache()
    receiver, _ = make_receiver(dst)
    with pytest.raises(ValueError):
        receiver.expect("dup-ids", [1, 1], time.monotonic() + 5)
    with pytest.raises(ValueError):
        receiver.expect("out-of-range", [32], time.monotonic() + 5)
    receiver.expect("ok", [1, 2], time.monotonic() + 5)
    with pytest.raises(ValueError):
        receiver.expect("ok", [3, 4], time.monotonic() + 5)
    ticket = make_sender(layout_of(src)).start_ticket(receiver.endpoint, "ok", 2)
    with pytest.raises(ValueError):
        ticket.send_layer(0, src, [1])  # wrong count
    with pytest.raises(ValueError):
        ticket.send_layer(3, src, [1, 2])  # no such layer
    with pytest.raises(ValueError):
        ticket.send_layer(0, make_cache(torch.bfloat16), [1, 2])  # not the handshaken layout
