"""The split path on one NVIDIA GPU, in one go (benchmarks/gpu_check.sh runs it under a 5-minute limit).

1. KV bytes per second per transport with both caches in GPU memory (benchmarks.transfer --device cuda):
   nixl WRITEs VRAM -> VRAM (UCX cuda_ipc on one host), tcp and shm through pinned host staging.
2. For tcp and nixl: a 1P1D deployment, prefill and decode workers as two processes on the same GPU with
   --device cuda, against a colocated CUDA deployment: greedy tokens identical, and the prefill worker's
   exposed transfer (last KV byte out - last layer computed) per request.
3. Decode tokens/s at batch 1 and 16: splitserve's engine against transformers, same weights, same GPU.

Prints one JSON object last; the README's GPU section quotes it with the GPU's name.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time

import httpx
import torch

from benchmarks.engine import hf_model
from benchmarks.pipelining import EXPOSED, scrape
from splitserve.core.request import SamplingParams
from splitserve.model.loader import load_model
from splitserve.runtime.worker.engine import Engine, EngineConfig
from splitserve.transfer.available import transports_line
from tests.runtime.deployment import Deployment

PROMPTS = 8
MAX_NEW = 16
COMMON = ["--device", "cuda", "--kv-cache-gib", "0.5", "--block-size", "16", "--no-conditional"]


def prompts(vocab: int) -> list[list[int]]:
    rng = random.Random(3)
    shared = [rng.randrange(3, vocab) for _ in range(256)]
    out = [[rng.randrange(3, vocab) for _ in range(rng.randint(64, 1500))] for _ in range(PROMPTS - 2)]
    return out + [shared + [rng.randrange(3, vocab) for _ in range(40)] for _ in range(2)]  # a prefix hit


def complete(url: str, ps: list[list[int]]) -> list[list[int]]:
    body = {"max_tokens": MAX_NEW, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
    return [httpx.post(url + "/v1/completions", json={**body, "prompt": p}, timeout=120).json()["choices"][0]["token_ids"]
            for p in ps]


def split_run(transfer: str, ps: list[list[int]]) -> tuple[list[list[int]], dict]:
    with Deployment(None, "--prefill", "1", "--decode", "1", "--transfer", transfer, *COMMON, startup_timeout=180) as dep:
        complete(dep.url, ps[:1])  # warm-up: connections, CUDA kernels
        (p,) = dep.workers("prefill")
        before = scrape(dep.operator.get(p["url"] + "/metrics").text)
        tokens = complete(dep.url, ps)
        time.sleep(1.0)  # transfers outlive responses
        after = scrape(dep.operator.get(p["url"] + "/metrics").text)
        paths = {r["path"] for r in dep.requests()}
    n = after.get(EXPOSED + "_count", 0) - before.get(EXPOSED + "_count", 0)
    exposed = (after.get(EXPOSED + "_sum", 0) - before.get(EXPOSED + "_sum", 0)) / n if n else None
    return tokens, {"paths": sorted(paths), "transfers": n, "mean_exposed_ms": exposed and exposed * 1e3}


def decode_tok_s(batch: int, n: int = 128) -> dict:
    loaded = load_model(device="cuda")
    engine = Engine(loaded, EngineConfig(block_size=16, max_model_len=2048, max_num_seqs=32, enable_prefix_caching=False))
    rng = random.Random(1)
    ps = [[rng.randrange(3, loaded.config.vocab_size) for _ in range(128)] for _ in range(batch)]
    for i, p in enumerate(ps):
        engine.add_request(f"r{i}", p, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True), 0.0)
    engine.step(time.monotonic())  # the prefill step
    torch.cuda.synchronize()
    t0, steps = time.perf_counter(), 0
    while engine.has_work():
        engine.step(time.monotonic())
        steps += 1
    torch.cuda.synchronize()
    ours = batch * steps / (time.perf_counter() - t0)
    hf = hf_model().to("cuda")
    ids = torch.tensor(ps, device="cuda")
    with torch.inference_mode():
        hf.generate(ids, max_new_tokens=1, do_sample=False)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        hf.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
        torch.cuda.synchronize()
        prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        torch.cuda.synchronize()
        theirs = batch * (n - 1) / (time.perf_counter() - t0 - prefill)
    return {"splitserve": ours, "transformers": theirs, "ratio": ours / theirs}


def main() -> None:
    gpu = torch.cuda.get_device_name(0)
    print(f"GPU: {gpu}; torch {torch.__version__}, CUDA {torch.version.cuda}", file=sys.stderr)
    for t in ("tcp", "nixl"):
        print(transports_line(t, "cuda"), file=sys.stderr)
    report: dict = {"gpu": gpu}
    t0 = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "benchmarks.transfer", "--device", "cuda", "--reps", "3"],
                         capture_output=True, text=True, timeout=150)
    report["transfer"] = json.loads(run.stdout.strip().splitlines()[-1]) if run.returncode == 0 else run.stderr[-1500:]
    print(f"[{time.monotonic() - t0:.0f}s] transfer: {report['transfer']}", file=sys.stderr)
    vocab = load_model(device="cpu").config.vocab_size
    ps = prompts(vocab)
    with Deployment(None, "--colocated", "1", *COMMON, startup_timeout=180) as dep:
        reference = complete(dep.url, ps)
    for transfer in ("tcp", "nixl"):
        tokens, info = split_run(transfer, ps)
        report[f"split_{transfer}"] = {**info, "token_identical": tokens == reference,
                                       "identical_prompts": sum(a == b for a, b in zip(tokens, reference))}
        print(f"[{time.monotonic() - t0:.0f}s] {transfer}: {report[f'split_{transfer}']}", file=sys.stderr)
    for batch in (1, 16):
        report[f"decode_tok_s_batch{batch}"] = decode_tok_s(batch)
        print(f"[{time.monotonic() - t0:.0f}s] batch {batch}: {report[f'decode_tok_s_batch{batch}']}", file=sys.stderr)
    report["wall_s"] = time.monotonic() - t0
    print(json.dumps(report))


if __name__ == "__main__":
    main()
