"""A bench result: its runs (one, or a sweep's trials) and goodput; as one JSON document, and read back."""

from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from splitserve.bench.config import BenchConfig
from splitserve.bench.vocab import Vocab
from splitserve.workload.goodput import Goodput
from splitserve.workload.record import RequestRecord
from splitserve.workload.requests import Workload
from splitserve.workload.slo import Summary

FORMAT = "splitserve-bench/1"


@dataclass
class Run:
    rate: float | None  # the rate a sweep asked for; None for a plain run
    trial: int
    workload: Workload
    records: list[RequestRecord]
    summary: Summary
    # Unix time of the run's clock zero (taken just before the run starts, within milliseconds of it), so its
    # records line up with a server's own logs, e.g. `serve --step-log-dir`'s steps.
    started_unix: float | None = None


@dataclass(frozen=True)
class RateTrials:
    """A rate a sweep probed: its trials' SLO attainments, judged by their median (which one unlucky trial
    cannot move)."""

    rate: float
    attainments: tuple[float, ...]
    median: float
    passed: bool

    @classmethod
    def judged(cls, rate: float, attainments: tuple[float, ...], target: float) -> RateTrials:
        median = statistics.median(attainments)
        return cls(rate, attainments, median, median >= target)


@dataclass
class BenchResult:
    config: BenchConfig
    model: str
    vocab: Vocab
    salt: int
    runs: list[Run]
    sweep: Goodput[RateTrials] | None = None

    @property
    def summary(self) -> Summary:
        """The run's summary (for a sweep: the last trial's)."""
        return self.runs[-1].summary


class ResultFileError(Exception):
    """A result file that cannot be read back; the message names it."""


def summary_dict(run: Run) -> dict[str, Any]:
    out = dataclasses.asdict(run.summary)
    out["cache_hit_rate"] = run.summary.cache_hit_rate
    return out


def result_dict(result: BenchResult) -> dict[str, Any]:
    single = result.sweep is None
    return {
        "format": FORMAT,
        "config": dataclasses.asdict(result.config),
        "target": {"url": result.config.url, "model": result.model, "tokenizer": result.vocab.source},
        "prompt_salt": result.salt,
        "summary": summary_dict(result.runs[-1]) if single else None,
        "sweep": None if single else {**dataclasses.asdict(result.sweep), "target": result.config.attainment},
        "runs": [
            {
                "rate": run.rate,
                "trial": run.trial,
                "started_unix": run.started_unix,
                "workload": {
                    "source": run.workload.source,
                    "notes": list(run.workload.notes),
                    "params": run.workload.params,
                    "num_requests": len(run.workload.requests),
                },
                "summary": summary_dict(run),
                "records": [dataclasses.asdict(r) for r in run.records],
            }
            for run in result.runs
        ],
    }


def write_json(result: BenchResult, path: Path) -> None:
    # msgspec writes non-finite floats as null: the file stays valid JSON for any reader.
    path.write_bytes(msgspec.json.encode(result_dict(result), enc_hook=str))


def read_json(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ResultFileError(f"result file not found: {p}")
    try:
        doc = msgspec.json.decode(p.read_bytes())
    except msgspec.DecodeError as e:
        raise ResultFileError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ResultFileError(f"{p}: not a splitserve bench result (expected format {FORMAT!r})")
    return doc
