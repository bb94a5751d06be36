"""The Python API: `run_bench(BenchConfig) -> BenchResult`, one run or a goodput sweep.

The CLI and the project's benchmark scripts both come through here.
"""

from __future__ import annotations

import asyncio
import secrets
from typing import Callable

from rich.console import Console

from splitserve.bench.client import EndpointError, Target, resolve_model, run_load
from splitserve.bench.config import BenchConfig, BenchConfigError, TraceLoad, check_config
from splitserve.bench.idle import read_in_flight, wait_idle
from splitserve.bench.output import write_outputs
from splitserve.bench.progress import RunProgress
from splitserve.bench.prompts import PromptBuilder
from splitserve.bench.results import BenchResult, RateTrials, Run
from splitserve.bench.run_store import load_run, run_key, run_path, save_run
from splitserve.bench.vocab import VocabError, find_vocab
from splitserve.workload.goodput import Bracket, search_goodput
from splitserve.workload.requests import (
    Scaling,
    SyntheticSpec,
    Trace,
    Workload,
    WorkloadError,
    read_trace,
    trial_workload,
)
from splitserve.workload.record import RequestRecord
from splitserve.workload.slo import SLO, certain_miss, misses_allowed, summarize

# Exceptions that mean bad input, not a bug: report the message, not a traceback.
USER_ERRORS = (BenchConfigError, WorkloadError, EndpointError, VocabError)


def run_bench(config: BenchConfig, console: Console | None = None) -> BenchResult:
    """Measure the target; writes `config.out_dir` when set. Bad input raises an exception whose message is
    fit for the user: one of `USER_ERRORS`."""
    check_config(config)
    if config.out_dir is not None:
        config.out_dir.mkdir(parents=True, exist_ok=True)  # fail now, not after a long run
    trace = read_trace(config.load.path, config.load.format) if isinstance(config.load, TraceLoad) else None
    # Build one workload now, so a bad workload parameter is reported before any network traffic.
    workload_at(config.load, trace, config.sweep.rate_lo if config.sweep else None, 0)
    model = resolve_model(config.url, config.model)
    vocab = find_vocab(model, config.tokenizer)
    salt = config.salt if config.salt is not None else secrets.randbits(63)
    target = Target(config.url, model, config.ignore_eos)
    runs: list[Run] = []
    key = run_key(config, model)

    with RunProgress(config.progress, console, config.live_table) as progress:

        def measure(rate: float | None, trial: int) -> Run:
            workload = workload_at(config.load, trace, rate, trial)
            kept = run_path(config.out_dir, rate, trial) if config.out_dir is not None else None
            found = load_run(kept, key) if kept is not None and config.resume else None
            if found is not None:
                records, started = found
            else:
                settle(config, console)
                label = f"rate {rate:g} req/s, trial {trial + 1}" if rate is not None else "requests"
                progress.start_run(label, len(workload.requests))
                # Each run draws its own prompt tokens, so no trial finds an earlier trial's prompts cached.
                builder = PromptBuilder(vocab, salt + len(runs))
                specs = workload.requests
                stop = config.sweep is not None and config.sweep.stop_certain and rate != config.sweep.rate_lo
                zero: list[float] = []
                records = asyncio.run(
                    run_load(
                        target,
                        specs,
                        lambda i: builder.build(i, specs[i]),
                        concurrency=config.concurrency,
                        timeout_s=config.timeout_s,
                        deadline_s=config.deadline_s,
                        retries=config.retries,
                        on_done=progress.done,
                        stop_when=verdict_certain(config.slo, config.attainment) if stop else None,
                        on_start=zero.append,
                    )
                )
                started = zero[0]
                if kept is not None:
                    save_run(kept, key, records, started)
            run = Run(rate, trial, workload, records, summarize(records, config.slo), started)
            runs.append(run)
            return run

        sweep = None
        if config.sweep is None:
            measure(None, 0)
        else:
            s = config.sweep

            def trials(rate: float) -> RateTrials:
                attainments = tuple(measure(rate, trial).summary.attainment for trial in range(s.trials))
                return RateTrials.judged(rate, attainments, config.attainment)

            sweep = search_goodput(trials, lambda t: t.passed, Bracket(s.rate_lo, s.rate_hi, s.step))
    result = BenchResult(config, model, vocab, salt, runs, sweep)
    if config.out_dir is not None:
        write_outputs(result, config.out_dir)
    return result


def settle(config: BenchConfig, console: Console | None) -> None:
    """Wait for the target to finish what earlier runs left in flight (bench/idle.py), or say why not."""
    if config.idle_timeout_s <= 0:
        return
    if wait_idle(lambda: read_in_flight(config.url), config.idle_timeout_s) is False:
        (console or Console(stderr=True)).print(
            f"[yellow]the server still had requests in flight after {config.idle_timeout_s:g} s; the run starts anyway")


def verdict_certain(slo: SLO, target: float) -> Callable[[list[RequestRecord], float], bool]:
    """A run's stop condition: more of its requests have certainly missed `slo` than `target` allows."""
    def stop(records: list[RequestRecord], now: float) -> bool:
        allowed = misses_allowed(len(records), target)
        return sum(certain_miss(r, slo, now) for r in records) > allowed

    return stop


def workload_at(load: TraceLoad | SyntheticSpec, trace: Trace | None, rate: float | None, trial: int) -> Workload:
    """The requests of one run: `load` at `rate` (None: as given), trial `trial` of that rate (the workload
    layer's trial_workload, given the trace read once per bench). Public, so a simulation of the same run
    (benchmarks.interference's planner check) gets the very same requests."""
    if isinstance(load, SyntheticSpec):
        return trial_workload(load, Scaling(), rate, trial)
    assert trace is not None
    return trial_workload(trace, load.scaling, rate, trial)

