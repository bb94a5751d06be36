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

Each gap is counted in two units: the run's median decode step (mostly batch 1 at a light load), and the
median decode-only step at the batch size the worker ran during the gap. A batch of four takes ~2.5 batch-1
steps on one core, so one such step is a gap of ~2.5 median steps but of one step at its batch: the second
unit says whether anything held the token beyond the step that made it.

And each gap counts the decode steps that ended within it. An ordinary gap has one, the step that made the
later token (the next step has begun, but not ended, when that token reaches the client). The hand-off from
the prefill worker has two at best: the decode worker's step in flight when the first token reached the
client, and the step that made the second token (which cannot start earlier: a step does not take new
requests once it runs). A third means the request sat a whole step out, e.g. its KV reached the decode
engine after the step began.
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


Step = tuple[float, float, int, int]  # start (Unix s), seconds, prompt tokens, sequences in the batch


def decode_steps(step_dir: Path) -> list[Step]:
    """Every step of every worker that decodes, by start time."""
    steps = []
    for path in glob.glob(str(step_dir / "steps-*.jsonl")):
        header, logged = read_step_log(path)
        if header["role"] != "prefill":
            steps += [(s["t"], s["s"], sum(b[0] for b in s["b"] if b[0] > 1), len(s["b"])) for s in logged]
    return sorted(steps)


def step_by_batch(steps: Sequence[Step]) -> dict[int, float]:
    """The median seconds of a decode-only step (no prompt tokens) per batch size."""
    seconds: dict[int, list[float]] = {}
    for _, s, prompt, batch in steps:
        if not prompt and batch:
            seconds.setdefault(batch, []).append(s)
    return {batch: median(v) for batch, v in seconds.items()}


def classify(window: tuple[float, float], steps: Sequence[Step]) -> tuple[str, dict]:
    """The cause of one gap (Unix start and end) from the steps overlapping it, and the figures behind it."""
    lo, hi = window
    inside = [(t, s, p, n) for t, s, p, n in steps if t < hi and t + s > lo]
    overlap = [min(t + s, hi) - max(t, lo) for t, s, _, _ in inside]
    busy = sum(overlap)
    length = hi - lo
    longest = max(range(len(inside)), key=lambda i: overlap[i], default=None)
    figures = {"gap_s": length, "steps": len(inside), "steps_ended": sum(lo < t + s <= hi for t, s, _, _ in inside),
               "busy_s": busy,
               "longest_step_s": inside[longest][1] if longest is not None else 0.0,
               "prompt_tokens": inside[longest][2] if longest is not None else 0,
               "batch": inside[longest][3] if longest is not None else 0}
    if longest is not None and inside[longest][2] and overlap[longest] >= length / 2:
        return "prompt in step", figures
    if longest is not None and overlap[longest] >= length / 2:
        return "long step", figures
    if busy < length / 2:
        return "worker paused", figures
    return "steps passed", figures


def stall_breakdown(runs: Sequence[Run], step_dir: Path, decode_step_s: float | None) -> dict:
    """Per cause: how many requests' worst gaps it explains, and those gaps' median and largest size in
    decode steps (the run's median step, and the step at the gap's batch size); the most decode steps that
    ended within any worst gap, and how many worst gaps had more than two; with the five worst gaps' figures."""
    steps = decode_steps(step_dir)
    at_batch = step_by_batch(steps)
    unit = decode_step_s or float("nan")
    found: list[tuple[str, dict]] = []
    for run in runs:
        if run.started_unix is None:
            continue
        for r in run.records:
            times = r.token_times_s
            if not r.ok or len(times) < 2:
                continue
            i = max(range(1, len(times)), key=lambda k: times[k] - times[k - 1])
            cause, figures = classify((run.started_unix + times[i - 1], run.started_unix + times[i]), steps)
            # No decode-only step of that batch size (the gap's longest step carried a prompt): the run's unit.
            figures["gap_steps"] = figures["gap_s"] / unit
            figures["gap_batch_steps"] = figures["gap_s"] / at_batch.get(figures["batch"], unit)
            found.append((cause, figures))
    by_cause = {c: [f for cause, f in found if cause == c] for c in CAUSES}
    worst = sorted(found, key=lambda cf: -cf[1]["gap_s"])[:5]
    return {
        "requests": len(found),
        "causes": {c: {"requests": len(g),
                       "gap_steps_p50": median(f["gap_steps"] for f in g) if g else None,
                       "gap_steps_max": max((f["gap_steps"] for f in g), default=None),
                       "gap_batch_steps_p50": median(f["gap_batch_steps"] for f in g) if g else None,
                       "gap_batch_steps_max": max((f["gap_batch_steps"] for f in g), default=None)}
                   for c, g in by_cause.items()},
        "gap_batch_steps_max": max((f["gap_batch_steps"] for _, f in found), default=None),
        "steps_ended_max": max((f["steps_ended"] for _, f in found), default=None),
        "requests_over_2_steps": sum(f["steps_ended"] > 2 for _, f in found),
        "step_s_by_batch": {str(b): v for b, v in sorted(at_batch.items())},
        "most_common": Counter(c for c, _ in found).most_common(1)[0][0] if found else None,
        "worst": [{"cause": c, **f} for c, f in worst],
    }
