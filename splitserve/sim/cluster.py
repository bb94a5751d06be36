"""Virtual-time cluster simulator over the real core Scheduler.

Every worker owns a real `Scheduler` and `BlockPool` (the very objects `serve` runs); only the model and the
clock are simulated: a step lasts what the roofline model (`perf.PerfModel`) says, and time jumps from event
to event (arrivals, step ends, KV transfers) on a heap.

Colocated: a request goes to one worker, which prefills it (whole, or in chunks under chunked prefill) and
decodes it. Disaggregated, as the runtime does it: the placement policy picks a decode worker D and D
`reserve`s the prompt's blocks (a request waits in D's FIFO while none are free: never prefill what cannot
be decoded); then a prefill worker P computes the prompt with `hold_kv` and samples the first token (TTFT);
its KV crosses the link (only the blocks D does not already cache; pipelined layer by layer or not) while P
keeps the blocks; when the last byte lands P `release_held`s them and D gets `kv_arrived`.

Prompts carry deterministic token ids and precomputed chained block hashes: requests whose
`RequestSpec.prefix_blocks` agree share exactly those leading blocks, as `bench`'s PromptBuilder prompts do
(`prompt_block_hashes`), so the prefix cache hits in simulation where it would on the real engine. The
hashes are computed from the spec rather than by hashing materialised tokens: a Mooncake run would
otherwise spend most of its time in blake2b and hold gigabytes of token lists.

Cost: about 5-10 us of CPU time per sequence per step plus a few per prompt block (the scheduler and block
pool are pure Python), i.e. roughly (output tokens + prompt blocks) x requests: 10,000 requests of 1k-token
prompts and 64-token outputs take about 8 s of CPU time; long outputs and long prompts cost proportionally
more (the planner raises the block size for long prompts).
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Literal, Sequence

import numpy as np

from splitserve.bench.metrics import SLO, Summary, meets_slo, summarize
from splitserve.bench.record import RequestRecord
from splitserve.core.blocks import BlockPool
from splitserve.core.request import Request, SamplingParams
from splitserve.core.scheduler import QueueFull, Scheduler, SchedulerConfig, SchedulerOutput
from splitserve.sim.hardware import Hardware, Network
from splitserve.sim.models import ModelSpec
from splitserve.sim.perf import Efficiency, PerfModel
from splitserve.sim.workload import RequestSpec

Role = Literal["colocated", "prefill", "decode"]
SAMPLED_TOKEN = 7  # any non-EOS id: requests run with ignore_eos
_MASK63 = (1 << 63) - 1


class InfeasibleConfig(ValueError):
    """The configuration cannot run this workload (model does not fit, KV cache too small, ...)."""


@dataclass(frozen=True)
class PoolSpec:
    role: Role
    count: int
    tp: int = 1
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    chunked_prefill: bool = False
    hardware: Hardware | None = None  # None: the cluster's (different hardware per pool: issue #7)
    efficiency: Efficiency | None = None  # None: the cluster's

    @property
    def gpus(self) -> int:
        return self.count * self.tp

    def describe(self) -> str:
        chunk = f", chunked {self.max_num_batched_tokens}" if self.chunked_prefill else ""
        hw = f" {self.hardware.name}" if self.hardware is not None else ""
        letter = {"colocated": "x", "prefill": "P", "decode": "D"}[self.role]
        return f"{self.count}{letter} TP{self.tp}{hw}{chunk}"


@dataclass(frozen=True)
class ClusterSpec:
    model: ModelSpec
    hardware: Hardware
    pools: tuple[PoolSpec, ...]
    network: Network | None = None  # carries KV between pools (disaggregated only)
    efficiency: Efficiency = Efficiency()
    pipelined: bool = True  # KV sent layer by layer while later layers compute
    block_size: int = 16
    mem_util: float = 0.9
    max_model_len: int | None = None  # None: the longest request of the workload (within the model's limit)
    prefix_caching: bool = True
    max_waiting: int = 1 << 30  # the simulated queue is unbounded unless asked
    kv_blocks: int | None = None  # blocks per worker; None: what the GPU memory holds after the weights
    request_overhead_s: float = 0.0  # arrival -> the request reaches a scheduler (frontend, HTTP, routing)

    def __post_init__(self) -> None:
        roles = sorted(p.role for p in self.pools)
        if roles not in (["colocated"], ["decode", "prefill"]):
            raise InfeasibleConfig(f"a cluster is one colocated pool, or one prefill and one decode pool; got {roles}")
        if self.disaggregated and self.network is None:
            raise InfeasibleConfig("a disaggregated cluster needs a network")
        for p in self.pools:
            if p.count < 1 or p.tp < 1:
                raise InfeasibleConfig(f"pool {p.role}: need count >= 1 and tp >= 1")

    @property
    def disaggregated(self) -> bool:
        return any(p.role == "prefill" for p in self.pools)

    @property
    def gpus(self) -> int:
        return sum(p.gpus for p in self.pools)

    def pool(self, role: Role) -> PoolSpec:
        return next(p for p in self.pools if p.role == role)

    def describe(self) -> str:
        if not self.disaggregated:
            return f"colocated {self.pools[0].describe()}"
        how = "pipelined" if self.pipelined else "unpipelined"
        return f"disaggregated {self.pool('prefill').describe()} + {self.pool('decode').describe()}, {self.network.name} {how}"


# ---------------------------------------------------------------------------------------------- prompts


def prompt_block_hashes(spec: RequestSpec, index: int, block_size: int) -> list[int]:
    """Chained hashes of the prompt's full blocks: equal for two requests exactly where PromptBuilder would
    give them equal leading tokens (same prefix block ids), unique to the request after that."""
    bt, ids = spec.block_tokens, spec.prefix_blocks
    shared = min(len(ids) * bt, spec.input_len)
    hashes, parent = [], 0
    for j in range(spec.input_len // block_size):
        lo, hi = j * block_size, (j + 1) * block_size
        if hi <= shared:
            k0, k1 = lo // bt, (hi - 1) // bt
            if k0 == k1:
                key: tuple = (ids[k0], lo - k0 * bt)
            else:
                key = tuple((ids[k], max(lo, k * bt) - k * bt, min(hi, (k + 1) * bt) - k * bt) for k in range(k0, k1 + 1))
        else:
            key = (-1, index, j)
        parent = (hash((parent, key)) & _MASK63) or 1
        hashes.append(parent)
    return hashes


# ---------------------------------------------------------------------------------------------- state


class SimRequest:
    """One workload request as it moves through the cluster; `record` is bench's record of it."""

    __slots__ = ("index", "spec", "id", "prompt", "hashes", "record", "req", "p_req", "decode", "prefill",
                 "cached_remote", "prefill_start", "kv_ready", "second", "reserved_at", "failed", "xfer_bytes")

    def __init__(self, index: int, spec: RequestSpec, block_size: int) -> None:
        self.index, self.spec, self.id = index, spec, str(index)
        # The token values only matter for partial blocks (decode extends the chain from `hashes`).
        self.prompt = [1000 + index % 50000] * spec.input_len
        self.hashes = prompt_block_hashes(spec, index, block_size)
        self.record = RequestRecord(index, spec.arrival_s, spec.input_len, spec.output_len, sent_s=spec.arrival_s,
                                    prompt_tokens=spec.input_len, status=200)
        self.req: Request | None = None  # the request that decodes (colocated: the only one)
        self.p_req: Request | None = None  # disaggregated: the prefill worker's copy
        self.decode: Worker | None = None
        self.prefill: Worker | None = None
        self.cached_remote = 0  # prompt tokens the decode worker already held (not transferred)
        self.prefill_start: float | None = None
        self.kv_ready: float | None = None
        self.second: float | None = None  # the second token (the first decode step after the KV is complete)
        self.reserved_at: float | None = None
        self.failed = False
        self.xfer_bytes = 0.0

    def make(self, max_tokens: int, now: float, hold_kv: bool = False) -> Request:
        r = Request(self.id, self.prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True), now, hold_kv=hold_kv)
        r.block_hashes = list(self.hashes)
        return r


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
        self.outstanding = 0  # requests assigned and not finished here
        self.queued_prefill_tokens = 0  # prompt tokens assigned and not yet prefilled
        self.busy_s = self.flops = self.bytes = 0.0
        self.steps = self.seq_steps = self.tokens = self.preemptions = 0

    @property
    def free_blocks(self) -> int:
        return self.sched.pool.num_free_blocks


# ---------------------------------------------------------------------------------------------- placement


class PlacementPolicy:
    """Where each request runs. The simulator calls these; a policy may read the workers' state (scheduler,
    free blocks, queued prefill tokens, outstanding requests, perf model) but must not change it.

    `prefill_locally` is conditional disaggregation: return True to prefill this request on its decode
    worker instead of the prefill pool (a short uncached suffix, a saturated prefill pool). The router's
    cost model (issue #5) will decide it from `perf.PerfModel.prefill_time` and `perf.transfer_time`."""

    def choose_colocated(self, workers: Sequence[Worker], req: SimRequest) -> Worker:
        raise NotImplementedError

    def choose_decode(self, workers: Sequence[Worker], req: SimRequest) -> Worker:
        raise NotImplementedError

    def choose_prefill(self, workers: Sequence[Worker], req: SimRequest) -> Worker:
        raise NotImplementedError

    def prefill_locally(self, req: SimRequest, decode: Worker, prefill_workers: Sequence[Worker]) -> bool:
        return False

    def place(self, req: SimRequest, decode_workers: Sequence[Worker], prefill_workers: Sequence[Worker], now: float) -> tuple[Worker, Worker | None]:
        """Disaggregated placement in one call: (decode worker, prefill worker or None to prefill locally).
        The prefill worker is only used once the decode worker has reserved the blocks; a policy whose
        decision covers both at once (the core Router) overrides this."""
        d = self.choose_decode(decode_workers, req)
        if self.prefill_locally(req, d, prefill_workers):
            return d, None
        return d, self.choose_prefill(prefill_workers, req)

    # What the simulator reports, as workers report to the runtime's router (no-ops here).

    def attach(self, sim: ClusterSim) -> None:
        """The workers are built; called once per run before the first arrival."""

    def kv_events(self, worker: Worker, events: list) -> None:
        """The worker's BlockPool stored or removed these prefix blocks."""

    def observe_step(self, worker: Worker, out: SchedulerOutput, seconds: float, now: float) -> None:
        """The worker finished a step of `seconds`."""

    def observe_transfer(self, nbytes: float, seconds: float) -> None:
        """`nbytes` of KV spent `seconds` on the wire."""


class LeastLoaded(PlacementPolicy):
    """Fewest outstanding requests (colocated, decode; ties: most free blocks); fewest queued prompt tokens
    (prefill). Never prefills locally."""

    def choose_colocated(self, workers, req):
        return min(workers, key=lambda w: (w.outstanding, w.queued_prefill_tokens, -w.free_blocks, w.id))

    def choose_decode(self, workers, req):
        return min(workers, key=lambda w: (w.outstanding + len(w.pending), -w.free_blocks, w.id))

    def choose_prefill(self, workers, req):
        return min(workers, key=lambda w: (w.queued_prefill_tokens, w.outstanding, w.id))


class LocalBelow(LeastLoaded):
    """Least loaded, but prompts with fewer than `tokens` uncached tokens are prefilled on the decode worker
    (a stand-in for the router's cost-model decision)."""

    def __init__(self, tokens: int) -> None:
        self.tokens = tokens

    def prefill_locally(self, req, decode, prefill_workers):
        return req.spec.input_len < self.tokens


# ---------------------------------------------------------------------------------------------- results


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


# ---------------------------------------------------------------------------------------------- simulator

_ARRIVE, _STEP, _XFER = 0, 1, 2


class ClusterSim:
    def __init__(
        self, spec: ClusterSpec, policy: PlacementPolicy | None = None,
        step_time: Callable[[Worker, float, SchedulerOutput, float], float] | None = None,
    ) -> None:
        """`step_time(worker, now, step, modelled seconds)`, if given, says how long each step really takes:
        what a machine shared with other work does to a worker (measured, e.g., by benchmarks/sim_accuracy.py)."""
        self.spec = spec
        self.policy = policy or LeastLoaded()
        self.step_time = step_time

    # ------------------------------------------------------------------ construction

    def _build(self, requests: Sequence[RequestSpec]) -> None:
        spec, bs = self.spec, self.spec.block_size
        longest = max((r.input_len + r.output_len for r in requests), default=1)
        max_len = spec.max_model_len or min(spec.model.max_position_embeddings, longest + 1)
        self.max_model_len = max_len
        mean_len = float(np.mean([r.input_len + r.output_len for r in requests])) if requests else 1.0
        self.workers: list[Worker] = []
        self.by_role: dict[str, list[Worker]] = {}
        for pool in spec.pools:
            hw = pool.hardware or spec.hardware
            perf = PerfModel(spec.model, hw, pool.tp, pool.efficiency or spec.efficiency)
            cap_tokens = perf.kv_capacity_tokens(spec.mem_util) if spec.kv_blocks is None else spec.kv_blocks * bs
            if cap_tokens <= 0:
                raise InfeasibleConfig(f"{spec.model.name} does not fit on TP{pool.tp} x {hw.name}")
            blocks = cap_tokens // bs
            need = -(-max_len // bs)
            if blocks < need:
                raise InfeasibleConfig(
                    f"TP{pool.tp} x {hw.name} holds {cap_tokens:,} tokens of KV cache, less than one {max_len:,}-token request"
                )
            # Simulation memory: more blocks than the batch cap can fill only lengthen the prefix cache's memory.
            if spec.kv_blocks is None:
                usable = int(2 * pool.max_num_seqs * mean_len / bs) + 4 * need
                blocks = min(blocks, max(usable, need))
            link = spec.network.instance_bandwidth(pool.tp, hw.gpus_per_node) if spec.network else math.inf
            for _ in range(pool.count):
                cfg = SchedulerConfig(
                    max_model_len=max_len,
                    max_num_seqs=pool.max_num_seqs,
                    max_num_batched_tokens=pool.max_num_batched_tokens,
                    enable_chunked_prefill=pool.chunked_prefill,
                    max_waiting=spec.max_waiting,
                )
                w = Worker(len(self.workers), pool, perf, Scheduler(cfg, BlockPool(blocks, bs, spec.prefix_caching)), link)
                self.workers.append(w)
                self.by_role.setdefault(pool.role, []).append(w)

    # ------------------------------------------------------------------ run

    def run(
        self,
        requests: Sequence[RequestSpec],
        slo: SLO | None = None,
        stop_below: float | None = None,
        token_times: bool = False,
        max_time_s: float | None = None,
    ) -> SimResult:
        """Serve `requests` (sorted by arrival). With `slo` and `stop_below`, stop as soon as more than
        (1 - stop_below) of all requests have missed the SLO (attainment can no longer reach it)."""
        import time as _time

        wall0 = _time.perf_counter()
        self._build(requests)
        self.policy.attach(self)
        self.token_times = token_times
        self.heap: list = []
        self._seq = 0
        self.reqs: dict[str, SimRequest] = {}
        self.done = 0
        self.xfer_exposed: list[float] = []
        self.xfer_bytes = 0.0
        self.slo = slo if slo is not None and slo.set else None
        self.max_fail = math.floor((1 - stop_below) * len(requests) + 1e-9) if (self.slo and stop_below is not None) else None
        self.fails = 0
        sims = [SimRequest(i, r, self.spec.block_size) for i, r in enumerate(requests)]
        n, ai, now = len(sims), 0, 0.0
        stopped = False
        heap = self.heap
        delay = self.spec.request_overhead_s
        while ai < n or heap:
            if ai < n and (not heap or sims[ai].spec.arrival_s + delay <= heap[0][0]):
                sr = sims[ai]
                ai += 1
                now = sr.spec.arrival_s + delay
                self._arrive(sr, now)
            else:
                now, _, kind, obj = heapq.heappop(heap)
                if kind == _STEP:
                    self._step_done(obj, now)
                else:
                    self._transfer_done(obj, now)
            if self.max_fail is not None and self.fails > self.max_fail:
                stopped = True
                break
            if max_time_s is not None and now > max_time_s:
                stopped = True
                break
        for sr in sims:
            rec = sr.record
            if rec.end_s is None and rec.status == 200:
                rec.status, rec.error_kind, rec.error = 0, "deadline", "simulation stopped"
        t0 = sims[0].spec.arrival_s if sims else 0.0
        result = self._result(sims, max(now - t0, 1e-9), stopped)
        result.sim_wall_s = _time.perf_counter() - wall0
        return result

    def _push(self, t: float, kind: int, obj) -> None:
        self._seq += 1
        heapq.heappush(self.heap, (t, self._seq, kind, obj))

    # ------------------------------------------------------------------ events

    def _arrive(self, sr: SimRequest, now: float) -> None:
        spec = sr.spec
        self.reqs[sr.id] = sr
        if spec.input_len + spec.output_len > self.max_model_len:
            self._reject(sr, 400, f"{spec.input_len + spec.output_len} tokens exceed the {self.max_model_len}-token context")
            return
        if not self.spec.disaggregated:
            self._run_local(self.policy.choose_colocated(self.by_role["colocated"], sr), sr, now)
            return
        d, p = self.policy.place(sr, self.by_role["decode"], self.by_role["prefill"], now)
        if p is None:
            self._run_local(d, sr, now)
            return
        sr.decode, sr.prefill = d, p
        d.outstanding += 1
        sr.req = sr.make(spec.output_len, now)
        # The runtime reserves on the decode worker's engine thread, between its steps: a busy decode worker
        # answers when its step ends (then `_step_done` drains `pending`). FIFO: never overtake a request
        # already waiting for blocks.
        if d.pending or d.busy or not self._try_reserve(d, sr, now):
            d.pending.append(sr)

    def _run_local(self, w: Worker, sr: SimRequest, now: float) -> None:
        sr.decode = w
        sr.req = sr.make(sr.spec.output_len, now)
        try:
            w.sched.add_request(sr.req)
        except QueueFull:
            self._reject(sr, 429, "queue full")
            return
        w.outstanding += 1
        w.queued_prefill_tokens += sr.spec.input_len
        self._kick(w, now)

    def _try_reserve(self, d: Worker, sr: SimRequest, now: float) -> bool:
        """Reserve the prompt's blocks on `d` and queue the prefill; False if the blocks are not free now."""
        cached = d.sched.reserve(sr.req)
        if cached is None:
            return False
        sr.cached_remote = cached
        sr.reserved_at = now
        p = sr.prefill
        sr.p_req = sr.make(1, now, hold_kv=True)
        try:
            p.sched.add_request(sr.p_req)
        except QueueFull:
            d.sched.abort(sr.id)
            d.outstanding -= 1
            self._reject(sr, 429, "prefill queue full")
            return True
        p.outstanding += 1
        p.queued_prefill_tokens += sr.spec.input_len
        self._kick(p, now)
        return True

    def _drain_pending(self, d: Worker, now: float) -> None:
        while d.pending and self._try_reserve(d, d.pending[0], now):
            d.pending.popleft()

    def _kick(self, w: Worker, now: float) -> None:
        if w.busy:
            return
        events = w.sched.pool.drain_events()  # drained every step: memory stays flat
        if events:
            self.policy.kv_events(w, events)
        out = w.sched.schedule(now)
        w.preemptions += len(out.preempted)
        if not out.seqs:
            return
        cost = w.perf.scheduled(out)
        seconds = cost.seconds if self.step_time is None else self.step_time(w, now, out, cost.seconds)
        w.busy, w.out, w.step_start, w.step_seconds = True, out, now, seconds
        w.busy_s += seconds
        w.flops += cost.flops
        w.bytes += cost.bytes
        w.steps += 1
        w.seq_steps += len(out.seqs)
        self._push(now + seconds, _STEP, w)

    def _step_done(self, w: Worker, now: float) -> None:
        out = w.out
        w.busy, w.out = False, None
        self.policy.observe_step(w, out, w.step_seconds, now)
        sampled = {}
        for s in out.seqs:
            if s.sample:
                sampled[s.request.request_id] = SAMPLED_TOKEN
            w.tokens += s.num_new_tokens
        finished = w.sched.update(out, sampled)
        reqs = self.reqs
        for s in out.seqs:
            if not s.sample:
                continue
            sr = reqs[s.request.request_id]
            rec = sr.record
            if rec.first_token_s is None:
                rec.first_token_s = now
                sr.prefill_start = s.request.first_scheduled_time
                w.queued_prefill_tokens -= sr.spec.input_len
                if self.slo is not None and self.slo.ttft_s is not None and now - rec.sent_s > self.slo.ttft_s:
                    self._fail(sr)
            elif sr.second is None and w.role != "prefill":
                sr.second = now
            if self.token_times and w.role != "prefill":
                rec.token_times_s.append(now)
        for req in finished:
            sr = reqs[req.request_id]
            if w.role == "prefill":
                if self.token_times:
                    sr.record.token_times_s.append(now)
                self._start_transfer(w, sr, now)
            else:
                w.outstanding -= 1
                self._finish(sr, req, now)
        if w.role == "decode" and w.pending:
            self._drain_pending(w, now)
        self._kick(w, now)

    def _start_transfer(self, p: Worker, sr: SimRequest, now: float) -> None:
        d = sr.decode
        spec = self.spec
        nbytes = max(0, sr.spec.input_len - sr.cached_remote) * spec.model.kv_bytes_per_token()
        sr.xfer_bytes = nbytes
        self.xfer_bytes += nbytes
        if nbytes == 0:
            end = now
        else:
            bw = min(p.link_bw, d.link_bw)
            lat = spec.network.latency_s
            layers = spec.model.num_layers
            if spec.pipelined:
                x = lat + nbytes / layers / bw
                start = max(p.step_start + p.perf.layer_time(p.step_seconds), p.nic_free, d.nic_free)
                end = max(start + layers * x, now + x)
            else:
                start = max(now, p.nic_free, d.nic_free)
                end = start + lat + nbytes / bw
            p.nic_free = d.nic_free = end
            self.policy.observe_transfer(nbytes, nbytes / bw)
        self.xfer_exposed.append(end - now)
        self._push(end, _XFER, sr)

    def _transfer_done(self, sr: SimRequest, now: float) -> None:
        p, d = sr.prefill, sr.decode
        p.sched.release_held(sr.id)
        p.outstanding -= 1
        self._kick(p, now)
        sr.kv_ready = now
        first = sr.p_req.output_token_ids[0]
        done = d.sched.kv_arrived(sr.id, first, now)
        if done is not None:
            d.outstanding -= 1
            self._finish(sr, done, now)
            if d.pending:
                self._drain_pending(d, now)
        self._kick(d, now)

    def _finish(self, sr: SimRequest, req: Request, now: float) -> None:
        rec = sr.record
        rec.end_s = now
        rec.completion_tokens = len(req.output_token_ids)
        src = sr.p_req if sr.p_req is not None else req
        rec.cached_tokens = max(0, src.num_cached_tokens)
        if sr.kv_ready is None:
            sr.kv_ready = rec.first_token_s
        self.done += 1
        if self.slo is not None and not sr.failed and not meets_slo(rec, self.slo):
            self._fail(sr)

    def _fail(self, sr: SimRequest) -> None:
        if not sr.failed:
            sr.failed = True
            self.fails += 1

    def _reject(self, sr: SimRequest, status: int, why: str) -> None:
        rec = sr.record
        rec.status, rec.error_kind, rec.error = status, "http", why
        self._fail(sr)

    # ------------------------------------------------------------------ summary

    @staticmethod
    def _wait(s: SimRequest) -> float | None:
        rec = s.record
        if rec.end_s is None or not rec.ok:
            return None
        queue = (s.prefill_start if s.prefill_start is not None else rec.sent_s) - rec.sent_s
        if s.second is None or rec.completion_tokens < 3:
            return max(0.0, queue)
        step = (rec.end_s - s.second) / (rec.completion_tokens - 2)
        return max(0.0, queue) + max(0.0, s.second - s.kv_ready - step)

    def _result(self, sims: list[SimRequest], elapsed: float, stopped: bool) -> SimResult:
        pools = []
        for pool in self.spec.pools:
            ws = self.by_role[pool.role]
            perf = ws[0].perf
            steps = sum(w.steps for w in ws)
            pools.append(PoolStats(
                role=pool.role,
                workers=len(ws),
                tp=pool.tp,
                gpus=pool.gpus,
                busy=sum(w.busy_s for w in ws) / (len(ws) * elapsed),
                compute_util=sum(w.flops for w in ws) / (perf.peak_flops * len(ws) * elapsed),
                bandwidth_util=sum(w.bytes for w in ws) / (perf.peak_bandwidth * len(ws) * elapsed),
                steps=steps,
                mean_batch=sum(w.seq_steps for w in ws) / steps if steps else 0.0,
                mean_tokens=sum(w.tokens for w in ws) / steps if steps else 0.0,
                preemptions=sum(w.preemptions for w in ws),
            ))
        done = [s for s in sims if s.record.end_s is not None and s.record.ok]
        if done:
            arr = np.array([(s.record.sent_s, s.prefill_start if s.prefill_start is not None else s.record.sent_s,
                             s.record.first_token_s, s.kv_ready, s.record.end_s,
                             s.second if s.second is not None else s.record.end_s, s.record.completion_tokens) for s in done], dtype=float)
            arr[:, 1] = np.clip(arr[:, 1], arr[:, 0], arr[:, 2])
            d = np.diff(arr[:, :5], axis=1).mean(axis=0)
            # The second token comes one decode step after the request joins a batch.
            step = (arr[:, 4] - arr[:, 5]) / np.maximum(1.0, arr[:, 6] - 2)
            wait = float(np.clip(arr[:, 5] - arr[:, 3] - step, 0.0, None).mean())
            phases = Phases(float(d[0]), float(d[1]), float(d[2]), wait, float(d[3]) - wait)
        else:
            phases = Phases(0.0, 0.0, 0.0, 0.0, 0.0)
        queried = sum(w.sched.prefix_queried_tokens for w in self.workers if w.role != "decode")
        hit = sum(w.sched.prefix_hit_tokens for w in self.workers if w.role != "decode")
        return SimResult(
            cluster=self.spec,
            records=[s.record for s in sims],
            waits=[self._wait(s) for s in sims],
            pools=pools,
            phases=phases,
            elapsed_s=elapsed,
            prefix_hit_rate=hit / queried if queried else 0.0,
            transfer_bytes=self.xfer_bytes,
            transfer_exposed_s=float(np.mean(self.xfer_exposed)) if self.xfer_exposed else 0.0,
            stopped_early=stopped,
        )


def simulate(spec: ClusterSpec, requests: Sequence[RequestSpec], policy: PlacementPolicy | None = None, **kw) -> SimResult:
    return ClusterSim(spec, policy).run(requests, **kw)


def check_conservation(sim: ClusterSim) -> None:
    """After a complete run: every block back in its pool (cached or free), nothing held, queued or reserved."""
    for w in sim.workers:
        s = w.sched
        if s.requests or s.held or s.waiting or s.running or s.ready or w.pending:
            raise AssertionError(f"worker {w.id} ({w.role}) still has requests")
        if s.pool.num_free_blocks != s.pool.num_blocks:
            raise AssertionError(f"worker {w.id} ({w.role}): {s.pool.num_blocks - s.pool.num_free_blocks} blocks still referenced")
