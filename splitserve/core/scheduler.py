"""Continuous-batching scheduler: decides, step by step, which tokens of which requests to compute.

Pure logic: it is handed `now` and the sampled tokens, and returns decisions. The runtime drives it with
the wall clock and a real model; the simulator drives the very same object in virtual time.

Policy (one step):
1. Running requests first, in arrival order: each gets its remaining tokens (1 when decoding; a chunk of
   its prompt under chunked prefill). When blocks run out the newest running request is preempted
   (its blocks freed, to be recomputed later): old requests keep making progress.
2. Then waiting requests, in arrival order, while the token budget, the running cap and the free blocks
   allow. A prompt's cached prefix is taken from the prefix cache and not recomputed.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from splitserve.core.blocks import BlockPool
from splitserve.core.kv_manager import KVCacheManager
from splitserve.core.request import Request, RequestStatus


class QueueFull(Exception):
    """The waiting queue is at its cap: the caller should shed load (HTTP 429)."""


@dataclass(frozen=True)
class SchedulerConfig:
    max_model_len: int
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    enable_chunked_prefill: bool = False
    max_waiting: int = 1024

    def __post_init__(self) -> None:
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            # Without chunking a whole prompt must fit in one step.
            object.__setattr__(self, "max_num_batched_tokens", self.max_model_len)


@dataclass
class ScheduledSeq:
    request: Request
    start_pos: int  # tokens already in the cache
    num_new_tokens: int
    sample: bool  # this step completes the known tokens, so it yields the next one


@dataclass
class SchedulerOutput:
    seqs: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.seqs)

    @property
    def empty(self) -> bool:
        return not self.seqs


class Scheduler:
    def __init__(self, config: SchedulerConfig, pool: BlockPool) -> None:
        self.config = config
        self.pool = pool
        self.kv = KVCacheManager(pool)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.prefix_queried_tokens = 0
        self.prefix_hit_tokens = 0

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add_request(self, req: Request) -> None:
        if len(self.waiting) >= self.config.max_waiting:
            raise QueueFull(f"{len(self.waiting)} requests already waiting")
        if req.num_tokens >= self.config.max_model_len:
            raise ValueError(f"prompt of {req.num_tokens} tokens leaves no room in a {self.config.max_model_len}-token context")
        max_blocks = -(-self.config.max_model_len // self.pool.block_size)
        if max_blocks > self.pool.num_blocks:
            raise ValueError(f"KV cache of {self.pool.num_blocks} blocks cannot hold one full-length request")
        req.status = RequestStatus.WAITING
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def abort(self, request_id: str) -> Request | None:
        """Finish a request now, wherever it is; its blocks go back to the pool."""
        req = self.requests.get(request_id)
        if req is None:
            return None
        if req in self.running:
            self.running.remove(req)
        else:
            self.waiting.remove(req)
        self._finish(req, RequestStatus.FINISHED_ABORTED)
        return req

    def schedule(self, now: float) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            while not self.kv.allocate(req, num_new):
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    break
            else:
                out.seqs.append(self._scheduled(req, num_new))
                budget -= num_new
                i += 1
                continue
            break
        if not out.preempted:
            budget = self._admit(out, budget, now)
        return out

    def update(self, out: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """Record a computed step: advance progress, publish full blocks, append sampled tokens.
        Returns the requests that finished with this step (their blocks are already freed)."""
        finished = []
        for s in out.seqs:
            req = s.request
            if req.finished:  # aborted while the step ran
                continue
            req.num_computed_tokens += s.num_new_tokens
            self.kv.publish(req)
            if not s.sample:
                continue
            req.append_token(sampled[req.request_id])
            reason = req.stop_reason(self.config.max_model_len)
            if reason is not None:
                self.running.remove(req)
                self._finish(req, reason)
                finished.append(req)
        return finished

    def _admit(self, out: SchedulerOutput, budget: int, now: float) -> int:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            hit = self.kv.prefix_hit(req)
            num_new = req.num_tokens - req.num_computed_tokens - len(hit) * self.pool.block_size
            if self.config.enable_chunked_prefill:
                num_new = min(num_new, budget)
            elif num_new > budget:
                break
            if not self.kv.allocate(req, num_new, hit):
                break
            self.waiting.popleft()
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = len(hit) * self.pool.block_size
                self.prefix_queried_tokens += req.num_prompt_tokens
                self.prefix_hit_tokens += req.num_cached_tokens
            if req.first_scheduled_time is None:
                req.first_scheduled_time = now
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.seqs.append(self._scheduled(req, num_new))
            budget -= num_new
        return budget

    def _scheduled(self, req: Request, num_new: int) -> ScheduledSeq:
        start = req.num_computed_tokens
        return ScheduledSeq(req, start, num_new, sample=start + num_new == req.num_tokens)

    def _preempt(self, req: Request) -> None:
        self.kv.free(req)
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        req.status = RequestStatus.PREEMPTED
        self.waiting.appendleft(req)

    def _finish(self, req: Request, status: RequestStatus) -> None:
        self.kv.free(req)
        req.status = status
        del self.requests[req.request_id]
