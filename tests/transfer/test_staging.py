"""GPU staging, exercised on CPU: a fake device with a real one's asynchrony (copies happen only when their
event is waited on) stands in for CUDA, so only the CUDA calls themselves stay untested here. Layers go
through host buffers with an event each, both ways, and either side may be the "device" one."""

from __future__ import annotations

import time

import pytest
import torch

from splitserve.transfer.staging import FakeDevice, Staging, runs
from tests.transfer.conftest import assert_landed, layout_of, make_cache

SRC_IDS = [5, 6, 7, 2, 17, 9, 30, 11, 0]
DST_IDS = [1, 3, 4, 8, 9, 10, 20, 31, 12]


def test_runs_of_consecutive_blocks():
    assert runs([5, 6, 7, 2, 9, 10]) == [(0, 5, 3), (3, 2, 1), (4, 9, 2)]
    assert runs([]) == []


def test_a_staged_layer_holds_its_bytes_only_after_its_event():
    src = make_cache(seed=1)
    layout = layout_of(src)
    device = FakeDevice()
    staged = Staging(device, layout.block_bytes).stage(src, 1, SRC_IDS)
    want = src.tensor[1, SRC_IDS].contiguous().view(torch.uint8).reshape(len(SRC_IDS), -1).numpy()
    assert not (staged.array[0] == want).all()  # not yet: reading now would send garbage
    src.tensor.zero_()  # compute moves on; the copy was queued behind the layer, so it has what was there
    staged.wait()
    assert (staged.array[0] == want).all()
    assert device.compute_waits == 1 and device.events == 1


@pytest.mark.parametrize("transport", ["tcp", "shm"])
@pytest.mark.parametrize("sides", ["device->device", "cpu->device", "device->cpu"])
def test_layers_cross_through_staging_buffers(transport, sides, make_receiver, make_sender):
    src, dst = make_cache(seed=2), make_cache()
    original = src.tensor.clone()
    layout = layout_of(src)
    send_dev, recv_dev = FakeDevice(), FakeDevice()
    send_staging = Staging(send_dev, layout.block_bytes) if sides.startswith("device") else None
    recv_staging = Staging(recv_dev, layout.block_bytes) if sides.endswith("device") else None
    r_opts = {"slot_bytes": 4 * layout.block_bytes, "num_slots": 2} if transport == "shm" else {}
    receiver, rec = make_receiver(dst, transport, staging=recv_staging, **r_opts)
    receiver.expect("t", DST_IDS, time.monotonic() + 10)
    ticket = make_sender(layout, staging=send_staging, max_frame_bytes=4 * layout.block_bytes).start_ticket(
        receiver.endpoint, "t", len(SRC_IDS))
    for layer in range(layout.num_layers):
        ticket.send_layer(layer, src, SRC_IDS)
        if send_staging is not None:
            src.tensor[layer] = -1.0  # the next step overwrites the layer: the staged copy already has it
    ticket.finish(first_token=5)
    assert ticket.wait(5), ticket.error
    assert rec.outcomes["t"] == ""
    src.tensor.copy_(original)
    assert_landed(src, SRC_IDS, dst, DST_IDS)
    untouched = [b for b in range(dst.num_blocks) if b not in DST_IDS]
    assert not dst.tensor[:, untouched].any()
    if send_staging is not None:
        assert send_dev.events == send_dev.compute_waits == layout.num_layers  # an event per layer
    if recv_staging is not None:
        assert recv_dev.copies > 0 and not recv_dev._queued[recv_dev._done :]  # every copy waited for


def test_a_cancelled_ticket_gets_no_device_copy(make_receiver, make_sender):
    src, dst = make_cache(seed=3), make_cache()
    layout = layout_of(src)
    device = FakeDevice()
    receiver, _ = make_receiver(dst, staging=Staging(device, layout.block_bytes))
    receiver.expect("c", DST_IDS, time.monotonic() + 10)
    ticket = make_sender(layout).start_ticket(receiver.endpoint, "c", len(SRC_IDS))
    ticket.send_layer(0, src, SRC_IDS)
    assert receiver.wait_layer("c", 0, 5)
    copies = device.copies
    assert receiver.cancel("c")
    for layer in (1, 2):
        ticket.send_layer(layer, src, SRC_IDS)
    ticket.finish()
    assert not ticket.wait(5)
    assert device.copies == copies and not dst.tensor[1:].any()
