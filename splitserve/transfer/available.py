"""Which KV transports this process can use, in one line for the start-up log (without loading NIXL)."""

from __future__ import annotations

from importlib import metadata

from splitserve.transfer.nixl_agent import BACKEND, module_name

TRANSPORTS = ("tcp", "shm", "nixl")


def nixl_version() -> str | None:
    name = module_name()
    if name is None:
        return None
    try:
        return metadata.version(name.replace("_", "-"))
    except metadata.PackageNotFoundError:
        return "source build"


def transports_line(chosen: str, device: str = "cpu") -> str:
    """E.g. "KV transport: nixl (available: tcp, shm, nixl 1.5.1/UCX; KV cache on cpu, DRAM)"."""
    version = nixl_version()
    nixl = f"nixl {version}/{BACKEND}" if version else "nixl not installed (pip install 'splitserve[nixl]')"
    if chosen == "nixl":
        memory = "VRAM" if device.startswith("cuda") else "DRAM"
    else:
        memory = "pinned host staging" if device.startswith("cuda") else "host memory"
    return f"KV transport: {chosen} (available: tcp, shm, {nixl}; KV cache on {device}, moved via {memory})"
