"""Virtual-time cluster simulator over the real core Scheduler.

Every worker owns a real `Scheduler` and `BlockPool` (the very objects `serve` runs); only the model and the
clock are simulated: a step lasts what the roofline model (`perf.PerfModel`) says, and time jumps from event
to event (arrivals, step ends, KV transfers) on a heap.

Colocated: a request goes to one worker, which prefills it (whole, or in chunks under chunked prefill) and
decodes it. Disaggregated, as the runtime does it and through the very same `SplitRequest` state machine:
the placement policy picks a decode worker D and a prefill worker P; D `reserve`s the prompt's blocks (a
request waits in D's FIFO while none are free: never prefill what cannot be decoded); then P computes the
prompt with `hold_kv` and samples the first token (TTFT); its KV crosses the link (only the blocks D does
not already cache; pipelined layer by layer or not) while P keeps the blocks; when the last byte lands P
`release_held`s them and D gets `kv_arrived`. No worker fails in simulation, so the state machine's
failure actions never arise here. With `ClusterSpec.admit_wait_s` set, arrivals pass the frontend's core
`Admission` first, as in the runtime: one whose expected wait exceeds the budget is refused (429).

Cost: about 2.5-3 us of CPU time per sequence per step plus about 5 per prompt block (its hashes, KV events
and their replay in the router's index; the scheduler and block pool are pure Python), i.e. roughly (output
tokens + 2 x prompt blocks) x requests: 10,000 requests of 1k-token prompts and 64-token outputs on two
colocated workers take about 5 s of CPU time (8.6 s before the hot loops were trimmed); long outputs and long
prompts cost proportionally more (the planner raises the block size for long prompts).
"""

from __future__ import annotations

import heapq
import math
from typing import Callable, Sequence

import numpy as np

from splitserve.core.admission import Admission
from splitserve.core.blocks import BlockPool
from splitserve.core.scheduler import QueueFull, Scheduler, SchedulerConfig, SchedulerOutput
from splitserve.core.split_request import (
    Abort, Action, Emit, FirstToken, KvComplete, Release, Reserve, Reserved, Refused, Retry, Routed, SendPrompt,
    SplitRequest, State, Tokens,
)
from splitserve.core.transfer_time import transfer_end
from splitserve.sim.cluster_spec import ClusterSpec, InfeasibleConfig
from splitserve.sim.perf import PerfModel
from splitserve.sim.placement import RouterPolicy
from splitserve.sim.result import Phases, PoolStats, SimResult
from splitserve.sim.state import SAMPLED_TOKEN, RunWatch, SimRequest, Worker
from splitserve.workload.requests import RequestSpec
from splitserve.workload.slo import SLO, meets_slo, misses_allowed

_ARRIVE, _STEP, _XFER, _DEADLINE = 0, 1, 2, 3
_NO_EOS: frozenset[int] = frozenset()  # simulated requests run with ignore_eos
_ONE_TOKEN = Tokens((SAMPLED_TOKEN,))  # a decode step's output: one token, not finished
_PAST = 1 + 1e-9  # a deadline event falls just past its target, so that float rounding does not hide the miss


class ClusterSim:
    def __init__(
        self, spec: ClusterSpec, policy: RouterPolicy | None = None,
        step_time: Callable[[Worker, float, SchedulerOutput, float], float] | None = None,
    ) -> None:
        """`step_time(worker, now, step, modelled seconds)`, if given, says how long each step really takes:
        what a machine shared with other work does to a worker (measured, e.g., by benchmarks/sim_accuracy.py)."""
        self.spec = spec
        self.policy = policy or RouterPolicy("least_loaded", conditional=False)  # split requests always go remote
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
                    prefill_tokens_while_decoding=pool.prefill_tokens_while_decoding,
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
        judged: range | None = None,
        watch: RunWatch | None = None,
    ) -> SimResult:
        """Serve `requests` (sorted by arrival). With `slo` and `stop_below`, stop as soon as more than
        (1 - stop_below) of the `judged` requests (by index; default all) have missed the SLO: their
        attainment can no longer reach it, so the run's pass or fail is the full run's. A miss is counted when
        it becomes certain: no first token by the TTFT target, or the output not finished by the time its TPOT
        target allows (deadline events), so an overloaded probe stops early in its queue's growth rather than
        when its late requests are finally served. A `watch` sees the judged requests arrive, get their first
        token and end, and stops the run once it says its outcome is certain."""
        import time as _time

        wall0 = _time.perf_counter()
        self._build(requests)
        self.policy.attach(self.spec, self.workers)
        self.token_times = token_times
        self.heap: list = []
        self._seq = 0
        self.reqs: dict[str, SimRequest] = {}
        self.done = 0
        self.xfer_exposed: list[float] = []
        self.xfer_bytes = 0.0
        self.slo = slo if slo is not None and slo.set else None
        judged = range(len(requests)) if judged is None else judged
        self.max_fail = misses_allowed(len(judged), stop_below) if (self.slo and stop_below is not None) else None
        self.fails = 0
        self.watch = watch
        self.admission = (Admission(self.spec.admit_waiting, self.spec.admit_wait_s)
                          if self.spec.admit_wait_s is not None else None)
        sims = [SimRequest(i, r, self.spec.block_size) for i, r in enumerate(requests)]
        for i in judged:
            sims[i].judged = True
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
                t, _, kind, obj = heapq.heappop(heap)
                if kind == _DEADLINE:  # not a step of the system: `now` (the run's elapsed time) stays
                    self._deadline(obj, t)
                elif kind == _STEP:
                    now = t
                    self._step_done(obj, now)
                else:
                    now = t
                    self._transfer_done(obj, now)
            if self.max_fail is not None and self.fails > self.max_fail:
                stopped = True
                break
            if watch is not None and watch.certain(now):
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
        if sr.judged:
            if self.max_fail is not None and self.slo.ttft_s is not None:
                self._push(sr.record.sent_s + self.slo.ttft_s * _PAST, _DEADLINE, sr)
            if self.watch is not None:
                self.watch.arrived(sr.record)
        if spec.input_len + spec.output_len > self.max_model_len:
            self._reject(sr, 400, f"{spec.input_len + spec.output_len} tokens exceed the {self.max_model_len}-token context", now)
            return
        if self.admission is not None:
            if self.admission.offer(now) is not None:
                self._reject(sr, 429, "its expected wait exceeds the admission budget", now)
                return
            sr.admitted = True
        if not self.spec.disaggregated:
            self._run_local(self.policy.place(sr, now)[0], sr, now)
            return
        d, p = self.policy.place(sr, now)
        if p is None:
            self._run_local(d, sr, now)
            return
        sr.req = sr.make(spec.output_len, now)
        sr.split = SplitRequest(sr.req.params, _NO_EOS, spec.input_len, self.max_model_len)
        self._do(sr, sr.split.handle(Routed(d, p), now), now)

    def _run_local(self, w: Worker, sr: SimRequest, now: float) -> None:
        sr.req = sr.make(sr.spec.output_len, now)
        try:
            w.sched.add_request(sr.req)
        except QueueFull:
            self._reject(sr, 429, "queue full", now)
            return
        self._kick(w, now)

    def _do(self, sr: SimRequest, actions: list[Action], now: float) -> None:
        """Carry out a split request's actions on the simulated workers."""
        for act in actions:
            kind = type(act)
            if kind is Emit:
                if act.finished:
                    self._finish(sr, len(sr.split.emitted), sr.split.cached_tokens, now)
            elif kind is Reserve:
                # The runtime reserves on the decode worker's engine thread, between its steps: a busy decode
                # worker answers when its step ends (then `_step_done` drains `pending`). FIFO: never overtake
                # a request already waiting for blocks.
                d = act.decode
                if d.pending or d.busy or not self._answer_reserve(d, sr, now):
                    d.pending.append(sr)
            elif kind is SendPrompt:
                self._send_prompt(act.prefill, act.decode, sr, now)
            elif kind is Release:
                w = act.worker
                w.sched.abort(sr.id)
                if act.side == "decode":
                    if w.pending and not w.busy:
                        self._drain_pending(w, now)
                self._kick(w, now)
            elif kind is not Retry:  # Retry: the request stays first in D's queue, asked again after D's next step
                raise AssertionError(f"{act!r}: no worker fails in simulation")

    def _answer_reserve(self, d: Worker, sr: SimRequest, now: float) -> bool:
        """D reserves the prompt's blocks and the prefill is queued; False if the blocks are not free now."""
        cached = d.sched.reserve(sr.req)
        if cached is None:
            self._do(sr, sr.split.handle(Refused(), now), now)
            return False
        self._do(sr, sr.split.handle(Reserved(cached), now), now)
        return True

    def _send_prompt(self, p: Worker, d: Worker, sr: SimRequest, now: float) -> None:
        try:
            p.sched.add_request(sr.make(1, now, hold_kv=True))
        except QueueFull:
            self._do(sr, sr.split.handle(Abort(), now), now)
            self._reject(sr, 429, "prefill queue full", now)
            return
        self._kick(p, now)

    def _drain_pending(self, d: Worker, now: float) -> None:
        # Taken off the queue while D answers: an answer that frees blocks may drain the queue itself.
        while d.pending:
            sr = d.pending.popleft()
            split = sr.split
            if split.state is State.ROUTING:  # refused before: asks D again (the Reserve this very call carries out)
                split.handle(Routed(d, split.prefill), now)
            if not self._answer_reserve(d, sr, now):
                d.pending.appendleft(sr)
                return

    def _kick(self, w: Worker, now: float) -> None:
        if w.busy:
            return
        # Between steps, as a runtime worker answers the router's poll; its events drained every step,
        # so memory stays flat.
        self.policy.report(w, w.sched.pool.drain_events(), now)
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
        # The two loops below run for every sequence of every step: the simulator's hot path.
        seqs = out.seqs
        sampled = {}
        tokens = 0
        for s in seqs:
            if s.sample:
                sampled[s.request.request_id] = SAMPLED_TOKEN
            tokens += s.num_new_tokens
        w.tokens += tokens
        finished = w.sched.update(out, sampled)
        reqs = self.reqs
        prefill, decode = w.role == "prefill", w.role == "decode"
        token_times = self.token_times and not prefill
        for s in seqs:
            if not s.sample:
                continue
            sr = reqs[s.request.request_id]
            rec = sr.record
            if rec.first_token_s is None:
                rec.first_token_s = now
                if sr.admitted:  # its first output: it leaves the waiting room, and times its drain rate
                    sr.admitted = False
                    self.admission.leave(now)
                sr.prefill_start = s.request.first_scheduled_time
                if sr.judged and self.watch is not None:
                    self.watch.first_token(rec)
                if self.slo is not None and self.slo.ttft_s is not None and now - rec.sent_s > self.slo.ttft_s:
                    self._fail(sr)
                elif sr.judged and self.max_fail is not None and self.slo.tpot_s is not None and sr.spec.output_len > 1:
                    self._push(now + self.slo.tpot_s * (sr.spec.output_len - 1) * _PAST, _DEADLINE, sr)
            elif sr.second is None and not prefill:
                sr.second = now
            if token_times:
                rec.token_times_s.append(now)
            if decode and sr.split is not None and not s.request.status.finished:
                sr.split.handle(_ONE_TOKEN, now)  # emitted: nothing to carry out
        for req in finished:
            sr = reqs[req.request_id]
            if prefill:
                if self.token_times:
                    sr.record.token_times_s.append(now)
                first = FirstToken(SAMPLED_TOKEN, req.num_cached_tokens, req.first_scheduled_time - req.arrival_time,
                                   now - req.first_scheduled_time)
                self._do(sr, sr.split.handle(first, now), now)
                self._start_transfer(w, sr, now)
            else:
                if sr.split is not None:
                    self._do(sr, sr.split.handle(Tokens((SAMPLED_TOKEN,), req.status.value), now), now)
                else:
                    self._finish(sr, len(req.output_token_ids), req.num_cached_tokens, now)
        if w.role == "decode" and w.pending:
            self._drain_pending(w, now)
        self._kick(w, now)

    def _start_transfer(self, p: Worker, sr: SimRequest, now: float) -> None:
        d = sr.split.decode
        spec = self.spec
        nbytes = max(0, sr.spec.input_len - sr.split.decode_cached_tokens) * spec.model.kv_bytes_per_token()
        self.xfer_bytes += nbytes
        if nbytes == 0:
            end = now
        else:
            bw = min(p.link_bw, d.link_bw)
            end = transfer_end(
                nbytes, bw, spec.network.latency_s, spec.pipelined, spec.model.num_layers, compute_end=now,
                first_layer_end=p.step_start + p.perf.layer_time(p.step_seconds), link_free=max(p.nic_free, d.nic_free),
            )
            p.nic_free = d.nic_free = end
            self.policy.observe_transfer(p, nbytes, nbytes / bw)
        self.xfer_exposed.append(end - now)
        self._push(end, _XFER, sr)

    def _transfer_done(self, sr: SimRequest, now: float) -> None:
        split = sr.split
        p, d = split.prefill, split.decode
        p.sched.release_held(sr.id)
        self._kick(p, now)
        if split.done:  # the first token ended the request, and D let its blocks go then
            return
        split.handle(KvComplete(), now)
        done = d.sched.kv_arrived(sr.id, SAMPLED_TOKEN, now)
        assert done is None, "the first token ends a request in SplitRequest and in the scheduler alike"
        self._kick(d, now)

    def _finish(self, sr: SimRequest, completion_tokens: int, cached_tokens: int, now: float) -> None:
        rec = sr.record
        rec.end_s = now
        rec.completion_tokens = completion_tokens
        rec.cached_tokens = max(0, cached_tokens)
        self.done += 1
        if sr.judged and self.watch is not None:
            self.watch.finished(rec)
        if self.slo is not None and not sr.failed and not meets_slo(rec, self.slo):
            self._fail(sr)

    def _deadline(self, sr: SimRequest, now: float) -> None:
        """A target's deadline passed: if the request has not got there, it will miss (the same tests as
        `meets_slo`'s, with the end at least `now`; float rounding at the boundary leaves it to be judged
        when it ends)."""
        rec = sr.record
        if sr.failed or rec.end_s is not None:
            return
        if rec.first_token_s is None:
            if now - rec.sent_s > self.slo.ttft_s:
                self._fail(sr)
        elif ((now - rec.sent_s) - (rec.first_token_s - rec.sent_s)) / (sr.spec.output_len - 1) > self.slo.tpot_s:
            self._fail(sr)

    def _fail(self, sr: SimRequest) -> None:
        if not sr.failed:
            sr.failed = True
            self.fails += sr.judged

    def _reject(self, sr: SimRequest, status: int, why: str, now: float) -> None:
        if sr.admitted:  # refused after admission: it leaves without a first token, which times nothing
            sr.admitted = False
            self.admission.leave(now, started=False)
        rec = sr.record
        rec.status, rec.error_kind, rec.error = status, "http", why
        self._fail(sr)
        if sr.judged and self.watch is not None:
            self.watch.refused(rec)

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


def simulate(spec: ClusterSpec, requests: Sequence[RequestSpec], policy: RouterPolicy | None = None, **kw) -> SimResult:
    return ClusterSim(spec, policy).run(requests, **kw)


def check_conservation(sim: ClusterSim) -> None:
    """After a complete run: every block back in its pool (cached or free), nothing held, queued or reserved."""
    for w in sim.workers:
        load = w.sched.load()
        if not load.idle or w.pending:
            raise AssertionError(f"worker {w.id} ({w.role}) still has requests: {load}")
        if load.free_blocks != load.total_blocks:
            raise AssertionError(f"worker {w.id} ({w.role}): {load.total_blocks - load.free_blocks} blocks still referenced")
