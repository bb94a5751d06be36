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
- AIC: NVIDIA aiconfigurator 0.12.0's perf database (Apache-2.0; kernel latencies measured per shape on each
  GPU, here vLLM's: aiconfigurator_core/systems/data/<gpu>/gemm/vllm/<version>/gemm_perf.parquet; vLLM 0.24.0,
  A100 0.14.0), reduced by `benchmarks/kernel_efficiency_from_aic.py` against the presets' peaks. compute: the
  median over bf16 GEMMs with m >= 2048 and n, k >= 4096 of 2mnk / latency / peak FLOP/s; memory: the median
  over weight-bound bf16 GEMMs (m <= 8, n k >= 16M) of weight and activation bytes / latency / peak bandwidth.
  Medians (interquartile range; shapes): H100 compute 0.806 (0.769-0.836; 2,277), memory 0.802 (0.740-0.870;
  1,464); H200 0.790 (0.750-0.819), 0.735 (0.670-0.818); A100 0.902 (0.844-0.929; 240), 0.684 (0.636-0.727;
  592); L40S 0.638 (0.577-0.706; 2,252), 0.809 (0.762-0.834; 1,461); B200 0.697 (0.664-0.733), 0.678
  (0.580-0.766). Its TensorRT-LLM tables agree within 0.07 on every figure. kv_memory: the median over its
  decode-attention tables (generation_attention_perf.parquet; bf16 KV, full attention, the kernel vLLM picks
  on that GPU) of the K and V bytes read / latency / peak, over shapes reading >= 256 MB: H100 0.818
  (0.762-0.882; 2,369, FA3), H200 0.747 (0.681-0.830; FA3), A100 0.690 (0.636-0.748; 621), L40S 0.781
  (0.728-0.825; FA2), B200 0.767 (0.672-0.833; 2,590, FlashInfer TRT-LLM decode). Its sliding-window rows
  read only the window, so counted with the whole context they seemed faster than the bandwidth allows (the
  reason an earlier reading found no clean figure); they are left out.
  layer_overhead_s: the latency floors of one decoder layer's kernels at batch 1, which the roofline puts near
  zero: 4 GEMMs (fused QKV, output, fused gate-up, down) at the median latency of the database's bf16 GEMMs
  with m <= 8 moving <= 1 MB, one decode attention at the median of its shapes reading <= 1 MB, and the 3
  memory-bound kernels per layer (two add-norms, the activation) that aiconfigurator's Llama model counts,
  at its per-kernel constant (systems/<gpu>.yaml, mem_empirical_constant_latency, 3 us): H100 4 x 2.94 +
  12.09 + 3 x 3 = 32.9 us, H200 32.6, A100 44.5, L40S 32.0, B200 27.0.
- AIC-vLLM: aiconfigurator 0.12.0's vLLM backend (sdk/backends/vllm_backend.py) adds no per-step time to a
  decode step beyond its kernels (CUDA graphs replay a step's launches), so step_overhead_s is 0 on every
  GPU table. (Its one fixed cost, 0.8 ms of CPU dispatch per layer, is added once per request to TTFT: a fit
  to end-to-end measurements, not a kernel figure; splitserve does not add it.)
No published figure was found for the per-sequence overhead: it stays the default, named in `sources` as
such. Using aiconfigurator's measurements makes the comparison against aiconfigurator
(`benchmarks/plan_vs_aiconfigurator.py`) share its kernel figures: what still differs is the rest of the model
and the search.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

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
_AIC = "aiconfigurator 0.12.0 perf database, {gpu}/gemm/vllm/{v}/gemm_perf.parquet: median {what} {x} of peak ({iqr}, {n} shapes)"


def _aic(gpu: str, v: str, what: str, x: str, iqr: str, n: str) -> str:
    return _AIC.format(gpu=gpu, v=v, what=what, x=x, iqr=iqr, n=n)


_COMPUTE, _MEMORY = "bf16 GEMM (m >= 2048, n, k >= 4096) FLOP/s", "weight-bound bf16 GEMM (m <= 8) bandwidth"
_KV = ("aiconfigurator 0.12.0 perf database, {gpu}/attention/vllm/{v}/generation_attention_perf.parquet ({kernel}, "
       "full attention, bf16 KV, >= 256 MB read): median {x} of peak bandwidth ({iqr}, {n} shapes)")
_FLOORS = ("aiconfigurator 0.12.0 perf database ({gpu}, vllm {v}): 4 GEMMs x {g} us (median of bf16 m <= 8, <= 1 MB) "
           "+ decode attention {a} us (median, <= 1 MB of KV) + 3 memory-bound kernels x 3 us ({gpu}.yaml "
           "mem_empirical_constant_latency) = {t} us per layer")
_NO_STEP = ("aiconfigurator 0.12.0's vLLM backend (sdk/backends/vllm_backend.py) adds no per-step time to a decode "
            "step beyond its kernels (CUDA graphs): 0 ms; the kernels' floors are counted per layer")


def _kv(gpu: str, v: str, kernel: str, x: str, iqr: str, n: str) -> str:
    return _KV.format(gpu=gpu, v=v, kernel=kernel, x=x, iqr=iqr, n=n)


def _floors(gpu: str, v: str, g: str, a: str, t: str) -> str:
    return _FLOORS.format(gpu=gpu, v=v, g=g, a=a, t=t)


def _gpu(kernels: KernelTable) -> KernelTable:
    """A GPU table with the CUDA-graph step: no fixed per-step time, said so."""
    return KernelTable(replace(kernels.efficiency, step_overhead_s=0.0), {**kernels.sources, "step_overhead_s": _NO_STEP})
TABLES: dict[str, KernelTable] = {
    "h100": _gpu(KernelTable(Efficiency(compute=0.81, memory=0.8, attention=0.75, kv_memory=0.82, layer_overhead_s=32.9e-6), {
        "attention": _FA3,
        "compute": _aic("h100_sxm", "0.24.0", _COMPUTE, "0.806", "IQR 0.769-0.836", "2,277"),
        "memory": _aic("h100_sxm", "0.24.0", _MEMORY, "0.802", "IQR 0.740-0.870", "1,464"),
        "kv_memory": _kv("h100_sxm", "0.24.0", "FA3", "0.818", "IQR 0.762-0.882", "2,369"),
        "layer_overhead_s": _floors("h100_sxm", "0.24.0", "2.94", "12.09", "32.9")})),
    # The H200 has the H100's compute die (same 989 TFLOP/s): the same attention kernels reach the same share.
    "h200": _gpu(KernelTable(Efficiency(compute=0.79, memory=0.74, attention=0.75, kv_memory=0.75, layer_overhead_s=32.6e-6), {
        "attention": _FA3 + " (same Hopper die as the H200)",
        "compute": _aic("h200_sxm", "0.24.0", _COMPUTE, "0.790", "IQR 0.750-0.819", "2,277"),
        "memory": _aic("h200_sxm", "0.24.0", _MEMORY, "0.735", "IQR 0.670-0.818", "1,464"),
        "kv_memory": _kv("h200_sxm", "0.24.0", "FA3", "0.747", "IQR 0.681-0.830", "2,369"),
        "layer_overhead_s": _floors("h200_sxm", "0.24.0", "2.92", "11.90", "32.6")})),
    "a100": _gpu(KernelTable(Efficiency(compute=0.9, memory=0.68, attention=0.6, kv_memory=0.69, layer_overhead_s=44.5e-6), {
        "attention": "FlashAttention-2 (arXiv 2307.08691): 50-73 % of peak forward on A100; the middle, 0.6",
        "compute": _aic("a100_sxm", "0.14.0", _COMPUTE, "0.902", "IQR 0.844-0.929", "240"),
        "memory": _aic("a100_sxm", "0.14.0", _MEMORY, "0.684", "IQR 0.636-0.727", "592"),
        "kv_memory": _kv("a100_sxm", "0.14.0", "FlashAttention", "0.690", "IQR 0.636-0.748", "621"),
        "layer_overhead_s": _floors("a100_sxm", "0.14.0", "4.27", "18.39", "44.5")})),
    "b200": _gpu(KernelTable(Efficiency(compute=0.7, memory=0.68, kv_memory=0.77, layer_overhead_s=27.0e-6), {
        "compute": "pyptx.dev/performance: cuBLAS BF16 GEMM 1,532-1,652 TFLOP/s of 2,250 on B200 (68-73 %); "
                   + _aic("b200_sxm", "0.24.0", _COMPUTE, "0.697", "IQR 0.664-0.733", "2,277"),
        "memory": _aic("b200_sxm", "0.24.0", _MEMORY, "0.678", "IQR 0.580-0.766", "1,464"),
        "kv_memory": _kv("b200_sxm", "0.24.0", "FlashInfer TRT-LLM decode", "0.767", "IQR 0.672-0.833", "2,590"),
        "layer_overhead_s": _floors("b200_sxm", "0.24.0", "2.20", "9.15", "27.0")})),
    "l40s": _gpu(KernelTable(Efficiency(compute=0.64, memory=0.81, kv_memory=0.78, layer_overhead_s=32.0e-6), {
        "compute": _aic("l40s", "0.24.0", _COMPUTE, "0.638", "IQR 0.577-0.706", "2,252"),
        "memory": _aic("l40s", "0.24.0", _MEMORY, "0.809", "IQR 0.762-0.834", "1,461"),
        "kv_memory": _kv("l40s", "0.24.0", "FA2", "0.781", "IQR 0.728-0.825", "2,369"),
        "layer_overhead_s": _floors("l40s", "0.24.0", "2.67", "12.29", "32.0")})),
}


def kernel_table(gpu: str) -> KernelTable:
    """The table of a GPU preset (the defaults, each marked unsourced, for a GPU without one)."""
    return TABLES.get(gpu.strip().lower(), KernelTable(Efficiency()))
