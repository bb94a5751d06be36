"""The synchronous engine: one step = schedule, run the model over the paged cache, sample, update.

It owns the model, the KV cache tensor, the core Scheduler and the Sampler. Scheduling never reads a
clock: the caller passes `now`, exactly as the simulator does with virtual time. The engine only times
its own steps, as measurements for the router's cost model.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

from splitserve.core.blocks import BlockPool
from splitserve.core.request import Request, SamplingParams
from splitserve.core.router_feed import StepCounters
from splitserve.core.scheduler import ScheduledSeq, Scheduler, SchedulerConfig, SchedulerLoad, SchedulerOutput
from splitserve.model.batch import SeqInput, build_forward_batch
from splitserve.model.kv_cache import PagedKVCache
from splitserve.model.llama import LayerHooks
from splitserve.model.loader import LoadedModel
from splitserve.runtime.config import EngineConfig
from splitserve.runtime.engine_client import EngineStats, TokenLogprobs, TokenOutput
from splitserve.runtime.worker.grammar import GrammarMasks
from splitserve.runtime.worker.sampler import Sampler

log = logging.getLogger(__name__)

HooksFactory = Callable[[SchedulerOutput], LayerHooks | None]


class _Watched:
    """A step's layer hooks, noting whether any layer was handed on (KV sent): such a step cannot simply
    run again, or those layers would be sent twice."""

    def __init__(self, hooks: LayerHooks) -> None:
        self.hooks, self.fired = hooks, False

    def before_layer(self, layer: int) -> None:
        self.hooks.before_layer(layer)

    def after_layer(self, layer: int) -> None:
        self.fired = True
        self.hooks.after_layer(layer)


class Engine:
    def __init__(self, loaded: LoadedModel, config: EngineConfig = EngineConfig()) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.config = config
        mc = loaded.config
        block_bytes = PagedKVCache.bytes_per_block(mc, config.block_size, loaded.dtype)
        num_blocks = config.num_blocks or max(1, config.kv_cache_bytes // block_bytes)
        self.max_model_len = min(config.max_model_len or min(mc.max_position_embeddings, 8192), num_blocks * config.block_size)
        self.kv_cache = PagedKVCache(mc, num_blocks, config.block_size, loaded.dtype, loaded.device)
        self.pool = BlockPool(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_model_len=self.max_model_len,
                max_num_seqs=config.max_num_seqs,
                max_num_batched_tokens=config.max_num_batched_tokens,
                enable_chunked_prefill=config.enable_chunked_prefill,
                max_waiting=config.max_waiting,
                prefill_tokens_while_decoding=config.prefill_tokens_while_decoding,
            ),
            self.pool,
        )
        self.sampler = Sampler(GrammarMasks(loaded.tokenizer, mc.vocab_size))
        self.counters = StepCounters()  # the router turns their growth into measurements
        # Called with each computed step and its seconds (the utilisation meter, the step log).
        self.step_observers: list[Callable[[SchedulerOutput, float], None]] = []
        log.info(
            "KV cache: %d blocks of %d tokens (%.1f MiB), max_model_len %d",
            num_blocks, config.block_size, num_blocks * block_bytes / (1 << 20), self.max_model_len,
        )

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        now: float,
        *,
        output_token_ids: list[int] = (),
        hold_kv: bool = False,
    ) -> None:
        """Queue a request to compute here. `output_token_ids` resumes one whose first tokens were produced
        elsewhere (a failed transfer recomputed locally); `hold_kv` keeps its blocks for a transfer."""
        req = self._request(request_id, prompt_token_ids, params, now)
        req.output_token_ids = list(output_token_ids)
        req.hold_kv = hold_kv
        self.scheduler.add_request(req)

    def reserve(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, now: float) -> Request | None:
        """Decode side: blocks for a prompt whose KV will arrive; None if there is no room now."""
        req = self._request(request_id, prompt_token_ids, params, now)
        return req if self.scheduler.reserve(req) is not None else None

    def kv_arrived(self, request_id: str, first_token: int, now: float) -> TokenOutput | None:
        """Decode side: KV complete. Returns the final output if the first token already ends the request."""
        req = self.scheduler.kv_arrived(request_id, first_token, now)
        if req is None:
            return None
        self.sampler.forget(request_id)
        return TokenOutput(request_id, [], True, req.status.value, req.num_prompt_tokens, req.num_cached_tokens)

    def release_held(self, request_id: str) -> None:
        self.scheduler.release_held(request_id)

    def _request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, now: float) -> Request:
        return Request(request_id, list(prompt_token_ids), params, now, eos_token_ids=self.loaded.tokenizer.eos_token_ids)

    def abort(self, request_id: str, reason: str = "abort", error: str | None = None) -> TokenOutput | None:
        req = self.scheduler.abort(request_id)
        if req is None:
            return None
        self.sampler.forget(request_id)
        return TokenOutput(request_id, [], True, reason, req.num_prompt_tokens, max(0, req.num_cached_tokens), error=error)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def step(self, now: float, hooks_for: HooksFactory | None = None) -> list[TokenOutput]:
        """One scheduling step. `hooks_for` gives the layer hooks of this step's batch (the prefill role
        uses them to send each layer's KV as soon as it is computed)."""
        out = self.scheduler.schedule(now)
        if out.empty:
            return []
        started = time.perf_counter()
        hooks = self._watched(out, hooks_for)
        try:
            tokens, logprobs = self._run(out, hooks)
        except Exception as exc:  # a failed step must not take the worker down, nor fail the batch
            log.exception("model step failed; finding the request that caused it")
            return self._isolate(out.seqs, hooks, exc, hooks_for)
        elapsed = time.perf_counter() - started
        self.counters.count(out, elapsed)
        for observe in self.step_observers:
            try:
                observe(out, elapsed)
            except Exception:  # watching a step must never fail it
                log.exception("step observer failed")
        return self._record(out, tokens, logprobs)

    def _record(
        self, out: SchedulerOutput, tokens: list[int], logprobs: list[TokenLogprobs | None]
    ) -> list[TokenOutput]:
        sampled = dict(zip((s.request.request_id for s in out.seqs if s.sample), tokens))
        finished = {r.request_id for r in self.scheduler.update(out, sampled)}
        sampling = [s.request for s in out.seqs if s.sample]
        return [self._output(r, r.request_id in finished, lp) for r, lp in zip(sampling, logprobs)]

    @staticmethod
    def _watched(out: SchedulerOutput, hooks_for: HooksFactory | None) -> _Watched | None:
        hooks = hooks_for(out) if hooks_for else None
        return _Watched(hooks) if hooks is not None else None

    def _isolate(
        self, seqs: list[ScheduledSeq], hooks: _Watched | None, exc: Exception, hooks_for: HooksFactory | None
    ) -> list[TokenOutput]:
        """After `seqs` failed as one step: fail only the request that caused it. The step runs again in
        halves (bisection: about 2 log2(n) extra partial steps for one culprit) until the failing request is
        alone. Rerunning rewrites the same KV positions with the same inputs, and nothing was recorded for
        the failed step. Except KV already handed on: if a layer of this step was sent, the requests sending
        in it end now (their transfer aborts; the frontend recomputes them), as sending again would
        duplicate those layers."""
        outputs: list[TokenOutput] = []
        if hooks is not None and hooks.fired:
            sending = [s for s in seqs if s.sample and s.request.hold_kv]
            outputs += self._fail(sending, f"engine error while its KV was being sent: {exc}")
            seqs = [s for s in seqs if not (s.sample and s.request.hold_kv)]
        if len(seqs) == 1:
            return outputs + self._fail(seqs, f"engine error: {type(exc).__name__}: {exc}")
        half = len(seqs) // 2
        for part in (seqs[:half], seqs[half:]):
            live = [s for s in part if not s.request.finished]
            if not live:
                continue
            sub = SchedulerOutput(seqs=live)
            sub_hooks = self._watched(sub, hooks_for)
            try:
                tokens, logprobs = self._run(sub, sub_hooks)
            except Exception as sub_exc:
                outputs += self._isolate(live, sub_hooks, sub_exc, hooks_for)
            else:
                outputs += self._record(sub, tokens, logprobs)
        return outputs

    def _fail(self, seqs: list[ScheduledSeq], error: str) -> list[TokenOutput]:
        for s in seqs:
            log.error("request %s failed its step: %s", s.request.request_id, error)
        return [o for s in seqs if (o := self.abort(s.request.request_id, "error", error))]

    def _run(self, out: SchedulerOutput, hooks: LayerHooks | None) -> tuple[list[int], list[TokenLogprobs | None]]:
        seqs = [
            SeqInput(s.request.token_slice(s.start_pos, s.start_pos + s.num_new_tokens), s.start_pos, s.request.block_ids, s.sample)
            for s in out.seqs
        ]
        batch = build_forward_batch(seqs, self.config.block_size, self.loaded.device)
        logits = self.model(batch, self.kv_cache, hooks)
        sampling = [s.request for s in out.seqs if s.sample]
        params = [r.params for r in sampling]
        tokens = self.sampler.sample(logits, [r.request_id for r in sampling], params, [r.output_token_ids for r in sampling])
        return tokens, self.sampler.logprobs(logits, tokens, params)

    def _output(self, req: Request, finished: bool, logprobs: TokenLogprobs | None = None) -> TokenOutput:
        if finished:
            self.sampler.forget(req.request_id)
        first = len(req.output_token_ids) == 1
        return TokenOutput(
            req.request_id,
            [req.output_token_ids[-1]],
            finished,
            req.status.value if finished else None,
            req.num_prompt_tokens,
            max(0, req.num_cached_tokens),
            queue_time=(req.first_scheduled_time - req.arrival_time) if first and req.first_scheduled_time is not None else None,
            # The same clock as the step's `now` (async_engine: time.monotonic()).
            prefill_time=(time.monotonic() - req.first_scheduled_time) if first and req.first_scheduled_time is not None else None,
            logprobs=[logprobs] if logprobs is not None else None,
        )

    def load(self) -> SchedulerLoad:
        """The scheduler's load now: call it on the thread that steps the engine."""
        return self.scheduler.load()

    def stats(self) -> EngineStats:
        return engine_stats(self.load())


def engine_stats(load: SchedulerLoad) -> EngineStats:
    return EngineStats(
        load.running, load.waiting, load.free_blocks, load.total_blocks,
        load.prefix_queried_tokens, load.prefix_hit_tokens, load.queued_prefill_tokens,
    )
