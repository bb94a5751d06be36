"""Continuous-batching scheduler: decides, step by step, which tokens of which requests to compute.

Pure logic: it is handed `now` and the sampled tokens, and returns decisions. The runtime drives it with
the wall clock and a real model; the simulator drives the very same object in virtual time.

Policy (one step):
1. Running requests first, in arrival order: each gets its remaining tokens (1 when decoding; a chunk of
   its prompt under chunked prefill). When blocks run out the newest running request is preempted
   (its blocks freed, to be recomputed later): old requests keep making progress.
2. Then waiting requests, in arrival order, while the token budget, the running cap and the free blocks
   allow. A prompt's cached prefix is taken from the prefix cache and not recomputed.
3. With `prefill_tokens_while_decoding` set (chunked prefill), a step that decodes any request computes at
   most that many prompt tokens: a prompt computed beside running decodes (a decode worker's recompute or
   local prefill) stretches each of their steps by one small chunk instead of stalling them for its whole
   prefill. With nothing decoding the usual budget holds, so an idle worker still prefills at full speed.

Disaggregation uses the same object on both sides. A decode worker `reserve`s blocks for a prompt whose
KV a prefill worker will send, and admits it with `kv_arrived` once every layer has landed. A prefill
worker runs requests with `hold_kv`: when they finish their blocks stay referenced until
`release_held`, i.e. until the transfer no longer reads them.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from splitserve.core.blocks import BlockPool
from splitserve.core.kv_manager import KVCacheManager
from splitserve.core.request import FINISHED, Request, RequestStatus, stop_reason


class QueueFull(Exception):
    """The waiting queue is at its cap: the caller should shed load (HTTP 429)."""


@dataclass(frozen=True)
class SchedulerConfig:
    max_model_len: int
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    enable_chunked_prefill: bool = False
    max_waiting: int = 1024
    prefill_tokens_while_decoding: int | None = None  # see the policy, point 3; None: no cap

    def __post_init__(self) -> None:
        if self.prefill_tokens_while_decoding is not None and self.prefill_tokens_while_decoding < 1:
            raise ValueError(f"prefill_tokens_while_decoding must be >= 1, got {self.prefill_tokens_while_decoding}")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            # Without chunking a whole prompt must fit in one step.
            object.__setattr__(self, "max_num_batched_tokens", self.max_model_len)


@dataclass(slots=True)  # one per sequence per step: slots make it cheaper to build and read
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


@dataclass(frozen=True)
class SchedulerLoad:
    """What a scheduler holds, as of one moment: the one view of its queues that anyone outside it reads
    (the worker's state report and metrics, the async engine's admission check, the simulator, benchmarks)."""

    waiting: int  # queued to compute: prompts, and requests preempted or resumed for recompute
    running: int  # in the running batch
    ready: int  # decode side: KV complete, waiting for a running slot
    reserved: int  # decode side: blocks reserved, KV still arriving
    held: int  # prefill side: finished, blocks kept until the transfer is over
    queued_prefill_tokens: int  # tokens still to compute before the queued and partly-prefilled requests sample
    running_tokens: int  # context of the running batch: its requests' tokens, summed
    most_tokens_owed: int  # output tokens the running request furthest from its max_tokens still owes
    free_blocks: int
    total_blocks: int
    prefix_queried_tokens: int  # prompt tokens looked up in the prefix cache, since the start
    prefix_hit_tokens: int  # of which found cached

    @property
    def has_work(self) -> bool:
        """A step would compute something."""
        return bool(self.waiting or self.running or self.ready)

    @property
    def idle(self) -> bool:
        """No request, reservation or held block: nothing is lost if the worker goes away."""
        return not (self.has_work or self.reserved or self.held)


class Scheduler:
    def __init__(self, config: SchedulerConfig, pool: BlockPool) -> None:
        self.config = config
        self.pool = pool
        self.kv = KVCacheManager(pool)
        # Private: read them through `load()`.
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []
        self._requests: dict[str, Request] = {}  # every unfinished request, in whichever state
        self._ready: deque[Request] = deque()  # decode side: KV complete, waiting for a running slot
        self._held: dict[str, Request] = {}  # prefill side: finished, blocks kept for the transfer
        self._num_reserved = 0  # requests WAITING_FOR_KV
        self.prefix_queried_tokens = 0
        self.prefix_hit_tokens = 0
        self.num_preemptions = 0

    def load(self) -> SchedulerLoad:
        # One pass over the batch: the simulator asks after every step of every worker. A waiting prompt's
        # cached prefix is not work to do (the router compares this with the prefix it would hit elsewhere:
        # counting it made a worker holding a prefix look busier than one without).
        bs = self.pool.block_size
        queued = sum(r.num_tokens - max(r.num_computed_tokens, len(self.kv.prefix_hit(r)) * bs) for r in self._waiting)
        context = owed = 0
        for r in self._running:
            out_len = len(r.output_token_ids)
            n = len(r.prompt_token_ids) + out_len  # r.num_tokens, without the property's call
            context += n
            if n - r.num_computed_tokens > 1:  # a prompt partly prefilled (chunked)
                queued += n - r.num_computed_tokens
            if r.params.max_tokens - out_len > owed:
                owed = r.params.max_tokens - out_len
        return SchedulerLoad(
            waiting=len(self._waiting), running=len(self._running), ready=len(self._ready),
            reserved=self._num_reserved, held=len(self._held), queued_prefill_tokens=queued,
            running_tokens=context, most_tokens_owed=owed,
            free_blocks=self.pool.num_free_blocks, total_blocks=self.pool.num_blocks,
            prefix_queried_tokens=self.prefix_queried_tokens, prefix_hit_tokens=self.prefix_hit_tokens,
        )

    def has_work(self) -> bool:
        """A step would compute something: the engine loop's cheap test, between steps."""
        return bool(self._waiting or self._running or self._ready)

    def add_request(self, req: Request) -> None:
        """Queue a request to be computed here (a prompt, or a request whose KV must be recomputed)."""
        if len(self._waiting) >= self.config.max_waiting:
            raise QueueFull(f"{len(self._waiting)} requests already waiting")
        self._check_fits(req)
        req.status = RequestStatus.WAITING
        self._requests[req.request_id] = req
        self._waiting.append(req)

    def reserve(self, req: Request) -> int | None:
        """Decode side: take blocks for a prompt whose KV a prefill worker will send. Leading blocks this
        worker already caches are reused, not sent again. Returns how many leading prompt tokens are
        already here (the first `that // block_size` of `req.block_ids` need no transfer), or None if the
        blocks are not free now: the caller waits or refuses, and never prefills what cannot be decoded."""
        self._check_fits(req)
        hit = self.kv.prefix_hit(req)
        if not self.kv.allocate(req, req.num_prompt_tokens - len(hit) * self.pool.block_size, hit):
            return None
        self._record_hit(req, len(hit))
        req.status = RequestStatus.WAITING_FOR_KV
        self._num_reserved += 1
        self._requests[req.request_id] = req
        return req.num_cached_tokens

    def kv_arrived(self, request_id: str, first_token: int, now: float) -> Request | None:
        """Decode side: the whole prompt's KV has landed and the prefill worker sampled `first_token`.
        Returns the request if that token already finishes it (its blocks are then freed)."""
        req = self._requests[request_id]
        if req.status is not RequestStatus.WAITING_FOR_KV:
            raise ValueError(f"request {request_id} is {req.status.value}, not waiting for KV")
        self._num_reserved -= 1
        req.num_computed_tokens = req.num_prompt_tokens
        req.first_scheduled_time = now
        self.kv.publish(req)
        req.append_token(first_token)
        reason = req.stop_reason(self.config.max_model_len)
        if reason is not None:
            self._finish(req, reason)
            return req
        req.status = RequestStatus.RUNNING
        self._ready.append(req)
        return None

    def release_held(self, request_id: str) -> None:
        """Prefill side: the transfer is over (sent or failed); the blocks may go."""
        req = self._held.pop(request_id, None)
        if req is not None:
            self.kv.free(req)

    def abort(self, request_id: str) -> Request | None:
        """Finish a request now, wherever it is; its blocks go back to the pool."""
        req = self._requests.get(request_id)
        if req is None:
            held = self._held.get(request_id)
            self.release_held(request_id)
            return held
        if req.status is RequestStatus.WAITING_FOR_KV:
            self._num_reserved -= 1
        for queue in (self._running, self._waiting, self._ready):
            if req in queue:
                queue.remove(req)
                break
        req.hold_kv = False
        self._finish(req, RequestStatus.FINISHED_ABORTED)
        return req

    def schedule(self, now: float) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        prefill = self._prefill_budget()
        # This loop runs for every running sequence of every step (the simulator's hot path): locals, and
        # the request's token count, the ScheduledSeq and the blocks' room (`KVCacheManager.allocate`'s own
        # first test) inlined rather than properties and method calls.
        running, seqs, block_size = self._running, out.seqs, self.pool.block_size
        i = 0
        while i < len(running) and budget > 0:
            req = running[i]
            total = len(req.prompt_token_ids) + len(req.output_token_ids)
            start = req.num_computed_tokens
            num_new = total - start
            if num_new > budget:
                num_new = budget
            if num_new > 1:  # a prompt's chunk: within the prefill budget of a step that decodes
                num_new = min(num_new, prefill)
                if num_new == 0:
                    i += 1
                    continue
                prefill -= num_new
            if start + num_new > len(req.block_ids) * block_size and not self._make_room(req, num_new, out):
                break
            seqs.append(ScheduledSeq(req, start, num_new, start + num_new == total))
            budget -= num_new
            i += 1
        if not out.preempted:
            budget = self._admit(out, budget, now, prefill)
        return out

    def _make_room(self, req: Request, num_new: int, out: SchedulerOutput) -> bool:
        """Blocks for `num_new` more tokens of running `req`, preempting the newest running requests until
        they fit. False if `req` itself was preempted. (Without prefix hits `allocate` leaves the request's
        computed tokens as they were.)"""
        while not self.kv.allocate(req, num_new):
            victim = self._running.pop()
            self._preempt(victim)
            out.preempted.append(victim)
            if victim is req:
                return False
        return True

    def _prefill_budget(self) -> int:
        """Prompt tokens this step may compute: capped while a request decodes (or one is ready to),
        unbounded (the token budget rules) otherwise."""
        cap = self.config.prefill_tokens_while_decoding
        if cap is None or not self.config.enable_chunked_prefill:
            return self.config.max_num_batched_tokens
        decoding = self._ready or any(r.num_tokens - r.num_computed_tokens <= 1 for r in self._running)
        return cap if decoding else self.config.max_num_batched_tokens

    def update(self, out: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """Record a computed step: advance progress, publish full blocks, append sampled tokens.
        Returns the requests that finished with this step (their blocks are already freed)."""
        finished = []
        # Every sequence of every step passes here: locals, and the finished test, token append and stop
        # test without the Request's property and method calls around them. `publish` is called only when
        # the step completes a block: it has published every full block by the end of each call (a request's
        # computed tokens change only here, at a prefix hit that publishes the hit blocks, on arrival of its
        # KV, which publishes, or at preemption, to 0), so without a new full block it would do nothing.
        publish, max_len, block_size = self.kv.publish, self.config.max_model_len, self.pool.block_size
        for s in out.seqs:
            req = s.request
            if req.status in FINISHED:  # aborted while the step ran
                continue
            before = req.num_computed_tokens
            req.num_computed_tokens = before + s.num_new_tokens
            if req.num_computed_tokens // block_size != before // block_size:
                publish(req)
            if not s.sample:
                continue
            output = req.output_token_ids
            output.append(sampled[req.request_id])
            reason = stop_reason(output, req.params, req.eos_token_ids, len(req.prompt_token_ids) + len(output), max_len)
            if reason is not None:
                self._running.remove(req)
                self._finish(req, reason)
                finished.append(req)
        return finished

    def _admit(self, out: SchedulerOutput, budget: int, now: float, prefill: int) -> int:
        # Requests whose KV arrived from a prefill worker come first: they only need one decode token.
        while self._ready and budget > 0 and len(self._running) < self.config.max_num_seqs:
            req = self._ready[0]
            if not self.kv.allocate(req, 1):
                if self._running:
                    return budget  # a running request finishes (or is preempted) and frees a block
                # Nothing runs, and reservations and ready requests hold every block (prompts of whole blocks
                # need one more for their first decode step): no block would ever free. This one goes back to
                # be recomputed here (it keeps its tokens), so the others can move.
                self._preempt(self._ready.popleft())
                out.preempted.append(req)
                continue
            self._running.append(self._ready.popleft())
            out.seqs.append(self._scheduled(req, 1))
            budget -= 1
        while self._waiting and budget > 0 and len(self._running) < self.config.max_num_seqs:
            req = self._waiting[0]
            hit = self.kv.prefix_hit(req)
            num_new = req.num_tokens - req.num_computed_tokens - len(hit) * self.pool.block_size
            if self.config.enable_chunked_prefill:
                num_new = min(num_new, budget, prefill)
                if num_new < 1:
                    break
            elif num_new > budget:
                break
            if not self.kv.allocate(req, num_new, hit):
                break
            self._waiting.popleft()
            self._record_hit(req, len(hit))
            if req.first_scheduled_time is None:
                req.first_scheduled_time = now
            req.status = RequestStatus.RUNNING
            self._running.append(req)
            out.seqs.append(self._scheduled(req, num_new))
            budget -= num_new
            prefill -= num_new
        return budget

    def _record_hit(self, req: Request, hit_blocks: int) -> None:
        if req.num_cached_tokens < 0:  # only a request's first admission counts, not a recompute
            req.num_cached_tokens = hit_blocks * self.pool.block_size
            self.prefix_queried_tokens += req.num_prompt_tokens
            self.prefix_hit_tokens += req.num_cached_tokens

    def _check_fits(self, req: Request) -> None:
        if req.num_tokens >= self.config.max_model_len:
            raise ValueError(f"prompt of {req.num_tokens} tokens leaves no room in a {self.config.max_model_len}-token context")
        if -(-self.config.max_model_len // self.pool.block_size) > self.pool.num_blocks:
            raise ValueError(f"KV cache of {self.pool.num_blocks} blocks cannot hold one full-length request")

    def _scheduled(self, req: Request, num_new: int) -> ScheduledSeq:
        start = req.num_computed_tokens
        return ScheduledSeq(req, start, num_new, sample=start + num_new == req.num_tokens)

    def _preempt(self, req: Request) -> None:
        self.kv.free(req)
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        req.status = RequestStatus.PREEMPTED
        self._waiting.appendleft(req)

    def _finish(self, req: Request, status: RequestStatus) -> None:
        req.status = status
        del self._requests[req.request_id]
        if req.hold_kv:
            self._held[req.request_id] = req
        else:
            self.kv.free(req)
