"""Step times of splitserve's engine and vLLM's CPU engine on the same inputs (issue 16's profile, item 1):
the 1,024-token prefill and the decode step at batch 1, 4 and 16 with ~1k-token contexts.

Each server (the same two as `benchmarks.vs_vllm`: vLLM-CPU with 2 OpenMP threads, `splitserve serve
--colocated 1 --threads 2`, one at a time, identical weights) gets N requests of a 1,024-token prompt and
128 output tokens, sent together. The decode step at batch N is the median gap between two tokens of the
same request once every prompt has had its first token (from then on each step decodes exactly N
sequences); the prefill is the single request's TTFT (N = 1). Measured from the client, so both engines are
timed alike, HTTP streaming included; medians over --repeats rounds with min-max.

    python -m benchmarks.vs_vllm_steps [--repeats 3] [--batches 1 4 16] [--systems vllm,colocated]

Writes results/vs_vllm/steps.json; the last line printed is a JSON object with each system's figures and
ours / vLLM's per step kind.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from benchmarks.hf_export import export
from benchmarks.vs_vllm import DEFAULT_VLLM, OUT, Server, chosen_systems
from splitserve.bench import BenchConfig, run_bench
from splitserve.workload.record import RequestRecord
from splitserve.workload.requests import LengthDist, SyntheticSpec

PROMPT, OUTPUT = 1024, 128


def decode_gaps(records: list[RequestRecord]) -> list[float]:
    """Gaps between consecutive tokens of each request after the last first token of the batch: steps that
    only decode, all N sequences in each."""
    ok = [r for r in records if r.ok and r.first_token_s is not None]
    if len(ok) < len(records):
        failed = sorted({r.error_label or "" for r in records if r not in ok})
        raise RuntimeError(f"{len(records) - len(ok)} of {len(records)} requests failed ({failed}): no clean batch")
    start = max(r.first_token_s for r in ok)
    return [b - a for r in ok for a, b in zip(r.token_times_s, r.token_times_s[1:]) if a >= start]


def measure(server: Server, model_dir: Path, batches: list[int], repeats: int) -> dict:
    out: dict = {"startup_s": server.startup_s, "prefill_1k_s": [], "decode_step_s": {str(n): [] for n in batches}}
    for rep in range(repeats):
        for n in batches:
            load = SyntheticSpec(rate=1000.0, input=LengthDist("fixed", PROMPT), output=LengthDist("fixed", OUTPUT),
                                 num_requests=n, seed=rep)
            # Retries: a server may refuse part of a burst (429, Retry-After) while its queue drains; the
            # decode steps are counted only once every request has its first token, so a late one costs nothing.
            records = run_bench(BenchConfig(load=load, url=server.url, tokenizer=str(model_dir), timeout_s=600.0,
                                            retries=20)).runs[0].records
            out["decode_step_s"][str(n)].append(statistics.median(decode_gaps(records)))
            if n == 1:
                out["prefill_1k_s"].append(records[0].first_token_s - records[0].sent_s)
    return out


def spread(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--systems", default="vllm,colocated")
    ap.add_argument("--vllm", type=Path, default=DEFAULT_VLLM)
    args = ap.parse_args()
    if 1 not in args.batches:
        ap.error("--batches must include 1: the prefill is timed on the single request")
    systems = chosen_systems(ap, args.systems, args.vllm, ("vllm", "colocated"))
    model_dir = export()
    started = time.time()
    figures: dict = {}
    for system in systems:
        server = Server(system, model_dir, args.vllm, "0-1", OUT / "logs")
        try:
            m = measure(server, model_dir, args.batches, args.repeats)
        finally:
            server.stop()
        figures[system] = {"startup_s": m["startup_s"], "prefill_1k_s": spread(m["prefill_1k_s"]),
                           **{f"decode_b{n}_s": spread(v) for n, v in m["decode_step_s"].items()}}
        print(f"[{system}] " + ", ".join(f"{k} {v['median'] * 1e3:.1f} ms ({v['min'] * 1e3:.1f}-{v['max'] * 1e3:.1f})"
                                         for k, v in figures[system].items() if isinstance(v, dict)), flush=True)
    ratios = {}
    if "vllm" in figures and "colocated" in figures:
        ratios = {k: figures["colocated"][k]["median"] / v["median"]
                  for k, v in figures["vllm"].items() if isinstance(v, dict)}
    doc = {"figures": figures, "colocated_vs_vllm": ratios, "repeats": args.repeats, "prompt": PROMPT,
           "output": OUTPUT, "cpus": os.cpu_count(), "load_average_at_end": os.getloadavg(),
           "wall_s": time.time() - started}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "steps.json").write_text(json.dumps(doc, indent=1))
    print(json.dumps({"colocated_vs_vllm": ratios, "figures": figures}))


if __name__ == "__main__":
    main()
