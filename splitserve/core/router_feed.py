"""RouterFeed: keeps the Router's view of the workers current from their reports, the one way both the
runtime (a worker's `/internal/state`, polled over HTTP) and the simulator (a simulated worker after each of
its steps) feed it.

A report carries the worker's generation, its KV events since the position the feed asked from (or a
snapshot of its cached hashes), its scheduler's load, and cumulative counters: steps and seconds by phase,
link bytes and seconds. The feed applies the events (a gap: the caller answers with a snapshot report),
replaces the worker's load, and turns the counters' growth since the worker's previous report into
measurements. What counts as a prefill token (`prefill_tokens`) and as a worker's running requests
(`running`) is defined here, once, for both.

Pure: no clock, no I/O; the caller passes `now`.
"""

from __future__ import annotations

from dataclasses import dataclass

from splitserve.core.blocks import KVEvent
from splitserve.core.prefix_index import Generation
from splitserve.core.router import Role, Router, WorkerId
from splitserve.core.scheduler import SchedulerLoad, SchedulerOutput


def prefill_tokens(out: SchedulerOutput) -> int:
    """Prompt tokens a step computes: any sequence computing several tokens (a prompt, a chunk of one, a
    recompute) or any part of its prompt (a one-token prompt, a prompt's last one-token chunk). A decode
    step computes none."""
    tokens = 0
    for s in out.seqs:  # a loop, not sum() over a generator: this runs for every sequence of every step
        if s.num_new_tokens > 1 or s.start_pos < len(s.request.prompt_token_ids):
            tokens += s.num_new_tokens
    return tokens


def running(load: SchedulerLoad) -> int:
    """The requests the Router counts as running on a worker: every unfinished one there, whether queued,
    decoding, waiting for a running slot or for its KV. A prefill worker's held blocks are not requests."""
    return load.waiting + load.running + load.ready + load.reserved


@dataclass
class StepCounters:
    """Cumulative work and busy time by phase, kept by whoever runs the steps (the engine, the simulated
    worker). A step with any prompt tokens counts, whole, as a prefill step: its seconds are what the
    prompt tokens cost with the decodes beside them."""

    prefill_steps: int = 0
    prefill_tokens: int = 0
    prefill_s: float = 0.0
    decode_steps: int = 0
    decode_s: float = 0.0

    def count(self, out: SchedulerOutput, seconds: float) -> None:
        tokens = prefill_tokens(out)
        if tokens:
            self.prefill_steps += 1
            self.prefill_tokens += tokens
            self.prefill_s += seconds
        else:
            self.decode_steps += 1
            self.decode_s += seconds


@dataclass(frozen=True)
class WorkerReport:
    """A worker's state as the router reads it (in the runtime, the body of `/internal/state`)."""

    generation: Generation
    last_seq: int  # the worker's latest KV event
    events: list[KVEvent] | None  # after the position asked from; None: some were dropped, send a snapshot
    snapshot: list[int] | None  # cached block hashes as of last_seq, when asked for (events are then unused)
    load: SchedulerLoad
    counters: StepCounters
    link_bytes: float = 0.0  # prefill side: bytes and wire seconds of the KV sends it measured
    link_s: float = 0.0


@dataclass(frozen=True)
class _Seen:
    generation: Generation
    counters: StepCounters
    link_bytes: float
    link_s: float


class RouterFeed:
    def __init__(self, router: Router) -> None:
        self.router = router
        self._seen: dict[WorkerId, _Seen] = {}  # each worker's previous counters, to measure their growth

    def join(
        self, worker_id: WorkerId, role: Role, generation: Generation, total_blocks: int,
        chunk_while_decoding: int | None = None,
    ) -> None:
        """Register a worker; its cache is known from its first report with a snapshot (or from events that
        start at its generation's first)."""
        self.router.register(worker_id, role, generation, total_blocks, chunk_while_decoding)

    def leave(self, worker_id: WorkerId) -> None:
        self.router.deregister(worker_id)
        self._seen.pop(worker_id, None)

    def after(self, worker_id: WorkerId) -> int:
        """The last KV event the Router has of the worker: ask for the events after it."""
        position = self.router.index.position(worker_id)
        return position[1] if position else 0

    def report(self, worker_id: WorkerId, r: WorkerReport, now: float) -> bool:
        """Apply a report. False: its events leave a gap (or were dropped); nothing of it was applied, and
        the caller sends a report with a snapshot. A report of an unregistered worker, or of an older
        generation than the Router follows, changes nothing."""
        router = self.router
        if worker_id not in router.workers:
            return True
        if r.snapshot is not None:
            router.resync(worker_id, r.generation, r.last_seq, r.snapshot)
        elif r.events is None or not router.on_events(worker_id, r.generation, r.events, r.last_seq):
            return False
        position = router.index.position(worker_id)
        if position is None or position[0] != r.generation:
            return True  # a dead process's late report
        load = r.load
        router.update_load(worker_id, free_blocks=load.free_blocks, running=running(load),
                           queued_prefill_tokens=load.queued_prefill_tokens, now=now)
        self._measure(worker_id, r, now)
        return True

    def _measure(self, worker_id: WorkerId, r: WorkerReport, now: float) -> None:
        """Per-token prefill cost, decode step time and link speed from the counters' growth since the
        worker's previous report of the same generation (a restarted worker's counters start again)."""
        prev = self._seen.get(worker_id)
        c = r.counters
        self._seen[worker_id] = _Seen(r.generation, StepCounters(**vars(c)), r.link_bytes, r.link_s)
        if prev is None or prev.generation != r.generation:
            return
        p, router = prev.counters, self.router
        steps, tokens, seconds = c.prefill_steps - p.prefill_steps, c.prefill_tokens - p.prefill_tokens, c.prefill_s - p.prefill_s
        if steps > 0 and tokens > 0 and seconds > 0:
            router.observe_prefill(worker_id, tokens, seconds, steps, now)
        steps, seconds = c.decode_steps - p.decode_steps, c.decode_s - p.decode_s
        if steps > 0 and seconds > 0:
            router.observe_decode_step(worker_id, seconds / steps)
        nbytes, seconds = r.link_bytes - prev.link_bytes, r.link_s - prev.link_s
        if nbytes > 0 and seconds > 0:
            router.observe_transfer(nbytes, seconds)
