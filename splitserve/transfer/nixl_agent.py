"""NIXL as the KV transport sees it: one agent, registered KV caches, WRITEs of whole blocks, notifications.

Imported only when a process asks for `--transfer nixl`: the default path never loads NIXL (an optional
extra, `splitserve[nixl]`). Everything NIXL-specific the receiver and sender need goes through here, so
that those files deal in block ids and tickets, not in descriptor lists.
"""

from __future__ import annotations

import importlib
import importlib.util
import uuid
from dataclasses import dataclass
from typing import Any, Sequence

import torch

# The PyPI wheels are named per CUDA major version; a source build imports as plain `nixl`.
_MODULES = ("nixl_cu12", "nixl_cu13", "nixl")
BACKEND = "UCX"


def module_name() -> str | None:
    """The importable NIXL module, or None, without importing it (start-up lines and refusals use this)."""
    for name in _MODULES:
        if importlib.util.find_spec(name) is not None:
            return name
    return None


def _nixl() -> Any:
    name = module_name()
    if name is None:
        raise RuntimeError("--transfer nixl needs NIXL: pip install 'splitserve[nixl]' (nixl-cu12)")
    return importlib.import_module(name)


@dataclass(frozen=True)
class Region:
    """A registered KV cache: `num_layers` x `num_blocks` blocks of `block_bytes`, from `addr`."""

    addr: int
    num_blocks: int
    block_bytes: int
    mem: str  # "DRAM" or "VRAM"
    dev: int  # CUDA device index for VRAM, 0 for DRAM

    def block_addr(self, layer: int, block: int) -> int:
        return self.addr + (layer * self.num_blocks + block) * self.block_bytes


def mem_type(tensor: torch.Tensor) -> tuple[str, int]:
    return ("VRAM", tensor.device.index or 0) if tensor.device.type == "cuda" else ("DRAM", 0)


class NixlAgent:
    """One NIXL agent with the UCX backend. Thread-safe (strict sync): receivers poll notifications on one
    thread while connection threads add peers; a sender's writer threads post and poll WRITEs."""

    def __init__(self, prefix: str) -> None:
        nixl = _nixl()
        # A fresh name per agent: a restarted worker must not be mistaken for its dead predecessor.
        self.name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        config = nixl.nixl_agent_config(backends=[BACKEND], sync_mode=nixl.nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT)
        self._agent = nixl.nixl_agent(self.name, config)
        if BACKEND not in self._agent.backends:
            raise RuntimeError(f"NIXL agent {self.name} has no {BACKEND} backend (plugins: {self._agent.plugin_list})")
        self._registered: dict[int, Region] = {}

    @property
    def mem_types(self) -> tuple[str, ...]:
        # NIXL names them "DRAM_SEG", "VRAM_SEG"...; the handshake speaks "DRAM", "VRAM".
        return tuple(str(m).removesuffix("_SEG") for m in self._agent.get_backend_mem_types(BACKEND))

    def register(self, cache: torch.Tensor, block_bytes: int) -> Region:
        """Register a [layer, block, ...] cache tensor once; later calls return the same region."""
        addr = cache.data_ptr()
        region = self._registered.get(addr)
        if region is None:
            if not cache.is_contiguous():
                raise ValueError("NIXL registers a contiguous KV cache")
            mem, dev = mem_type(cache)
            self._agent.register_memory([(addr, cache.numel() * cache.element_size(), dev, "")], mem)
            region = self._registered[addr] = Region(addr, cache.shape[1], block_bytes, mem, dev)
        return region

    def metadata(self) -> bytes:
        return self._agent.get_agent_metadata()

    def add_peer(self, metadata: bytes) -> str:
        name = self._agent.add_remote_agent(metadata)
        return name.decode() if isinstance(name, bytes) else name

    def remove_peer(self, name: str) -> None:
        try:
            self._agent.remove_remote_agent(name)
        except Exception:  # already gone (NIXL raises its own error types): nothing to undo
            pass

    def write(self, src: Region, dst: Region, layer: int, src_ids: Sequence[int], dst_ids: Sequence[int],
              peer: str, notif: bytes) -> Any:
        """Post one WRITE of `layer`'s blocks src_ids -> the peer's dst_ids; `notif` reaches the peer after the
        bytes. Returns the handle for state() and cancel()."""
        bb = src.block_bytes
        local = self._agent.get_xfer_descs([(src.block_addr(layer, i), bb, src.dev) for i in src_ids], src.mem)
        remote = self._agent.get_xfer_descs([(dst.block_addr(layer, i), bb, dst.dev) for i in dst_ids], dst.mem)
        handle = self._agent.initialize_xfer("WRITE", local, remote, peer, notif)
        if self._agent.transfer(handle) == "ERR":
            self.cancel(handle)
            raise ConnectionError(f"NIXL refused to post a WRITE to {peer}")
        return handle

    def state(self, handle: Any) -> str:
        """"DONE", "PROC" or "ERR"."""
        return self._agent.check_xfer_state(handle)

    def cancel(self, handle: Any) -> bool:
        """Release a handle, cancelling it if still in flight; False if NIXL could not (it may still land)."""
        try:
            self._agent.release_xfer_handle(handle)
            return True
        except Exception:  # NIXL's error types live in its bindings: any failure means "not released"
            return False

    def notify(self, peer: str, message: bytes) -> None:
        self._agent.send_notif(peer, message)

    def notifications(self) -> dict[str, list[bytes]]:
        """New notifications by sender agent name, each at most once."""
        return {(k.decode() if isinstance(k, bytes) else k): v for k, v in self._agent.get_new_notifs().items()}
