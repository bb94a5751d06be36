"""The Python API: `run_bench(BenchConfig) -> BenchResult`, one run or a goodput sweep.

The CLI and the project's benchmark scripts both come through here.
"""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass, replace
from pathlib import Path

from rich.console import Console

from splitserve.bench.client import EndpointError, Target, resolve_model, run_load
from splitserve.workload.slo import SLO, Summary, summarize
from splitserve.bench.progress import RunProgress
from splitserve.bench.prompts import PromptBuilder
from splitserve.workload.record import RequestRecord
from splitserve.workload.goodput import SweepError, SweepResult, check_sweep, find_goodput
from splitserve.bench.vocab import Vocab, VocabError, find_vocab
from splitserve.workload.requests import (
    Scaling,
    SyntheticSpec,
    Trace,
    TraceFormat,
    Workload,
    WorkloadError,
    at_rate,
    from_trace,
    read_trace,
    synthetic,
)


class BenchConfigError(ValueError):
    """Options that cannot work together; the message says which."""


# Exceptions that mean bad input, not a bug: report the message, not a traceback.
USER_ERRORS = (BenchConfigError, SweepError, WorkloadError, EndpointError, VocabError)


@dataclass(frozen=True)
class TraceLoad:
    path: str
    format: TraceFormat = "auto"
    scaling: Scaling = Scaling()


@dataclass(frozen=True)
class SweepConfig:
    rate_lo: float
    rate_hi: float
    trials: int = 3
    resolution: float | None = None  # req/s; None: 1/16 of the range (four bisection steps)

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
    ignore_eos: bool = True
    salt: int | None = None  # prompt-token salt; None: fresh per invocation, so reruns miss the prefix cache
    progress: bool = False
    out_dir: Path | None = None


@dataclass
class Run:
    rate: float | None  # the rate a sweep asked for; None for a plain run
    trial: int
    workload: Workload
    records: list[RequestRecord]
    summary: Summary


@dataclass
class BenchResult:
    config: BenchConfig
    model: str
    vocab: Vocab
    salt: int
    runs: list[Run]
    sweep: SweepResult | None = None

    @property
    def summary(self) -> Summary:
        """The run's summary (for a sweep: the last trial's)."""
        return self.runs[-1].summary


def run_bench(config: BenchConfig, console: Console | None = None) -> BenchResult:
    """Measure the target; writes `config.out_dir` when set. Bad input raises an exception whose message is
    fit for the user: one of `USER_ERRORS`."""
    _validate(config)
    if config.out_dir is not None:
        config.out_dir.mkdir(parents=True, exist_ok=True)  # fail now, not after a long run
    trace = read_trace(config.load.path, config.load.format) if isinstance(config.load, TraceLoad) else None
    # Build one workload now, so a bad workload parameter is reported before any network traffic.
    _workload(config.load, trace, config.sweep.rate_lo if config.sweep else None, 0)
    model = resolve_model(config.url, config.model)
    vocab = find_vocab(model, config.tokenizer)
    salt = config.salt if config.salt is not None else secrets.randbits(63)
    target = Target(config.url, model, config.ignore_eos)
    runs: list[Run] = []

    with RunProgress(config.progress, console) as progress:

        def measure(rate: float | None, trial: int) -> Run:
            workload = _workload(config.load, trace, rate, trial)
            label = f"rate {rate:g} req/s, trial {trial + 1}" if rate is not None else "requests"
            progress.start_run(label, len(workload.requests))
            # Each run draws its own prompt tokens, so no trial finds an earlier trial's prompts cached.
            builder = PromptBuilder(vocab, salt + len(runs))
            specs = workload.requests
            records = asyncio.run(
                run_load(
                    target,
                    specs,
                    lambda i: builder.build(i, specs[i]),
                    concurrency=config.concurrency,
                    timeout_s=config.timeout_s,
                    deadline_s=config.deadline_s,
                    on_done=progress.done,
                )
            )
            run = Run(rate, trial, workload, records, summarize(records, config.slo))
            runs.append(run)
            return run

        sweep = None
        if config.sweep is None:
            measure(None, 0)
        else:
            s = config.sweep
            sweep = find_goodput(
                lambda rate, trial: measure(rate, trial).summary.attainment,
                s.rate_lo,
                s.rate_hi,
                target=config.attainment,
                trials=s.trials,
                resolution=s.step,
            )
    result = BenchResult(config, model, vocab, salt, runs, sweep)
    if config.out_dir is not None:
        from splitserve.bench.report import write_outputs  # imported here: report imports this module

        write_outputs(result, config.out_dir)
    return result


def _workload(load: TraceLoad | SyntheticSpec, trace: Trace | None, rate: float | None, trial: int) -> Workload:
    if isinstance(load, SyntheticSpec):
        return synthetic(load if rate is None else replace(load, rate=rate, seed=load.seed + trial))
    assert trace is not None
    if rate is None:
        return from_trace(trace, load.scaling)
    return at_rate(trace, replace(load.scaling, seed=load.scaling.seed + trial), rate)


def _validate(c: BenchConfig) -> None:
    if c.concurrency is not None and c.concurrency < 1:
        raise BenchConfigError(f"concurrency must be >= 1, got {c.concurrency}")
    if not c.timeout_s > 0 or (c.deadline_s is not None and not c.deadline_s > 0):
        raise BenchConfigError("timeout and deadline must be positive")
    for name, v in (("TTFT", c.slo.ttft_s), ("TPOT", c.slo.tpot_s)):
        if v is not None and not v > 0:
            raise BenchConfigError(f"the {name} SLO must be a positive number of seconds, got {v}")
    if c.sweep is None:
        return
    if not c.slo.set:
        raise BenchConfigError("a goodput sweep needs an SLO: give --slo-ttft and/or --slo-tpot")
    if c.concurrency is not None:
        raise BenchConfigError("a rate sweep needs open-loop load: drop --concurrency")
    s = c.sweep
    check_sweep(s.rate_lo, s.rate_hi, c.attainment, s.trials, s.step)
