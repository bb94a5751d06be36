"""The result file: config, per-request records and summaries as one JSON document, and reading it back."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import msgspec

from splitserve.bench.runner import BenchResult, Run

FORMAT = "splitserve-bench/1"


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
        "sweep": None if single else dataclasses.asdict(result.sweep),
        "runs": [
            {
                "rate": run.rate,
                "trial": run.trial,
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
