"""The shm transport's ring: one shared-memory segment per connection, cut into fixed slots.

The receiver creates and owns it; the sender fills a free slot, names it in a layer header sent over
the socket, and may reuse it only after the receiver's credit says the bytes were copied out. The
receiver copies slots into KV blocks itself, so a late or stalled sender can only ever touch the ring.
"""

from __future__ import annotations

import mmap
import os
import queue
from multiprocessing.shared_memory import SharedMemory

import numpy as np

from splitserve.transfer.frames import ProtocolError

DEFAULT_SLOT_BYTES = 4 << 20
DEFAULT_NUM_SLOTS = 8


class _Ring:
    def __init__(self, buf: memoryview | mmap.mmap, name: str, num_slots: int, slot_bytes: int) -> None:
        if len(buf) < num_slots * slot_bytes:
            raise ValueError(f"shared memory {name} holds {len(buf)} bytes, want {num_slots} x {slot_bytes}")
        self.name = name
        self.num_slots = num_slots
        self.slot_bytes = slot_bytes
        self._slots: np.ndarray | None = np.ndarray((num_slots, slot_bytes), np.uint8, buf)

    def slot(self, i: int, num_blocks: int, block_bytes: int) -> np.ndarray:
        """Slot `i`'s first num_blocks blocks as uint8 [num_blocks, block_bytes]."""
        return self._slots[i, : num_blocks * block_bytes].reshape(num_blocks, block_bytes)

    def close(self) -> None:
        self._slots = None
        try:
            self._unmap()
        except BufferError:
            pass  # a view still lives in a pending traceback; the mapping goes when it is collected


class ReceiverRing(_Ring):
    def __init__(self, num_slots: int, slot_bytes: int) -> None:
        self._shm = SharedMemory(create=True, size=num_slots * slot_bytes)
        super().__init__(self._shm.buf, self._shm.name, num_slots, slot_bytes)
        self._linked = True

    def unlink(self) -> None:
        """Remove the name once the sender has mapped it: nothing leaks in /dev/shm if either side dies."""
        if self._linked:
            self._linked = False
            self._shm.unlink()

    def close(self) -> None:
        self.unlink()
        super().close()

    def _unmap(self) -> None:
        self._shm.close()


class SenderRing(_Ring):
    def __init__(self, name: str, num_slots: int, slot_bytes: int) -> None:
        # Mapped directly rather than through SharedMemory, which (before Python 3.13) registers an
        # attached segment with this process's resource tracker: the tracker would then unlink the
        # receiver's segment, or complain it leaked, when we exit. Linux: POSIX shm lives in /dev/shm.
        fd = os.open(os.path.join("/dev/shm", name.lstrip("/")), os.O_RDWR)
        try:
            self._mmap = mmap.mmap(fd, num_slots * slot_bytes)
        finally:
            os.close(fd)
        super().__init__(self._mmap, name, num_slots, slot_bytes)
        self._free: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        self._in_use: set[int] = set()
        for i in range(num_slots):
            self._free.put(i)

    def acquire(self, timeout: float) -> int:
        try:
            slot = self._free.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no ring slot freed by the receiver within {timeout:.1f}s") from None
        if slot is None:
            raise ConnectionError("connection lost while waiting for a ring slot")
        self._in_use.add(slot)
        return slot

    def release(self, slot: int) -> None:
        if slot not in self._in_use:
            raise ProtocolError(f"credit for slot {slot}, which the sender does not hold")
        self._in_use.discard(slot)
        self._free.put(slot)

    def wake(self) -> None:
        """Unblock a writer waiting in acquire(): the connection is gone."""
        self._free.put(None)

    def _unmap(self) -> None:
        self._mmap.close()
