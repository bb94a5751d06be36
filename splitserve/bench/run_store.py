"""Each finished run of a bench kept on disk as it ends, so a sweep cut short (a session's end, a killed
process) resumes where it stopped: a run whose file matches the same load and client settings is read back
instead of measured again. The server is not part of the key (a resumed sweep usually talks to a new one on
another port): keeping the deployment the same is the caller's part."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import msgspec

from splitserve.bench.config import BenchConfig
from splitserve.workload.record import RequestRecord

FORMAT = "splitserve-bench-run/1"


def run_key(config: BenchConfig, model: str) -> dict[str, Any]:
    """What a run's records depend on besides the server: the load, the model, and how the client sends and
    judges (the SLO only where a sweep stops runs on it)."""
    sweep = config.sweep
    key: dict[str, Any] = {
        "load": dataclasses.asdict(config.load), "load_type": type(config.load).__name__, "model": model,
        "concurrency": config.concurrency, "timeout_s": config.timeout_s, "deadline_s": config.deadline_s,
        "retries": config.retries, "ignore_eos": config.ignore_eos,
    }
    if sweep is not None and sweep.stop_certain:
        key |= {"slo": dataclasses.asdict(config.slo), "attainment": config.attainment, "rate_lo": sweep.rate_lo}
    # Through JSON, so a key read back from a file compares equal to a fresh one (tuples become lists).
    return msgspec.json.decode(msgspec.json.encode(key, enc_hook=str))


def run_path(out_dir: Path, rate: float | None, trial: int) -> Path:
    return out_dir / "runs" / (f"rate-{rate!r}-trial-{trial}.json" if rate is not None else "single.json")


def save_run(path: Path, key: dict[str, Any], records: list[RequestRecord], started_unix: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")  # written whole, then renamed: a run killed mid-write leaves no half file
    tmp.write_bytes(msgspec.json.encode({"format": FORMAT, "key": key, "started_unix": started_unix,
                                         "records": [dataclasses.asdict(r) for r in records]}))
    tmp.replace(path)


def load_run(path: Path, key: dict[str, Any] | None) -> tuple[list[RequestRecord], float] | None:
    """The records and start time of the run kept at `path` if it was measured under `key` (None: whatever it
    was measured under, for analysing kept runs again); None if there is none or it differs."""
    if not path.is_file():
        return None
    try:
        doc = msgspec.json.decode(path.read_bytes())
    except msgspec.DecodeError:
        return None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or (key is not None and doc.get("key") != key):
        return None
    return [RequestRecord(**r) for r in doc["records"]], doc["started_unix"]
