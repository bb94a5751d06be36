"""Where the few-row linear kernel beats oneDNN: a SmolLM2-135M decode step's linears (every layer's qkv, o,
gate_up and down weights, then the LM head: each read from memory, as in a real step) at R rows, through the
kernel (csrc/skinny_linear.cpp) and through oneDNN, alternated (kernel, oneDNN, kernel, ...) so that load from
other processes hits both alike; medians of --repeats. Timed in CPU seconds (the thread's at 1 thread, the
process's at 2+), so a busy machine stretches neither; at 2+ threads the process time includes OpenMP's
spin-waits, which a loaded machine inflates: compare 2-thread figures only on a quiet one. linear.py's
SKINNY_MAX_ROWS is the last row count where the kernel wins.

    python -m benchmarks.linear_rows [--threads 1] [--rows 1,2,3,4,6,8,10,12,16] [--repeats 5] [--out results/linear_rows.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from splitserve.model import linear, paged_kernel
from splitserve.model.loader import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", default="1,2,3,4,6,8,10,12,16")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("results") / "linear_rows.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not paged_kernel.load():
        raise SystemExit("the kernels did not build (see the log line above)")
    model = load_model().model
    weights = [w.detach() for layer in model.layers for w in (
        layer.self_attn.qkv_proj.weight, layer.self_attn.o_proj.weight, layer.mlp.gate_up_proj.weight, layer.mlp.down_proj.weight,
    )] + [model.lm_head_weight.detach()]
    clock = time.thread_time if args.threads == 1 else time.process_time
    # The kernel called directly, at any row count (also past the cut-off, to find it); oneDNN as linear.py
    # calls it for rows the kernel does not take: with each weight's packed copy (linear.PackedWeight).
    linear.SKINNY = False
    packed = {id(w): linear.PackedWeight() for w in weights}
    for w in weights:
        packed[id(w)].of(w)
    paths = {"kernel": lambda x, w: paged_kernel.linear(x, w, None), "onednn": lambda x, w: linear.linear(x, w, None, packed[id(w)])}
    summary: dict = {"threads": args.threads, "repeats": args.repeats, "loadavg_1m": [round(os.getloadavg()[0], 2)]}
    with torch.inference_mode():
        for rows in map(int, args.rows.split(",")):
            xs = {w.shape[1]: torch.randn(rows, w.shape[1]) for w in weights}
            for w in weights[:4] + weights[-1:]:  # the same products, before any is timed
                torch.testing.assert_close(paths["kernel"](xs[w.shape[1]], w), paths["onednn"](xs[w.shape[1]], w), rtol=1e-4, atol=1e-4)
            times: dict[str, list[float]] = {p: [] for p in paths}
            for _ in range(args.repeats):
                for name, fn in paths.items():
                    t = clock()
                    for w in weights:
                        fn(xs[w.shape[1]], w)
                    times[name].append((clock() - t) * 1000)
            k, d = statistics.median(times["kernel"]), statistics.median(times["onednn"])
            print(f"rows {rows:2d}: kernel {k:6.1f} ms CPU, oneDNN {d:6.1f} ms CPU, kernel / oneDNN {k / d:.2f}", flush=True)
            summary[f"rows_{rows}"] = {"kernel_cpu_ms": round(k, 2), "onednn_cpu_ms": round(d, 2), "ratio": round(k / d, 3)}
    summary["loadavg_1m"].append(round(os.getloadavg()[0], 2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
