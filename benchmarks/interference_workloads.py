"""The loads of `benchmarks.interference`: each with real decode, its rate bracket and its SLO.

Each workload is what `splitserve bench` takes (a TraceLoad or a SyntheticSpec), so a goodput sweep rescales
it to each probed rate, and `splitserve.bench.runner.workload_at` turns it into the very requests both the
real run and the planner's simulation get. Prompts and outputs have separate scales (Scaling.output_scale):
shrinking a trace's prompts to this machine must not shrink its answers to nothing (the earlier benchmark's
Azure load had 1-3 output tokens, nothing to decode, so nothing for a split to protect).

Sized for SmolLM2-135M on one core of this 2-core machine: prefill ~330 prompt tokens/s, a batch-1 decode
step ~55 ms quiet (60-120 ms at a handful of requests).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from splitserve.bench import TraceLoad
from splitserve.bench.runner import workload_at
from splitserve.workload.requests import LengthDist, Scaling, SyntheticSpec, Workload, read_trace
from splitserve.workload.slo import SLO

# Resolved: a checkout in a worktree reaches the traces through a symlink, and a kept sweep is matched by
# its load's repr, path included, so every checkout must name the same file the same way.
TRACES = (Path(__file__).resolve().parents[1].parent / "shared" / "traces").resolve()
MOONCAKE = TRACES / "mooncake_conversation_trace.jsonl"
AZURE_CODE = TRACES / "AzureLLMInferenceTrace_code.csv"

# Within 8 s to the first token, a mean of 250 ms per token after it, and no gap between two tokens over
# 0.5 s: the stall SLO is about 4-8 decode steps here, far under a long prompt's prefill (~3 s on one core),
# which is what a colocated decode suffers when a prompt arrives beside it.
DEFAULT_SLO = SLO(ttft_s=8.0, tpot_s=0.25, max_gap_s=0.5)


@dataclass(frozen=True)
class Case:
    """One workload: its load, the bracket of rates its goodput sweep searches, and a line on why it is here."""

    name: str
    load: TraceLoad | SyntheticSpec
    rate_lo: float
    rate_hi: float
    why: str
    seed_like: bool = False  # the seed load: the headline ratios are taken on it
    # Fewer requests per run than this never load the deployment: they all fit in one batch at once.
    min_requests: int = 0

    def with_requests(self, n: int) -> Case:
        n = max(n, self.min_requests)
        if isinstance(self.load, SyntheticSpec):
            return replace(self, load=replace(self.load, num_requests=n, duration_s=None))
        return replace(self, load=replace(self.load, scaling=replace(self.load.scaling, max_requests=n)))

    @property
    def num_requests(self) -> int:
        return self.load.num_requests if isinstance(self.load, SyntheticSpec) else self.load.scaling.max_requests

    def deadline_s(self, trials: int, drain_s: float) -> float:
        """How long a run may last: the slowest trial's last arrival at rate_lo (the longest runs), then
        `drain_s`. Poisson arrivals spread 20 requests over ~0.7x to ~1.4x their mean span, so requests / rate
        would cut the last request of a long trial short, a miss the server never caused."""
        return max(self.requests(self.rate_lo, t).requests[-1].arrival_s for t in range(trials)) + drain_s

    def requests(self, rate: float, trial: int) -> Workload:
        """The requests of trial `trial` at `rate`: exactly what bench sends in that run."""
        trace = read_trace(self.load.path, self.load.format) if isinstance(self.load, TraceLoad) else None
        return workload_at(self.load, trace, rate, trial)


def mixed_trace(path: Path, n: int = 400, seed: int = 0, short: int = 64, long: int = 1024,
                long_share: float = 0.3, output: int = 96) -> Path:
    """Write an Azure-format trace of a bimodal load: most prompts short (cheap to prefill beside running
    decodes, so conditional placement keeps them on the decode worker and off the transfer), some long (worth
    a prefill worker). Poisson arrivals at 1 req/s (sweeps rescale them); lengths lognormal sigma 0.3."""
    rng = np.random.default_rng(seed)
    t0 = datetime.datetime(2026, 1, 1)
    times = np.cumsum(rng.exponential(1.0, n))
    is_long = rng.random(n) < long_share
    prompts = np.where(is_long, long, short) * rng.lognormal(0.0, 0.3, n)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    for t, p in zip(times, prompts):
        stamp = (t0 + datetime.timedelta(seconds=float(t))).strftime("%Y-%m-%d %H:%M:%S.%f") + "0"
        lines.append(f"{stamp},{max(1, round(p))},{output}")
    path.write_text("\n".join(lines) + "\n")
    return path


def cases(workdir: Path, requests: int) -> dict[str, Case]:
    """Every workload, `requests` requests per run. `workdir` receives the generated mixed trace."""
    # Absolute: the path is part of each sweep's kept settings, which `--out results/...` and the default
    # `results/...` must both match.
    mixed = mixed_trace((workdir / "mixed_trace.csv").resolve())
    all_cases = [
        Case("prompt_heavy", SyntheticSpec(rate=0.2, input=LengthDist("lognormal", 1024, 0.4), output=LengthDist("fixed", 128)),
             0.1, 0.6, "the seed's load: prompts lognormal mean 1,024 sigma 0.4, 128-token answers", seed_like=True),
        # Prompts x1/32: at x1/16 the first 20 requests held a 5,448-token prompt (~12 s of prefill on 2 threads,
        # past the 8 s TTFT on every deployment) and the planner gave every deployment but chunked no passing
        # rate, which leaves nothing to tell apart. At x1/32 a trace block (512 tokens) is one 16-token KV block.
        Case("mooncake", TraceLoad(str(MOONCAKE), "mooncake", Scaling(length_scale=1 / 32, output_scale=1 / 4, jitter_s=3.0)),
             0.1, 0.8, "Mooncake conversations: prompts x1/32 (mean ~500 in a run), answers x1/4 (mean ~100), shared prefixes kept"),
        Case("azure_code", TraceLoad(str(AZURE_CODE), "azure", Scaling(length_scale=1 / 8, output_scale=1.0)),
             # From 0.1 req/s: on the AVX2-only EPYC every deployment failed 0.2 (attainment 0.25-0.80), which
             # leaves the workload with no winner to judge (results/interference_avx2).
             0.1, 2.0, "Azure code trace: prompts x1/8 (mean ~340), answers as in the trace (short: code completion)"),
        Case("short_prompts", SyntheticSpec(rate=1.0, input=LengthDist("lognormal", 64, 0.4), output=LengthDist("fixed", 128)),
             0.5, 4.0, "short prompts, long answers: little prefill to isolate; a split gives decode one core of two",
             # 20 requests of 64 tokens arrive as one burst even at 4 req/s and decode as one batch of 20
             # within the SLO on every deployment: no rate in the bracket fails, so nothing is measured.
             min_requests=64),
        Case("mixed", TraceLoad(str(mixed), "azure", Scaling()),
             0.2, 2.0, "70 % prompts ~64 tokens, 30 % ~1,024 (the seed's), 96-token answers: conditional placement's case"),
    ]
    return {c.name: c.with_requests(requests) for c in all_cases}
