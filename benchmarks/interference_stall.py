"""Where each request's worst stall went: its longest gap between two tokens, laid over the decode worker's
own step log (`serve --step-log-dir`) on the same Unix clock.

A gap is one step long when nothing goes wrong: the step that made the later token. Longer, the worker's log
says which of these it was:
  prompt in step   the longest step inside the gap computed prompt tokens beside the decodes (a local prefill
                   or a recompute on the decode worker)
  long step        the longest step filled most of the gap without prompt tokens (a big batch, the host)
  worker paused    the worker was not stepping for most of the gap (waiting for work, KV, or the CPU)
  steps passed     the worker stepped on through the gap while the token was not delivered (the request out
                   of the batch, or its token held up between the worker and the client)
The client's clock is lined up with the log by each run's `started_unix` (taken within milliseconds of the
run's zero), far finer than a decode step.
"""

from __future__ import annotations

import glob
from collections import Counter
from pathlib import Path
from statistics import median
from typing import Sequence

from splitserve.bench.results import Run
from splitserve.runtime.worker.step_log import read_step_log

CAUSES = ("prompt in step", "long step", "worker paused", "steps passed")


def decode_steps(step_dir: Path) -> list[tuple[float, float, int]]:
    """(start, seconds, prompt tokens) of every step of every worker that decodes, by start time."""
    steps = []
    for path in glob.glob(str(step_dir / "steps-*.jsonl")):
        header, logged = read_step_log(path)
        if header["role"] != "prefill":
            steps += [(s["t"], s["s"], sum(b[0] for b in s["b"] if b[0] > 1)) for s in logged]
    return sorted(steps)


def classify(window: tuple[float, float], steps: Sequence[tuple[float, float, int]]) -> tuple[str, dict]:
    """The cause of one gap (Unix start and end) from the steps overlapping it, and the figures behind it."""
    lo, hi = window
    inside = [(t, s, p) for t, s, p in steps if t < hi and t + s > lo]
    overlap = [min(t + s, hi) - max(t, lo) for t, s, _ in inside]
    busy = sum(overlap)
    length = hi - lo
    longest = max(range(len(inside)), key=lambda i: overlap[i], default=None)
    figures = {"gap_s": length, "steps": len(inside), "busy_s": busy,
               "longest_step_s": inside[longest][1] if longest is not None else 0.0,
               "prompt_tokens": inside[longest][2] if longest is not None else 0}
    if longest is not None and inside[longest][2] and overlap[longest] >= length / 2:
        return "prompt in step", figures
    if longest is not None and overlap[longest] >= length / 2:
        return "long step", figures
    if busy < length / 2:
        return "worker paused", figures
    return "steps passed", figures


def stall_breakdown(runs: Sequence[Run], step_dir: Path, decode_step_s: float | None) -> dict:
    """Per cause: how many requests' worst gaps it explains, and those gaps' median and largest size in
    decode steps; with the five worst gaps' figures."""
    steps = decode_steps(step_dir)
    found: list[tuple[str, dict]] = []
    for run in runs:
        if run.started_unix is None:
            continue
        for r in run.records:
            times = r.token_times_s
            if not r.ok or len(times) < 2:
                continue
            i = max(range(1, len(times)), key=lambda k: times[k] - times[k - 1])
            found.append(classify((run.started_unix + times[i - 1], run.started_unix + times[i]), steps))
    unit = decode_step_s or float("nan")
    by_cause = {c: [f["gap_s"] / unit for cause, f in found if cause == c] for c in CAUSES}
    worst = sorted(found, key=lambda cf: -cf[1]["gap_s"])[:5]
    return {
        "requests": len(found),
        "causes": {c: {"requests": len(g), "gap_steps_p50": median(g) if g else None, "gap_steps_max": max(g, default=None)}
                   for c, g in by_cause.items()},
        "most_common": Counter(c for c, _ in found).most_common(1)[0][0] if found else None,
        "worst": [{"cause": c, **f} for c, f in worst],
    }
