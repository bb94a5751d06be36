"""Per-request phase records (queue, prefill, transfer, wait-for-KV, decode), kept for recent requests.

TTFT alone hides where time goes; these records show it per request (GET /debug/requests)."""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass, field


@dataclass
class PhaseRecord:
    request_id: str
    arrival: float  # frontend monotonic clock
    path: str = "split"  # split | local (prefilled on the decode worker) | colocated | recompute
    prefill_worker: str | None = None
    decode_worker: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens the computing worker found in its prefix cache
    decode_cached_tokens: int = 0  # prompt tokens the decode worker already held: their KV was not sent
    output_tokens: int = 0
    reserve_s: float | None = None  # arrival to blocks reserved on the decode worker
    queue_s: float | None = None  # waiting in the computing worker's queue
    prefill_s: float | None = None  # computing the prompt
    ttft_s: float | None = None
    kv_wait_s: float | None = None  # decode side: reservation to complete KV
    decode_s: float | None = None  # first token to last
    e2e_s: float | None = None
    finish_reason: str | None = None
    error: str | None = None
    events: list[str] = field(default_factory=list)  # failures and fallbacks, in order
    route: dict[str, float] = field(default_factory=dict)  # the cost model's terms behind the placement

    def as_dict(self) -> dict:
        return asdict(self)


class PhaseLog:
    def __init__(self, capacity: int = 512) -> None:
        self._records: deque[PhaseRecord] = deque(maxlen=capacity)

    def add(self, record: PhaseRecord) -> None:
        self._records.append(record)

    def recent(self, limit: int = 100) -> list[dict]:
        return [r.as_dict() for r in self.records(limit)]

    def records(self, limit: int = 100) -> list[PhaseRecord]:
        """The last `limit` records, oldest first."""
        return list(self._records)[-limit:]
