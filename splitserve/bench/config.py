"""What to measure and how: the load, the target, the SLO, and the goodput sweep if any."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from splitserve.workload.requests import Scaling, SyntheticSpec, TraceFormat
from splitserve.workload.slo import SLO


class BenchConfigError(ValueError):
    """Options that cannot work together; the message says which."""


@dataclass(frozen=True)
class TraceLoad:
    path: str
    format: TraceFormat = "auto"
    scaling: Scaling = Scaling()


@dataclass(frozen=True)
class SweepConfig:
    """A goodput sweep: the rate searched in [rate_lo, rate_hi], each probed rate judged by the median
    attainment of `trials` runs."""

    rate_lo: float
    rate_hi: float
    trials: int = 3
    resolution: float | None = None  # req/s; None: 1/16 of the range (four bisection steps)
    # End a run once its verdict is certain (more requests certainly missed the SLO than the attainment
    # target allows), except at rate_lo, which runs whole so its latencies describe the entire load. An
    # overloaded run otherwise spends most of a sweep's time draining a queue whose verdict is known.
    stop_certain: bool = False

    @property
    def step(self) -> float:
        return self.resolution if self.resolution is not None else (self.rate_hi - self.rate_lo) / 16


@dataclass(frozen=True)
class BenchConfig:
    load: TraceLoad | SyntheticSpec
    url: str = "http://127.0.0.1:8000"
    model: str | None = None  # None: the first model the server lists
    tokenizer: str | None = None  # None: the model name as a local path or Hugging Face cache entry
    concurrency: int | None = None  # None: open loop on the workload's arrival times
    slo: SLO = SLO()
    attainment: float = 0.9  # the fraction of requests that must meet the SLO at the goodput (sweeps)
    sweep: SweepConfig | None = None
    timeout_s: float = 300.0  # per request
    deadline_s: float | None = None  # per run (each sweep trial is a run)
    # Before each run, wait up to this long for the target to finish what earlier runs left in flight
    # (bench/idle.py); 0: start at once.
    idle_timeout_s: float = 120.0
    retries: int = 0  # 429/503 answers retried after their Retry-After (0: a refusal is a failed request)
    ignore_eos: bool = True
    salt: int | None = None  # prompt-token salt; None: fresh per invocation, so reruns miss the prefix cache
    progress: bool = False
    live_table: bool = True  # with progress, on a terminal: the latency percentiles so far, while it runs
    out_dir: Path | None = None
    resume: bool = False  # reuse the runs out_dir/runs/ keeps from an earlier, cut-short bench of the same load


def check_config(c: BenchConfig) -> None:
    """Raise BenchConfigError for options that cannot work, before any request is sent."""
    if c.concurrency is not None and c.concurrency < 1:
        raise BenchConfigError(f"concurrency must be >= 1, got {c.concurrency}")
    if not c.timeout_s > 0 or (c.deadline_s is not None and not c.deadline_s > 0):
        raise BenchConfigError("timeout and deadline must be positive")
    if not c.idle_timeout_s >= 0:
        raise BenchConfigError(f"idle timeout must be >= 0 seconds, got {c.idle_timeout_s}")
    if c.resume and c.out_dir is None:
        raise BenchConfigError("resume needs an output folder: give --out")
    if c.retries < 0:
        raise BenchConfigError(f"retries must be >= 0, got {c.retries}")
    for name, v in (("TTFT", c.slo.ttft_s), ("TPOT", c.slo.tpot_s)):
        if v is not None and not v > 0:
            raise BenchConfigError(f"the {name} SLO must be a positive number of seconds, got {v}")
    if c.sweep is None:
        return
    if not c.slo.set:
        raise BenchConfigError("a goodput sweep needs an SLO: give --slo-ttft, --slo-tpot and/or --slo-gap")
    if c.concurrency is not None:
        raise BenchConfigError("a rate sweep needs open-loop load: drop --concurrency")
    s = c.sweep
    if not 0 < s.rate_lo < s.rate_hi:
        raise BenchConfigError(f"a sweep needs 0 < rate-lo < rate-hi, got {s.rate_lo:g} and {s.rate_hi:g}")
    if not 0 < c.attainment <= 1:
        raise BenchConfigError(f"the attainment target must be a fraction in (0, 1], got {c.attainment:g}")
    if s.trials < 1 or not s.step > 0:
        raise BenchConfigError("a sweep needs at least one trial and a positive resolution")
