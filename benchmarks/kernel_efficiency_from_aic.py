"""Kernel efficiencies per GPU from NVIDIA aiconfigurator's published kernel measurements (its perf database:
cuBLAS/framework GEMM and attention latencies measured per shape on each GPU), against the peaks of
splitserve's GPU presets (`sim/hardware.py`). The figures `sim/kernel_efficiency.py` ships come from here.

    /work/peers/aic/bin/python benchmarks/kernel_efficiency_from_aic.py [--framework vllm]

Run with aiconfigurator's own Python (it needs pandas and pyarrow, which splitserve does not). For each GPU
and efficiency the median over the shapes that measure it, with the interquartile range and the count:

    compute    bf16 GEMMs with m >= 2048 and n, k >= 4096: 2 m n k / latency / peak FLOP/s
    memory     bf16 GEMMs with m <= 8 and n k >= 16M (weight-bound): bytes of weights and activations / latency / peak
    kv_memory  decode attention (one new token per sequence, bf16 KV, full attention: window_size 0, by the
               kernel vLLM picks on that GPU) reading >= 256 MB of K and V: those bytes / latency / peak
    floors     the median latency of the smallest shapes, the floor a roofline misses at batch 1: bf16 GEMMs
               with m <= 8 moving <= 1 MB; decode attention reading <= 1 MB of K and V
    layer_overhead_s  a decoder layer's floors as vLLM runs it: 4 GEMMs (fused QKV, output, fused gate-up,
               down) + 1 decode attention + the 3 memory-bound kernels aiconfigurator's own Llama model adds per
               layer (2 add-norms, the activation) at its per-kernel constant (systems/<gpu>.yaml,
               mem_empirical_constant_latency)

The sliding-window rows (window_size > 0) read only the window's K and V; counted with the whole context they
look faster than the bandwidth allows, so they are left out.

Prints one JSON document. The database is aiconfigurator 0.12.0's (Apache-2.0), under
aiconfigurator_core/systems/data/<gpu>/{gemm,attention}/<framework>/<version>/*.parquet; latency is in ms.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd
import yaml

# Run by aiconfigurator's Python, where splitserve is not installed: the presets' peaks come from the
# repository's own sim/hardware.py (dataclasses only, no torch), so they cannot drift from what the planner uses.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from splitserve.sim import hardware  # noqa: E402

DB = Path("/work/peers/aic/lib/python3.11/site-packages/aiconfigurator_core/systems/data")
SYSTEMS_YAML = DB.parent
# The kernel vLLM's attention backend picks for decode on each GPU (the database measures several on some).
DECODE_KERNEL = {"h100_sxm": "vllm_flash_attn_fa3", "h200_sxm": "vllm_flash_attn_fa3", "b200_sxm": "vllm_flashinfer_trtllmdecode",
                 "l40s": "vllm_flash_attn_fa2", "a100_sxm": "vllm_flash_attn"}
GEMMS_PER_LAYER, MEM_OPS_PER_LAYER = 4, 3
SYSTEMS = {"h100": "h100_sxm", "h200": "h200_sxm", "a100": "a100_sxm", "l40s": "l40s", "b200": "b200_sxm"}  # preset -> aiconfigurator's


def table(system: str, kind: str, name: str, framework: str) -> tuple[pd.DataFrame, str]:
    root = DB / system / kind / framework
    version = sorted(p.name for p in root.iterdir() if (p / name).exists())[-1]  # the latest that has it
    return pd.read_parquet(root / version / name), f"{system}/{kind}/{framework}/{version}/{name}"


def stats(x: pd.Series) -> dict:
    return {"median": round(float(x.median()), 3), "p25": round(float(x.quantile(0.25)), 3),
            "p75": round(float(x.quantile(0.75)), 3), "shapes": int(len(x))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--framework", default="vllm", choices=("vllm", "sglang", "trtllm"))
    args = ap.parse_args()
    out = {}
    for gpu, system in SYSTEMS.items():
        flops, bw = hardware.gpu(gpu).flops, hardware.gpu(gpu).mem_bw
        g, gsrc = table(system, "gemm", "gemm_perf.parquet", args.framework)
        g = g[g.gemm_dtype == "bfloat16"]
        s = g.latency * 1e-3
        big = (g.m >= 2048) & (g.n >= 4096) & (g.k >= 4096)
        compute = (2.0 * g.m * g.n * g.k / s / flops)[big]
        thin = (g.m <= 8) & (g.n * g.k >= 16 * 2**20)
        memory = (2.0 * (g.n * g.k + g.m * (g.n + g.k)) / s / bw)[thin]
        a, asrc = table(system, "attention", "generation_attention_perf.parquet", args.framework)
        full = a.window_size == 0 if "window_size" in a else True  # older tables measured no windows
        a = a[(a.kv_cache_dtype == "bfloat16") & (a.beam_width == 1) & full & (a.kernel_source == DECODE_KERNEL[system])]
        # The table's decode step attends over isl + step tokens of context per sequence.
        kv = a.batch_size * (a.isl + a.step) * 2.0 * a.num_key_value_heads * a.head_dim * 2
        kv_eff = (kv / (a.latency * 1e-3) / bw)[kv >= 256 * 2**20]
        tiny = (g.m <= 8) & (2.0 * (g.n * g.k + g.m * (g.n + g.k)) <= 2**20)
        gemm_floor = float(s[tiny].median())
        att_floor = float((a.latency * 1e-3)[kv <= 2**20].median())
        mem_const = float(yaml.safe_load((SYSTEMS_YAML / f"{system}.yaml").read_text())["gpu"]["mem_empirical_constant_latency"])
        layer = GEMMS_PER_LAYER * gemm_floor + att_floor + MEM_OPS_PER_LAYER * mem_const
        out[gpu] = {"compute": stats(compute), "memory": stats(memory), "kv_memory": stats(kv_eff),
                    "gemm_floor_us": round(gemm_floor * 1e6, 2), "attention_floor_us": round(att_floor * 1e6, 2),
                    "mem_op_constant_us": round(mem_const * 1e6, 2), "layer_overhead_us": round(layer * 1e6, 1),
                    "decode_kernel": DECODE_KERNEL[system], "sources": [gsrc, asrc, f"{system}.yaml"]}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
