"""What structured output costs: decode tokens/s with every request under a JSON-schema grammar vs the same
requests unconstrained, at batch 1 and 16, on the bundled SmolLM2-135M (the engine, no HTTP).

The two modes alternate within each repetition (A, B, A, B, ...), so machine noise falls on both alike;
the reported figure is the median over repetitions. Only decode steps are timed (from the step after
every request has its first token), and the schema's strings are long enough that no request finishes early.

    python -m benchmarks.structured [--repeats 5] [--steps 32] [--threads N]

Writes results/structured.json; the last line printed is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from splitserve.core.request import GrammarSpec, SamplingParams
from splitserve.model.loader import load_model
from splitserve.runtime.worker.engine import Engine, EngineConfig

RESULTS = Path("results")
# Long strings: a constrained request keeps decoding for the whole measurement, as an unconstrained one does.
SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "minLength": 400, "maxLength": 2000},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["title", "tags"],
}


def decode_tok_s(engine: Engine, prompts: list[list[int]], steps: int, grammar: GrammarSpec | None, tag: str) -> float:
    params = SamplingParams(max_tokens=steps + 1, temperature=0.0, ignore_eos=True, grammar=grammar)
    for i, p in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", p, params, 0.0)
    produced = 0
    started = None
    have_first: set[str] = set()
    while engine.has_work():
        outs = engine.step(time.monotonic())
        if started is None:
            have_first |= {o.request_id for o in outs if o.new_token_ids}
            if len(have_first) == len(prompts):
                started = time.perf_counter()  # every prompt prefilled: decode steps from here
            continue
        produced += sum(len(o.new_token_ids) for o in outs)
    return produced / (time.perf_counter() - started)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(None)
    engine = Engine(loaded, EngineConfig(num_blocks=2048, max_num_seqs=32))
    grammar = GrammarSpec("json_schema", json.dumps(SCHEMA))
    tok = loaded.tokenizer
    base = tok.encode("Write a JSON object describing a book about the history of the sea.")
    result = {"model": loaded.name, "threads": torch.get_num_threads(), "steps": args.steps, "batches": {}}
    decode_tok_s(engine, [base], 4, grammar, "warm")  # compiles the grammar (cached after) and warms kernels
    for batch in (1, 16):
        prompts = [base + tok.encode(f" Variant {i}.", add_special_tokens=False) for i in range(batch)]
        plain, masked = [], []
        for r in range(args.repeats):
            plain.append(decode_tok_s(engine, prompts, args.steps, None, f"p{batch}-{r}"))
            masked.append(decode_tok_s(engine, prompts, args.steps, grammar, f"g{batch}-{r}"))
        p, m = statistics.median(plain), statistics.median(masked)
        result["batches"][str(batch)] = {
            "unconstrained_tok_s": plain, "grammar_tok_s": masked,
            "median_unconstrained": p, "median_grammar": m, "cost": 1 - m / p,
        }
        print(f"batch {batch:2d}: unconstrained {p:7.1f} tok/s, json_schema {m:7.1f} tok/s, cost {100 * (1 - m / p):5.1f} %")
    result["load_average"] = os.getloadavg()[0]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "structured.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({b: round(v["cost"], 4) for b, v in result["batches"].items()} | {"load": result["load_average"]}))


if __name__ == "__main__":
    main()
