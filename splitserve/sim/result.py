"""What a simulation run reports: per-request records, per-pool utilisation, mean phase times."""

from __future__ import annotations

from dataclasses import dataclass, field

from splitserve.sim.cluster_spec import ClusterSpec, Role
from splitserve.workload.record import RequestRecord
from splitserve.workload.slo import SLO, Summary, summarize


@dataclass
class PoolStats:
    role: Role
    workers: int
    tp: int
    gpus: int
    busy: float  # mean fraction of the time a worker was running a step
    compute_util: float  # FLOPs done / (peak FLOP/s x GPUs x elapsed)
    bandwidth_util: float  # bytes moved / (peak bandwidth x GPUs x elapsed)
    steps: int
    mean_batch: float  # sequences per step
    mean_tokens: float  # tokens per step
    preemptions: int


@dataclass
class Phases:
    """Mean seconds per request in each phase (finished requests)."""

    queue: float  # arrival -> prefill starts (disaggregated: includes waiting for decode blocks)
    prefill: float  # prefill starts -> first token
    transfer: float  # first token -> KV complete on the decode worker (0 colocated)
    decode_wait: float  # KV complete -> the first decode step starts (waiting for a running slot)
    decode: float  # the decode steps

    def as_dict(self) -> dict[str, float]:
        return {"queue_s": self.queue, "prefill_s": self.prefill, "transfer_s": self.transfer,
                "decode_wait_s": self.decode_wait, "decode_s": self.decode}


@dataclass
class SimResult:
    cluster: ClusterSpec
    records: list[RequestRecord]
    pools: list[PoolStats]
    phases: Phases
    elapsed_s: float  # first arrival -> last event
    prefix_hit_rate: float  # prompt tokens found cached where they were computed / prompt tokens
    transfer_bytes: float
    transfer_exposed_s: float  # mean per transferred request: prefill end -> KV complete
    stopped_early: bool = False  # the SLO had already failed for too many requests
    sim_wall_s: float = 0.0
    # Per request (as `records`): seconds spent waiting, not computing: before its prefill starts, and
    # between its KV being complete and its first decode step. None if it did not finish.
    waits: list[float | None] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def summary(self, slo: SLO = SLO()) -> Summary:
        return summarize(self.records, slo)
