"""Accelerator and network presets for the performance model, from public datasheets.

Every number is a peak a vendor publishes; what a real kernel reaches is the performance model's business
(`perf.Efficiency`), fitted by `splitserve plan calibrate` where a machine is at hand.

Sources (figures are per GPU, dense, i.e. without 2:4 sparsity):
- H100 SXM5 80 GB: NVIDIA H100 Tensor Core GPU datasheet: BF16 1,979 TFLOPS with sparsity (989.4 dense),
  HBM3 3.35 TB/s, NVLink 900 GB/s (both directions together).
- H200 SXM 141 GB: NVIDIA H200 datasheet: BF16 1,979 TFLOPS with sparsity, HBM3e 4.8 TB/s, NVLink 900 GB/s.
- A100 SXM 80 GB: NVIDIA A100 datasheet: BF16 312 TFLOPS (624 with sparsity), HBM2e 2,039 GB/s,
  NVLink 600 GB/s.
- L40S 48 GB: NVIDIA L40S datasheet: BF16 362.05 TFLOPS (733 with sparsity), GDDR6 864 GB/s, no NVLink:
  PCIe Gen4 x16, 64 GB/s both directions.
- B200 180 GB: NVIDIA HGX B200 datasheet (8 GPUs: 36 PFLOPS FP16/BF16 with sparsity, 1.4 TB HBM3e,
  64 TB/s): 2.25 PFLOPS dense and 8 TB/s per GPU; NVLink 5 1.8 TB/s.
- Networks: line rates as named (Gbit/s / 8 = GB/s). RDMA presets assume one NIC per GPU (DGX H100: 8 x
  ConnectX-7 400 Gbit/s; DGX A100: 8 x HDR 200 Gbit/s, GPUDirect RDMA); Ethernet presets assume one NIC per
  node of 8 GPUs, shared by them, over TCP. Latencies are typical one-way message latencies.

GPU-hour prices are rough on-demand cloud figures (2025) for the cost columns and the heterogeneous search
(`DEFAULT_PRICES`); pass `--price H100=2.5`, `--prices-file` or `--gpu-hour-cost` to use your own.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

TERA = 1e12
GB = 1e9


class PresetError(ValueError):
    """An unknown preset name or a malformed description; the message lists what exists."""


@dataclass(frozen=True)
class Hardware:
    name: str
    flops: float  # peak dense FLOP/s for the model's dtype (bf16 unless calibrated otherwise)
    mem_bw: float  # peak memory bandwidth, bytes/s
    mem_bytes: float  # memory per GPU, bytes
    link_bw: float  # intra-node GPU-to-GPU bandwidth per direction, bytes/s (tensor-parallel all-reduce)
    link_latency_s: float = 5e-6
    gpus_per_node: int = 8
    gpu_hour_cost: float = 0.0  # USD; 0 = unknown
    source: str = ""

    def describe(self) -> str:
        flops = f"{self.flops / TERA:,.0f} TFLOPS" if self.flops >= 10 * TERA else f"{self.flops / 1e9:,.0f} GFLOPS"
        link = f", link {self.link_bw / GB:,.0f} GB/s" if self.link_bw < 1e15 else ""
        return f"{self.name}: {flops}, {self.mem_bw / GB:,.0f} GB/s, {self.mem_bytes / GB:,.0f} GB{link}"


GPUS: dict[str, Hardware] = {
    "h100": Hardware("H100-SXM", 989.4 * TERA, 3.35e12, 80 * GB, 450 * GB, gpu_hour_cost=2.80,
                     source="NVIDIA H100 datasheet (SXM5)"),
    "h200": Hardware("H200", 989.4 * TERA, 4.8e12, 141 * GB, 450 * GB, gpu_hour_cost=3.50,
                     source="NVIDIA H200 datasheet (SXM)"),
    "a100": Hardware("A100-80GB", 312 * TERA, 2.039e12, 80 * GB, 300 * GB, gpu_hour_cost=1.80,
                     source="NVIDIA A100 datasheet (SXM 80 GB)"),
    "l40s": Hardware("L40S", 362.05 * TERA, 864 * GB, 48 * GB, 32 * GB, link_latency_s=10e-6, gpu_hour_cost=1.00,
                     source="NVIDIA L40S datasheet (PCIe Gen4 x16)"),
    "b200": Hardware("B200", 2250 * TERA, 8e12, 180 * GB, 900 * GB, gpu_hour_cost=5.50,
                     source="NVIDIA HGX B200 datasheet"),
}
_GPU_ALIASES = {"h100-sxm": "h100", "h100sxm": "h100", "h200-sxm": "h200", "a100-80gb": "a100", "a100-80g": "a100"}


@dataclass(frozen=True)
class Network:
    """The link that carries KV from a prefill worker to a decode worker."""

    name: str
    bandwidth: float  # bytes/s per NIC, one direction
    per_gpu: bool  # True: one NIC per GPU (RDMA); False: one NIC per node, shared by its GPUs
    latency_s: float
    efficiency: float  # fraction of line rate a bulk transfer reaches
    intra_node: bool = False  # NVLink: prefill and decode share a node

    def instance_bandwidth(self, tp: int, gpus_per_node: int = 8) -> float:
        """Achievable bytes/s for a worker spanning `tp` GPUs (each rank sends its own shard of the KV)."""
        share = tp if self.per_gpu else min(tp, gpus_per_node) / gpus_per_node
        return self.bandwidth * self.efficiency * share

    def describe(self) -> str:
        where = "per GPU" if self.per_gpu else "per node"
        return f"{self.name}: {self.bandwidth * 8 / GB:,.0f} Gbit/s {where}, {self.latency_s * 1e6:.0f} us"


NETWORKS: dict[str, Network] = {
    "rdma-400": Network("RDMA 400 Gbit/s", 400 / 8 * GB, True, 5e-6, 0.9),
    "rdma-200": Network("RDMA 200 Gbit/s", 200 / 8 * GB, True, 5e-6, 0.9),
    "eth-100": Network("100 GbE (TCP)", 100 / 8 * GB, False, 30e-6, 0.8),
    "eth-25": Network("25 GbE (TCP)", 25 / 8 * GB, False, 50e-6, 0.8),
    # NVLink's bandwidth depends on the GPU: see `network_for`.
    "nvlink": Network("NVLink", 450 * GB, True, 3e-6, 0.8, intra_node=True),
}
_NET_ALIASES = {
    "rdma400": "rdma-400", "ib-400": "rdma-400", "400g": "rdma-400", "rdma200": "rdma-200", "ib-200": "rdma-200",
    "200g": "rdma-200", "100gbe": "eth-100", "eth100": "eth-100", "25gbe": "eth-25", "eth25": "eth-25",
}


def gpu(name: str) -> Hardware:
    key = name.strip().lower()
    key = _GPU_ALIASES.get(key, key)
    if key not in GPUS:
        raise PresetError(f"unknown GPU {name!r}; presets: {', '.join(GPUS)} (or a calibration file from `splitserve plan calibrate`)")
    return GPUS[key]


def network(name: str, hardware: Hardware | None = None) -> Network:
    key = name.strip().lower()
    key = _NET_ALIASES.get(key, key)
    if key not in NETWORKS:
        raise PresetError(f"unknown network {name!r}; presets: {', '.join(NETWORKS)}")
    net = NETWORKS[key]
    if net.intra_node and hardware is not None:
        net = replace(net, name=f"NVLink ({hardware.name})", bandwidth=hardware.link_bw)
    return net


# ---------------------------------------------------------------------------------------------- prices (issue #7)

# Default USD per GPU-hour, by preset: the `gpu_hour_cost` above (rough 2025 on-demand cloud prices). Override
# with `--price H100=2.5` (repeatable) or `--prices-file prices.json` ({"h100": 2.5, ...} or `name=price` lines).
DEFAULT_PRICES: dict[str, float] = {k: hw.gpu_hour_cost for k, hw in GPUS.items()}


def price_key(hw: Hardware) -> str:
    """The key a price list uses for `hw`: its preset name (h100, a100, ...) or its own name, lower case."""
    for k, preset in GPUS.items():
        if preset.name == hw.name:
            return k
    return hw.name.strip().lower()


def _key(name: str) -> str:
    k = name.strip().lower()
    k = _GPU_ALIASES.get(k, k)
    for key, preset in GPUS.items():
        if preset.name.lower() == k:
            return key
    return k


def parse_prices(items) -> dict[str, float]:
    """`["H100=2.5", "a100=1.2"]` -> {"h100": 2.5, "a100": 1.2}."""
    out: dict[str, float] = {}
    for item in items or ():
        name, sep, value = str(item).partition("=")
        try:
            v = float(value)
        except ValueError:
            v = -1.0
        if not sep or not name.strip() or not v > 0:
            raise PresetError(f"a price is GPU=USD_PER_HOUR with a positive number, e.g. H100=2.5; got {item!r}")
        out[_key(name)] = v
    return out


def load_prices(path) -> dict[str, float]:
    """A prices file: a JSON object {"H100": 2.5, ...}, or one `name=price` per line (# comments)."""
    import json
    from pathlib import Path

    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise PresetError(f"cannot read prices file {path}: {e}") from None
    try:
        d = json.loads(text)
    except json.JSONDecodeError:
        return parse_prices(line.split("#", 1)[0].strip() for line in text.splitlines() if line.split("#", 1)[0].strip())
    if not isinstance(d, dict):
        raise PresetError(f"{path}: a prices file is a JSON object of GPU name -> USD per hour")
    return parse_prices(f"{k}={v}" for k, v in d.items())


def hour_price(hw: Hardware, prices: dict[str, float] | None = None) -> float:
    """USD per GPU-hour of `hw`: the price list's, else the preset's (0 = unknown)."""
    if prices:
        k = price_key(hw)
        if k in prices:
            return prices[k]
    return hw.gpu_hour_cost
