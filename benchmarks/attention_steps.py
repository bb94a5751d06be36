"""Forward-step times of the bundled SmolLM2-135M: our kernels against the paths they replace.

Decode steps at batch 1/4/16 with 1k contexts, a mixed step (a 512-token chunk beside 15 decodes) and a
1k-token prefill, each timed in alternation (A, B, C, A, ...) so that load from other processes hits all
alike; medians of --repeats rounds. Modes: "kernel" (what serves: paged decode kernel, skinny linear for
1-8 rows, packed oneDNN weights above), "plain" (oneDNN handed the plain weights: SPLITSERVE_PACKED_WEIGHTS=0),
"unfused" (a layer's elementwise parts in torch's ops, not csrc/layer_ops.cpp), "gather"
(SPLITSERVE_PAGED_KERNEL=0: decode attention gathers contexts for SDPA) and "onednn" (the kernel's attention,
every linear in packed oneDNN: linear.SKINNY off). --threads takes a list (1,2): each thread count
is timed in the same rounds. The load average is printed beside them.

    python -m benchmarks.attention_steps [--threads 1,2] [--repeats 7] [--context 1024] [--modes kernel,plain,unfused,gather,onednn]

The last line printed is a JSON summary (also written to results/attention_steps.json).
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
from splitserve.model.batch import SeqInput, build_forward_batch
from splitserve.model.kv_cache import PagedKVCache
from splitserve.model.loader import load_model

BLOCK = 16


def steps(context: int, vocab: int) -> dict[str, list[SeqInput]]:
    """Step kinds: each a list of SeqInputs over sequence i's blocks [i * width, (i + 1) * width)."""
    width = -(-(context + 1) // BLOCK)
    table = lambda i: list(range(i * width, (i + 1) * width))  # noqa: E731
    tok = lambda i: (7 * i + 3) % vocab  # noqa: E731
    decode = lambda b: [SeqInput([tok(i)], context, table(i), True) for i in range(b)]  # noqa: E731
    mixed = [SeqInput([tok(j) for j in range(512)], context - 512, table(15), True)] + decode(15)
    return {
        "decode_b1": decode(1),
        "decode_b4": decode(4),
        "decode_b16": decode(16),
        "mixed_512+15": mixed,
        "prefill_1k": [SeqInput([tok(j) for j in range(context)], 0, table(16), True)],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default=str(torch.get_num_threads()), help="thread counts, comma-separated")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--modes", default="kernel,plain,unfused,gather,onednn", help="comma-separated, of those above")
    args = ap.parse_args()
    thread_counts = [int(t) for t in args.threads.split(",")]
    t0 = time.perf_counter()
    kernel = paged_kernel.load()
    print(f"paged kernel {'ready' if kernel else 'UNAVAILABLE'} after {time.perf_counter() - t0:.1f} s")
    loaded = load_model()
    cfg = loaded.config
    width = -(-(args.context + 1) // BLOCK)
    cache = PagedKVCache(cfg, 17 * width, BLOCK, loaded.dtype, loaded.device)
    # Real K/V in every context: prefill each sequence once (its 1k tokens), as a server's cache would hold.
    kinds = steps(args.context, cfg.vocab_size)
    for i in range(16):
        seq = SeqInput([(11 * i + j) % cfg.vocab_size for j in range(args.context)], 0, kinds["decode_b16"][i].block_table, True)
        loaded.model(build_forward_batch([seq], BLOCK, loaded.device), cache)

    def timed(seqs: list[SeqInput], mode: str, threads: int) -> float:
        os.environ[paged_kernel.ENV] = "0" if mode == "gather" else "1"
        os.environ[linear.PACK_ENV] = "0" if mode == "plain" else "1"
        linear.SKINNY = mode != "onednn"
        paged_kernel.FUSED_LAYER_OPS = mode != "unfused"
        torch.set_num_threads(threads)
        batch = build_forward_batch(seqs, BLOCK, loaded.device)
        t = time.perf_counter()
        loaded.model(batch, cache)
        return (time.perf_counter() - t) * 1000

    modes = args.modes.split(",") if kernel else ["gather"]
    runs = [(m, t) for t in thread_counts for m in modes]
    key = lambda m, t: f"{m}_ms" if len(thread_counts) == 1 else f"{m}_t{t}_ms"  # noqa: E731
    times: dict[str, dict[str, list[float]]] = {k: {key(m, t): [] for m, t in runs} for k in kinds}
    load_before = os.getloadavg()[0]
    for name, seqs in kinds.items():
        for m, t in runs:  # warm-up, untimed
            timed(seqs, m, t)
        for _ in range(args.repeats):
            for m, t in runs:
                times[name][key(m, t)].append(timed(seqs, m, t))
    os.environ.pop(paged_kernel.ENV, None)
    os.environ.pop(linear.PACK_ENV, None)
    linear.SKINNY = True
    paged_kernel.FUSED_LAYER_OPS = True
    load_after = os.getloadavg()[0]
    summary = {"threads": thread_counts, "context": args.context, "repeats": args.repeats,
               "loadavg_1m": [round(load_before, 2), round(load_after, 2)]}
    for name, by_key in times.items():
        med = {k: statistics.median(v) for k, v in by_key.items()}
        print(f"{name:14s} " + "  ".join(f"{k[:-3]} {v:7.1f} ms [{min(by_key[k]):.1f}-{max(by_key[k]):.1f}]"
                                          for k, v in med.items()))
        summary[name] = {k: round(v, 2) for k, v in med.items()}
    print(f"load average (1 min) {load_before:.1f} before, {load_after:.1f} after")
    Path("results").mkdir(exist_ok=True)
    Path("results/attention_steps.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
