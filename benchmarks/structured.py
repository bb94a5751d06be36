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


class SampleTimer:
    """Seconds spent in the sampler (where the grammar mask is filled and applied), summed."""

    def __init__(self, engine: Engine) -> None:
        self.seconds = 0.0
        inner = engine.sampler.sample

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        engine.sampler.sample = timed


def decode_tok_s(engine: Engine, prompts: list[list[int]], steps: int, grammar: GrammarSpec | None, tag: str,
                 timer: SampleTimer) -> tuple[float, float]:
    """(decode tokens/s, sampler seconds per decode step)."""
    params = SamplingParams(max_tokens=steps + 1, temperature=0.0, ignore_eos=True, grammar=grammar)
    for i, p in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", p, params, 0.0)
    produced = decode_steps = 0
    started = None
    have_first: set[str] = set()
    while engine.has_work():
        outs = engine.step(time.monotonic())
        if started is None:
            have_first |= {o.request_id for o in outs if o.new_token_ids}
            if len(have_first) == len(prompts):
                started = time.perf_counter()  # every prompt prefilled: decode steps from here
                timer.seconds = 0.0
            continue
        produced += sum(len(o.new_token_ids) for o in outs)
        decode_steps += 1
    return produced / (time.perf_counter() - started), timer.seconds / max(1, decode_steps)


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
    timer = SampleTimer(engine)
    decode_tok_s(engine, [base], 4, grammar, "warm", timer)  # compiles the grammar (cached after), warms kernels
    for batch in (1, 16):
        prompts = [base + tok.encode(f" Variant {i}.", add_special_tokens=False) for i in range(batch)]
        plain, masked = [], []
        for r in range(args.repeats):
            plain.append(decode_tok_s(engine, prompts, args.steps, None, f"p{batch}-{r}", timer))
            masked.append(decode_tok_s(engine, prompts, args.steps, grammar, f"g{batch}-{r}", timer))
        p, m = statistics.median(t for t, _ in plain), statistics.median(t for t, _ in masked)
        # The mask's own share of a decode step: extra sampler time over the unconstrained step's time. On a
        # loaded machine this is steadier than the tok/s ratio, whose two medians carry independent noise.
        extra = statistics.median(s for _, s in masked) - statistics.median(s for _, s in plain)
        step_s = batch / p
        result["batches"][str(batch)] = {
            "unconstrained": plain, "grammar": masked, "median_unconstrained_tok_s": p, "median_grammar_tok_s": m,
            "cost_tok_s": 1 - m / p, "mask_s_per_step": extra, "step_s": step_s, "cost_mask_share": extra / step_s,
        }
        print(f"batch {batch:2d}: unconstrained {p:7.1f} tok/s, json_schema {m:7.1f} tok/s ({100 * (1 - m / p):5.1f} %); "
              f"mask {1e3 * extra:.2f} ms of a {1e3 * step_s:.1f} ms step ({100 * extra / step_s:.1f} %)")
    result["load_average"] = os.getloadavg()[0]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "structured.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({b: [round(v["cost_tok_s"], 4), round(v["cost_mask_share"], 4)] for b, v in result["batches"].items()}
                     | {"load": result["load_average"]}))


if __name__ == "__main__":
    main()
