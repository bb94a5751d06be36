"""Per-GPU kernel efficiencies for the roofline model (`perf.Efficiency`), each taken from a published kernel
measurement where one was found, and saying where; every other figure stays `Efficiency`'s round default and
is marked so. `splitserve plan calibrate` replaces the whole table with a fit on the machine at hand.

Sources:
- FA3: Shah, Bikshandi, Zhang, Thakkar, Ramani, Dao, "FlashAttention-3: Fast and Accurate Attention with
  Asynchrony and Low-precision" (arXiv 2407.08608, 2024): FP16 attention forward up to 740 TFLOP/s on
  H100 SXM5, 75 % of peak (FlashAttention-2 on H100: 35 %).
- FA2: Dao, "FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning"
  (arXiv 2307.08691, 2023): 50-73 % of the theoretical maximum FLOP/s on A100 (forward).
- cuBLAS on B200: pyptx.dev/performance (PyTorch 2.8 / CUDA 12.8, CUDA events): cuBLAS BF16 GEMM at
  1,532-1,652 TFLOP/s for 4096^3 to 8192-sized shapes against a 2,250 TFLOP/s dense peak, 68-73 %.
No published figure was found here for GEMM efficiency on H100/H200/A100/L40S, for memory or KV-read
efficiency, or for a serving engine's per-step overhead (scheduling, launches; with CUDA graphs it is far
below the 2 ms default): those stay the defaults, named in `sources` as such.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from splitserve.sim.perf import Efficiency

DEFAULT = "no published measurement found: Efficiency's round default"


@dataclass(frozen=True)
class KernelTable:
    efficiency: Efficiency
    sources: dict[str, str] = field(default_factory=dict)  # field -> where its value comes from

    def source(self, name: str) -> str:
        return self.sources.get(name, DEFAULT)

    def describe(self) -> dict[str, dict[str, object]]:
        return {f.name: {"value": getattr(self.efficiency, f.name), "source": self.source(f.name)}
                for f in fields(self.efficiency)}


_FA3 = "FlashAttention-3 (arXiv 2407.08608): 740 TFLOP/s FP16 forward on H100 SXM5, 75 % of peak"
TABLES: dict[str, KernelTable] = {
    "h100": KernelTable(Efficiency(attention=0.75), {"attention": _FA3}),
    # The H200 has the H100's compute die (same 989 TFLOP/s): the same attention kernels reach the same share.
    "h200": KernelTable(Efficiency(attention=0.75), {"attention": _FA3 + " (same Hopper die as the H200)"}),
    "a100": KernelTable(Efficiency(attention=0.6), {
        "attention": "FlashAttention-2 (arXiv 2307.08691): 50-73 % of peak forward on A100; the middle, 0.6"}),
    "b200": KernelTable(Efficiency(compute=0.7), {
        "compute": "pyptx.dev/performance: cuBLAS BF16 GEMM 1,532-1,652 TFLOP/s of 2,250 on B200 (68-73 %)"}),
    "l40s": KernelTable(Efficiency()),
}


def kernel_table(gpu: str) -> KernelTable:
    """The table of a GPU preset (the defaults, each marked unsourced, for a GPU without one)."""
    return TABLES.get(gpu.strip().lower(), KernelTable(Efficiency()))
