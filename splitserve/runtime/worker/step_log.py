"""A JSON-lines record of every engine step: when it started, how long it took, what it computed.

It is what `splitserve plan`'s simulator needs to be checked against a real deployment step by step
(`benchmarks/sim_accuracy.py` reads it to measure how fast the machine really ran during a load; a shared
machine's speed drifts). One file per engine process: `DIR/steps-ROLE-PID.jsonl`. The first line says
whose file it is; each further line is one step:

    {"t": 1795046400.123, "s": 0.0412, "b": [[new_tokens, cached_tokens, samples], ...]}

`t` is Unix time (comparable across processes), `s` the step's wall seconds, `b` one entry per sequence.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import IO

import msgspec


class StepLog:
    def __init__(self, directory: str | Path, role: str) -> None:
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        self.path = path / f"steps-{role}-{os.getpid()}.jsonl"
        # Unbuffered: a reader sees every step as soon as it ends (one write per step costs nothing beside it).
        self._file: IO[bytes] = open(self.path, "ab", buffering=0)
        self._encode = msgspec.json.Encoder().encode
        self._lock = threading.Lock()
        self._write({"role": role, "pid": os.getpid(), "clock": "unix"})

    def _write(self, record: dict) -> None:
        with self._lock:
            self._file.write(self._encode(record) + b"\n")

    def observe(self, out, seconds: float) -> None:
        """One step: the scheduler's output and its measured seconds (an Engine step observer)."""
        batch = [[s.num_new_tokens, s.start_pos, int(s.sample)] for s in out.seqs]
        self._write({"t": time.time() - seconds, "s": seconds, "b": batch})


def read_step_log(path: str | Path) -> tuple[dict, list[dict]]:
    """(header, steps) of one step-log file. A last line cut short (its worker killed mid-write, as a
    benchmark stopping its servers may do) is left out; a damaged line anywhere else is an error."""
    decode = msgspec.json.Decoder().decode
    with open(path, "rb") as f:
        raw = [line for line in f if line.strip()]
    lines = []
    for i, line in enumerate(raw):
        try:
            lines.append(decode(line))
        except msgspec.DecodeError:
            if i < len(raw) - 1 or line.endswith(b"\n"):
                raise ValueError(f"{path}: line {i + 1} is not a step record") from None
    if not lines or "role" not in lines[0]:
        raise ValueError(f"{path}: not a splitserve step log")
    return lines[0], lines[1:]
