"""The simulator's moving parts: a request on its way through the cluster (`SimRequest`; on the split path
its lifecycle is the core `SplitRequest`) and a model replica (`Worker`: a real Scheduler, a performance
model, a NIC, counters).

Prompts carry deterministic token ids and precomputed chained block hashes: requests whose
`RequestSpec.prefix_blocks` agree share exactly those leading blocks, as `bench`'s PromptBuilder prompts do
(`prompt_block_hashes`), so the prefix cache hits in simulation where it would on the real engine. The
hashes are computed from the spec rather than by hashing materialised tokens: a Mooncake run would
otherwise spend most of its time in blake2b and hold gigabytes of token lists.
"""

from __future__ import annotations

from collections import deque
from typing import Protocol

from splitserve.core.request import Request, SamplingParams
from splitserve.core.scheduler import Scheduler, SchedulerOutput
from splitserve.core.split_request import SplitRequest
from splitserve.sim.cluster_spec import PoolSpec
from splitserve.sim.perf import PerfModel
from splitserve.workload.record import RequestRecord
from splitserve.workload.requests import RequestSpec

SAMPLED_TOKEN = 7  # any non-EOS id: requests run with ignore_eos
_MASK63 = (1 << 63) - 1


def prompt_block_hashes(spec: RequestSpec, index: int, block_size: int) -> list[int]:
    """Chained hashes of the prompt's full blocks: equal for two requests exactly where PromptBuilder would
    give them equal leading tokens (same prefix block ids), unique to the request after that."""
    bt, ids = spec.block_tokens, spec.prefix_blocks
    shared = min(len(ids) * bt, spec.input_len)
    hashes, parent = [], 0
    blocks = spec.input_len // block_size
    common = min(blocks, shared // block_size)  # block j lies within the shared tokens iff j < shared // block_size
    for j in range(common):
        lo, hi = j * block_size, (j + 1) * block_size
        k0, k1 = lo // bt, (hi - 1) // bt
        if k0 == k1:
            key: tuple = (ids[k0], lo - k0 * bt)
        else:
            key = tuple((ids[k], max(lo, k * bt) - k * bt, min(hi, (k + 1) * bt) - k * bt) for k in range(k0, k1 + 1))
        parent = (hash((parent, key)) & _MASK63) or 1
        hashes.append(parent)
    for j in range(common, blocks):  # the request's own blocks (most of a synthetic prompt's)
        parent = (hash((parent, (-1, index, j))) & _MASK63) or 1
        hashes.append(parent)
    return hashes


class SimRequest:
    """One workload request as it moves through the cluster; `record` is bench's record of it."""

    __slots__ = ("index", "spec", "id", "block_size", "_prompt", "_hashes", "record", "req", "split", "prefill_start",
                 "second", "failed", "judged", "admitted")

    def __init__(self, index: int, spec: RequestSpec, block_size: int) -> None:
        self.index, self.spec, self.id, self.block_size = index, spec, str(index), block_size
        self._prompt: list[int] | None = None
        self._hashes: list[int] | None = None
        self.record = RequestRecord(index, spec.arrival_s, spec.input_len, spec.output_len, sent_s=spec.arrival_s,
                                    prompt_tokens=spec.input_len, status=200)
        self.req: Request | None = None  # the request that decodes (colocated: the only one)
        self.split: SplitRequest | None = None  # disaggregated: its way from reservation to the last token
        self.prefill_start: float | None = None
        self.second: float | None = None  # the second token (the first decode step after the KV is complete)
        self.failed = False
        self.judged = False  # its misses count towards stopping the run (`ClusterSim.run`'s `judged`)
        self.admitted = False  # in the frontend's waiting room (admission), until its first token

    # The prompt and its hashes are built when the request arrives, not with the run: a probe stopped early
    # never reaches its later requests (long prompts: 16k-token lists and 128 hashes each).

    @property
    def prompt(self) -> list[int]:
        """Token values only matter for partial blocks (decode extends the chain from `hashes`)."""
        if self._prompt is None:
            self._prompt = [1000 + self.index % 50000] * self.spec.input_len
        return self._prompt

    @property
    def hashes(self) -> list[int]:
        if self._hashes is None:
            self._hashes = prompt_block_hashes(self.spec, self.index, self.block_size)
        return self._hashes

    @property
    def kv_ready(self) -> float | None:
        """When the decode worker had the whole prompt's KV: where it was computed, the first token."""
        if self.split is not None and self.split.kv_complete_at is not None:
            return self.split.kv_complete_at
        return self.record.first_token_s

    def make(self, max_tokens: int, now: float, hold_kv: bool = False) -> Request:
        r = Request(self.id, self.prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True), now, hold_kv=hold_kv)
        r.block_hashes = list(self.hashes)
        return r


class RunWatch(Protocol):
    """What a run's caller may follow of its judged requests, to stop the run once the outcome it will judge is
    certain (`ClusterSim.run`'s `watch`): arrivals, refusals (after their arrival), first tokens, ends."""

    def arrived(self, rec: RequestRecord) -> None: ...

    def refused(self, rec: RequestRecord) -> None: ...

    def first_token(self, rec: RequestRecord) -> None: ...

    def finished(self, rec: RequestRecord) -> None: ...

    def certain(self, now: float) -> bool: ...


class Worker:
    """One model replica: a real Scheduler, a performance model, a NIC, and counters."""

    def __init__(self, wid: int, pool: PoolSpec, perf: PerfModel, sched: Scheduler, link_bw: float) -> None:
        self.id, self.pool, self.role, self.perf, self.sched, self.link_bw = wid, pool, pool.role, perf, sched, link_bw
        self.busy = False
        self.out: SchedulerOutput | None = None
        self.step_start = 0.0
        self.step_seconds = 0.0
        self.nic_free = 0.0
        self.pending: deque[SimRequest] = deque()  # decode side: waiting for blocks to reserve
        self.busy_s = self.flops = self.bytes = 0.0
        self.steps = self.seq_steps = self.tokens = self.preemptions = 0

    @property
    def free_blocks(self) -> int:
        return self.sched.pool.num_free_blocks
