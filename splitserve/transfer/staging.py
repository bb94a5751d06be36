"""KV in accelerator memory over the socket transports: each layer's blocks go through pinned host buffers,
copied on a side stream with an event per layer, so the compute stream is never synchronised.

Written against `Device`, a small interface (host buffers, a side stream that waits for compute, async
copies, events). `CudaDevice` is the real one; `FakeDevice` is a CPU one with the same behaviour that
matters, copies that happen only when their event is waited on, so tests on CPU exercise everything here
but the CUDA calls themselves: code that read a staging buffer before its event would read stale bytes.

Sender: stage(layer, blocks) on the engine thread queues device -> host copies behind the layer's compute
and returns at once; the writer thread waits for that layer's event, then sends from host memory.
Receiver: bytes land in a host buffer; land() copies them into the device blocks and waits for the copy's
event before returning, so when a ticket ends nothing is still being written into its blocks.
"""

from __future__ import annotations

import threading
from typing import Protocol, Sequence

import torch

from splitserve.model.kv_cache import PagedKVCache


class Event(Protocol):
    def synchronize(self) -> None: ...


class Device(Protocol):
    name: str

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        """uint8 host memory the device can copy to and from asynchronously (pinned on CUDA)."""

    def after_compute(self) -> None:
        """Order the side stream after everything the compute stream has queued so far."""

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Queue dst.copy_(src) on the side stream."""

    def record(self) -> Event:
        """An event that completes once every copy queued on the side stream so far has."""


class CudaDevice:
    """The real thing: pinned host memory, a side stream, CUDA events (untested here: no GPU)."""

    def __init__(self, device: torch.device) -> None:
        self.name = str(device)
        self._device = device
        self._stream = torch.cuda.Stream(device)

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def after_compute(self) -> None:
        self._stream.wait_stream(torch.cuda.current_stream(self._device))

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        with torch.cuda.stream(self._stream):
            dst.copy_(src, non_blocking=True)

    def record(self) -> Event:
        event = torch.cuda.Event()
        event.record(self._stream)
        return event


class _FakeEvent:
    def __init__(self, device: FakeDevice, upto: int) -> None:
        self._device, self._upto = device, upto

    def synchronize(self) -> None:
        self._device._run(self._upto)


class FakeDevice:
    """A CPU stand-in with a device's asynchrony: copies queue up and run, in order, only when an event
    recorded after them is waited on. Counts what it did, for tests."""

    def __init__(self) -> None:
        self.name = "fake"
        self._lock = threading.Lock()
        self._queued: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._done = 0
        self.host_buffers = 0
        self.copies = 0
        self.compute_waits = 0
        self.events = 0

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        self.host_buffers += 1
        return torch.full((nbytes,), 0xAB, dtype=torch.uint8)  # garbage until a copy lands

    def after_compute(self) -> None:
        self.compute_waits += 1

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        with self._lock:
            # The source as it is now: a real stream copies what compute wrote before after_compute().
            self._queued.append((dst, src.clone()))

    def record(self) -> Event:
        with self._lock:
            self.events += 1
            return _FakeEvent(self, len(self._queued))

    def _run(self, upto: int) -> None:
        with self._lock:
            while self._done < upto:
                dst, src = self._queued[self._done]
                dst.copy_(src)
                self._queued[self._done] = (dst, src[:0])  # done: drop the snapshot
                self._done += 1
                self.copies += 1


def device_for(tensor: torch.Tensor) -> Device | None:
    """The staging device a cache needs: None for host memory (sockets read and write it directly)."""
    return CudaDevice(tensor.device) if tensor.device.type == "cuda" else None


class StagedLayer:
    """One layer's blocks of one ticket on their way to host memory: the writer waits, then sends `host`
    as blocks 0..k-1 of a one-layer host cache."""

    def __init__(self, host: torch.Tensor, event: Event, num_blocks: int, block_bytes: int) -> None:
        self.host = host
        self.event = event
        self.array = host[: num_blocks * block_bytes].view(1, num_blocks, block_bytes).numpy()
        self.num_blocks = num_blocks
        self.block_bytes = block_bytes

    def wait(self) -> None:
        self.event.synchronize()

    def views(self, layer: int, block_ids: Sequence[int]) -> list[memoryview]:
        """Blocks of the staged layer (`layer` is ignored: there is one), in the CacheBytes interface."""
        flat = memoryview(self.array.reshape(-1))
        bb = self.block_bytes
        return [flat[i * bb : (i + 1) * bb] for i in block_ids]


class Staging:
    """Host <-> device copies of whole blocks for one KV cache layout."""

    def __init__(self, device: Device, block_bytes: int) -> None:
        self.device = device
        self.block_bytes = block_bytes

    def stage(self, cache: PagedKVCache, layer: int, block_ids: Sequence[int]) -> StagedLayer:
        """Engine thread, right after `layer` was computed: queue its blocks' copy to host memory."""
        k = len(block_ids)
        host = self.device.host_buffer(k * self.block_bytes)
        blocks = host[: k * self.block_bytes].view(k, self.block_bytes)
        self.device.after_compute()
        for at, start, n in runs(block_ids):  # one copy per run of consecutive blocks, no gather kernel
            self.device.copy(blocks[at : at + n], self._bytes(cache, layer, start, n))
        return StagedLayer(host, self.device.record(), k, self.block_bytes)

    def land(self, cache: PagedKVCache, layer: int, block_ids: Sequence[int], host: torch.Tensor) -> None:
        """Copy k received blocks from host memory into the device cache and wait until they are there."""
        k = len(block_ids)
        src = host[: k * self.block_bytes].view(k, self.block_bytes)
        for at, start, n in runs(block_ids):
            self.device.copy(self._bytes(cache, layer, start, n), src[at : at + n])
        self.device.record().synchronize()

    def _bytes(self, cache: PagedKVCache, layer: int, start: int, n: int) -> torch.Tensor:
        return cache.tensor[layer, start : start + n].view(torch.uint8).reshape(n, self.block_bytes)


def runs(block_ids: Sequence[int]) -> list[tuple[int, int, int]]:
    """(index into block_ids, first block id, length) of each run of consecutive ids."""
    out: list[tuple[int, int, int]] = []
    for i, b in enumerate(int(x) for x in block_ids):
        if out and out[-1][1] + out[-1][2] == b:
            at, start, n = out[-1]
            out[-1] = (at, start, n + 1)
        else:
            out.append((i, b, 1))
    return out
