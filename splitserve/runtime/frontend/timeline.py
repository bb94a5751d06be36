"""A request's phases laid out in time, from its phase record: for the dashboard's timeline and for the
Chrome/Perfetto trace (`GET /debug/trace`). One layout, so the two views never disagree.

A record holds durations measured on different clocks (the frontend's, each worker's); placed end to end
from the request's arrival on the frontend clock they give each phase's start and end:

    frontend   request [0, e2e]   reserve [0, r]                               (r: blocks reserved on D)
    prefill    queue [r, r+q]   prefill [r+q, r+q+p]                           (on P's queue, then computing)
    kv link    transfer [r+q, r+k]                                             (k: D's reservation to complete KV;
    decode     wait-for-KV [r, r+k]   decode [max(ttft, r+k), e2e]              layer-wise, so it overlaps prefill)

Every phase is clipped to the request's end (a duration from another clock can reach past it).
A request computed whole on one worker (local, colocated) has queue [0, q], prefill [q, ttft] and decode
[ttft, e2e] on that worker. A recompute keeps what its split attempt measured, then `recompute` on the
decode worker from the last of those phases to the end.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from splitserve.runtime.frontend.phases import PhaseRecord

FRONTEND, LINK = "frontend", "kv link"


@dataclass(frozen=True)
class Span:
    track: str  # "frontend", "kv link", or the URL of the worker it ran on
    role: str  # frontend | link | prefill | decode | colocated: how the track is labelled
    name: str  # request | reserve | queue | prefill | transfer | wait-for-KV | decode | recompute
    start: float  # seconds on the frontend's monotonic clock
    end: float


def phase_spans(rec: PhaseRecord) -> list[Span]:
    """The phases of one finished request, in the order they began."""
    t0 = rec.arrival
    spans: list[Span] = []

    def add(track: str | None, role: str, name: str, start: float | None, end: float | None) -> None:
        if rec.e2e_s is not None and end is not None:
            # Durations from other clocks (D's wait-for-KV counts from its own reservation, which the frontend
            # learns of later) can reach past the request's end by that delay: nothing ran after the end.
            end = min(end, rec.e2e_s)
        if track is not None and start is not None and end is not None and end > start:
            spans.append(Span(track, role, name, t0 + start, t0 + end))

    add(FRONTEND, "frontend", "request", 0.0, rec.e2e_s)
    d_role = "colocated" if rec.path == "colocated" else "decode"
    if rec.path in ("local", "colocated"):
        q = rec.queue_s or 0.0
        add(rec.decode_worker, d_role, "queue", 0.0, q)
        add(rec.decode_worker, d_role, "prefill", q, rec.ttft_s)
        add(rec.decode_worker, d_role, "decode", rec.ttft_s, rec.e2e_s)
        return spans
    r = rec.reserve_s
    add(FRONTEND, "frontend", "reserve", 0.0, r)
    ends = [r or 0.0]
    if r is not None and rec.queue_s is not None and rec.prefill_s is not None:
        add(rec.prefill_worker, "prefill", "queue", r, r + rec.queue_s)
        add(rec.prefill_worker, "prefill", "prefill", r + rec.queue_s, r + rec.queue_s + rec.prefill_s)
        ends.append(r + rec.queue_s + rec.prefill_s)
    kv_done = r + rec.kv_wait_s if r is not None and rec.kv_wait_s is not None else None
    if kv_done is not None:
        add(LINK, "link", "transfer", r + (rec.queue_s or 0.0), kv_done)
        add(rec.decode_worker, "decode", "wait-for-KV", r, kv_done)
        ends.append(kv_done)
    if rec.path == "recompute":
        add(rec.decode_worker, "decode", "recompute", max(ends), rec.e2e_s)
    elif rec.ttft_s is not None and rec.e2e_s is not None:
        # Decoding starts when the KV is complete, unless that estimate lands at or past the end (clock skew).
        start = max(rec.ttft_s, kv_done) if kv_done is not None and kv_done < rec.e2e_s else rec.ttft_s
        add(rec.decode_worker, "decode", "decode", start, rec.e2e_s)
    return sorted(spans, key=lambda s: s.start)


def exposed_transfer_s(rec: PhaseRecord) -> float | None:
    """KV transfer time not hidden behind the prompt's compute: complete KV after the last layer computed."""
    if None in (rec.reserve_s, rec.queue_s, rec.prefill_s, rec.kv_wait_s):
        return None
    return max(0.0, rec.kv_wait_s - rec.queue_s - rec.prefill_s)  # type: ignore[operator]


def chrome_trace(records: Iterable[PhaseRecord]) -> dict[str, Any]:
    """Trace-event JSON (the format chrome://tracing and ui.perfetto.dev open): a process per track (the
    frontend, the KV link, each worker), a thread per request, a complete ("X") event per phase. Times in
    microseconds on the frontend's monotonic clock."""
    pids: dict[str, int] = {}
    named: set[tuple[int, int]] = set()
    events: list[dict[str, Any]] = []
    for tid, rec in enumerate(records, start=1):
        args = {k: v for k, v in rec.as_dict().items() if k not in ("arrival", "route") and v not in (None, [], {})}
        for s in phase_spans(rec):
            if s.track not in pids:
                pids[s.track] = pid = len(pids) + 1
                label = s.track if s.role in ("frontend", "link") else f"{s.role} {s.track}"
                events.append({"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "args": {"name": label}})
                events.append({"ph": "M", "name": "process_sort_index", "pid": pid, "tid": 0, "args": {"sort_index": pid}})
            pid = pids[s.track]
            if (pid, tid) not in named:
                named.add((pid, tid))
                events.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": rec.request_id}})
            events.append({
                "ph": "X", "name": s.name, "cat": rec.path, "pid": pid, "tid": tid,
                "ts": round(s.start * 1e6, 3), "dur": round((s.end - s.start) * 1e6, 3),
                "args": args if s.name == "request" else {"request_id": rec.request_id},
            })
    return {"traceEvents": events, "displayTimeUnit": "ms"}
