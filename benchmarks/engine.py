"""Engine vs Hugging Face transformers on the bundled SmolLM2-135M, same weights, same thread count.

(a) decode tokens/s at batch 1; (b) wall time for 32 requests of mixed prompt (64-1024) and output
(16-256) lengths: our continuous batching vs transformers `generate` in padded batches of 8.

    python -m benchmarks.engine [--threads N] [--repeats 3] [--requests 32]

Writes results/engine.json and results/engine.png; the last line printed is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

from splitserve.core.request import SamplingParams
from splitserve.model.loader import bundled_gguf_path, load_model
from splitserve.runtime.worker.engine import Engine, EngineConfig

RESULTS = Path("results")


def spread(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "runs": xs}


def hf_model():
    from transformers import AutoModelForCausalLM

    gguf = bundled_gguf_path()
    return AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, torch_dtype=torch.float32).eval()


def ours_decode_b1(engine: Engine, prompt: list[int], n: int) -> float:
    engine.add_request("b1", prompt, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True), 0.0)
    stamps = []
    while engine.has_work():
        for _ in engine.step(time.monotonic()):
            stamps.append(time.perf_counter())
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


@torch.inference_mode()
def hf_decode_b1(model, prompt: list[int], n: int) -> float:
    ids = torch.tensor([prompt])
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
    t_prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return (n - 1) / (time.perf_counter() - t0 - t_prefill)


def mixed_workload(n: int, vocab: int, seed: int = 0) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [([rng.randrange(3, vocab) for _ in range(rng.randint(64, 1024))], rng.randint(16, 256)) for _ in range(n)]


def ours_mixed(engine: Engine, work: list[tuple[list[int], int]]) -> float:
    t0 = time.perf_counter()
    for i, (prompt, out_len) in enumerate(work):
        engine.add_request(f"m{i}", prompt, SamplingParams(max_tokens=out_len, temperature=0.0, ignore_eos=True), 0.0)
    while engine.has_work():
        engine.step(time.monotonic())
    return time.perf_counter() - t0


@torch.inference_mode()
def hf_mixed(model, work: list[tuple[list[int], int]], batch: int = 8) -> float:
    t0 = time.perf_counter()
    for i in range(0, len(work), batch):
        group = work[i : i + batch]
        width = max(len(p) for p, _ in group)
        # Left padding, as decoder-only generation requires; the batch runs until its longest output.
        ids = torch.tensor([[0] * (width - len(p)) + p for p, _ in group])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in group])
        longest = max(n for _, n in group)
        model.generate(ids, attention_mask=mask, max_new_tokens=longest, min_new_tokens=longest, do_sample=False, pad_token_id=0)
    return time.perf_counter() - t0


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6))
    d = result["decode_b1_tok_s"]
    a.bar(["splitserve", "transformers"], [d["ours"]["median"], d["transformers"]["median"]], color=["tab:blue", "tab:gray"])
    a.errorbar([0, 1], [d["ours"]["median"], d["transformers"]["median"]],
               yerr=[[d[k]["median"] - d[k]["min"] for k in ("ours", "transformers")],
                     [d[k]["max"] - d[k]["median"] for k in ("ours", "transformers")]], fmt="none", color="k")
    a.set_ylabel("decode tokens/s (batch 1)")
    m = result["mixed_wall_s"]
    b.bar(["splitserve\ncontinuous", "transformers\npadded x8"], [m["ours"]["median"], m["transformers"]["median"]],
          color=["tab:blue", "tab:gray"])
    b.set_ylabel(f"wall s, {result['config']['requests']} mixed requests")
    fig.suptitle(f"SmolLM2-135M fp32, {result['config']['threads']} threads: median of {result['config']['repeats']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--decode-tokens", type=int, default=128)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    loaded = load_model()
    engine = Engine(loaded, EngineConfig(block_size=16, max_model_len=2048, max_num_seqs=32, enable_prefix_caching=False))
    hf = hf_model()
    rng = random.Random(1)
    prompt = [rng.randrange(3, loaded.config.vocab_size) for _ in range(128)]
    work = mixed_workload(args.requests, loaded.config.vocab_size)

    ours_b1, hf_b1, ours_mix, hf_mix = [], [], [], []
    for r in range(args.repeats):
        ours_b1.append(ours_decode_b1(engine, prompt, args.decode_tokens))
        hf_b1.append(hf_decode_b1(hf, prompt, args.decode_tokens))
        ours_mix.append(ours_mixed(engine, work))
        hf_mix.append(hf_mixed(hf, work))
        print(f"run {r + 1}: decode b1 ours {ours_b1[-1]:.1f} tok/s, hf {hf_b1[-1]:.1f} tok/s; "
              f"mixed ours {ours_mix[-1]:.1f} s, hf {hf_mix[-1]:.1f} s", flush=True)

    result = {
        "config": {"model": loaded.name, "dtype": "float32", "threads": args.threads, "repeats": args.repeats,
                   "requests": args.requests, "decode_tokens": args.decode_tokens, "prompt_range": [64, 1024],
                   "output_range": [16, 256], "hf_batch": 8},
        "decode_b1_tok_s": {"ours": spread(ours_b1), "transformers": spread(hf_b1)},
        "mixed_wall_s": {"ours": spread(ours_mix), "transformers": spread(hf_mix)},
    }
    summary = {
        "decode_b1_ratio": statistics.median(ours_b1) / statistics.median(hf_b1),
        "mixed_speedup": statistics.median(hf_mix) / statistics.median(ours_mix),
        "decode_b1_tok_s": statistics.median(ours_b1),
        "hf_decode_b1_tok_s": statistics.median(hf_b1),
        "mixed_wall_s": statistics.median(ours_mix),
        "hf_mixed_wall_s": statistics.median(hf_mix),
        "threads": args.threads,
    }
    result["summary"] = summary
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "engine.json").write_text(json.dumps(result, indent=2))
    plot(result, RESULTS / "engine.png")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
