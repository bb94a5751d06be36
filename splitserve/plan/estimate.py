"""Closed-form capacity of one worker at the SLO: the planner's screen before it simulates.

From mean lengths and the roofline model alone, each estimate says how many requests per second a worker
could sustain while meeting TTFT and TPOT on average (with a margin), and which constraint stops it there.
It is only used to rank candidate configurations and to bracket the simulator's rate search; every number
the planner reports comes from the simulator.

    colocated, whole prompts   B decoding requests; each waits out the B prefills that arrive during its
                               life: TPOT = d(B) + B S / O, rate = B / (O TPOT)
    colocated, chunked (c)     a step carries B decodes and, while prompts are pending, c prompt tokens
                               (s(B, c), else d(B)); over a request's O steps the B prompts that arrive
                               meanwhile take f = min(1, B I / (c O)) of them: TPOT = d + f (s - d),
                               rate = min(B / (O TPOT), c / (prompt s)). (Assuming every step carries
                               a full chunk scored every chunked unit 0 under a tight TPOT, so the search
                               never simulated one, though they often win.)
    prefill worker             rate = rho / S, rho limited by TTFT queueing and the link (KV bytes out)
    decode worker              rate = B / (O d(B)), B as large as TPOT (plus exposed transfer) and KV allow
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

from splitserve.core.transfer_time import transfer
from splitserve.sim.perf import PerfModel
from splitserve.workload.requests import RequestSpec
from splitserve.workload.slo import SLO

TPOT_MARGIN = 0.85  # averages against a p90-style target
MAX_RHO = 0.9  # never plan a queue at full utilisation
BATCH_FILL = 0.9  # decode batches are not always full


@dataclass(frozen=True)
class Traffic:
    mean_input: float
    mean_output: float
    hit_rate: float  # prompt tokens an unbounded prefix cache would serve
    decode_context: float = 0.0  # mean context a decode step's token is computed at (0: prompt + half the output)

    @property
    def uncached_input(self) -> float:
        return max(1.0, self.mean_input * (1 - self.hit_rate))

    @classmethod
    def of(cls, requests: Sequence[RequestSpec]) -> Traffic:
        if not requests:
            return cls(1.0, 1.0, 0.0)
        seen: set[int] = set()
        hit = total = 0
        for r in requests:
            parent, matched, still = 0, 0, True
            for b in r.prefix_blocks:
                parent = hash((parent, b))
                if still and parent in seen:
                    matched += 1
                else:
                    still = False
                    seen.add(parent)
            hit += min(matched * r.block_tokens, r.input_len - 1) if matched else 0
            total += r.input_len
        n = len(requests)
        steps = sum(r.output_len - 1 for r in requests)  # decode steps: the prefill samples the first token
        context = sum((r.output_len - 1) * (r.input_len + r.output_len / 2) for r in requests) / steps if steps else 0.0
        return cls(total / n, sum(r.output_len for r in requests) / n, hit / total if total else 0.0, context)


@dataclass(frozen=True)
class Estimate:
    rate: float  # requests per second, one worker
    binding: str  # what stops it there
    detail: dict = field(default_factory=dict)


def _batches(limit: int) -> list[int]:
    out, b = [], 1.0
    while b < limit:
        out.append(int(b))
        b = max(b * 1.15, b + 1)
    out.append(int(limit))
    return sorted(set(out))


def _limits(pm: PerfModel, t: Traffic, max_num_seqs: int) -> tuple[int, str]:
    mem = int(pm.kv_capacity_tokens() * 0.9 / (t.mean_input + t.mean_output / 2))
    if mem < max_num_seqs:
        return max(1, mem), "KV cache memory"
    return max_num_seqs, "the running-batch cap"


def _prefill_batch(pm: PerfModel, t: Traffic, budget: int = 4096) -> tuple[float, float]:
    """(seconds of one step prefilling k prompts together, seconds per prompt in that step)."""
    iu, cached = t.uncached_input, t.mean_input - t.uncached_input
    k = max(1, min(16, int(budget // iu)))
    step = pm.step([(int(iu), int(cached), True)] * k).seconds
    return step, step / k


def colocated(pm: PerfModel, t: Traffic, slo: SLO, max_num_seqs: int, chunk: int | None = None) -> Estimate:
    tau = (slo.tpot_s or math.inf) * TPOT_MARGIN
    ttft = slo.ttft_s or math.inf
    out = max(1.0, t.mean_output)
    ctx = t.mean_input + out / 2
    iu = t.uncached_input
    bmax, cap_reason = _limits(pm, t, max_num_seqs)
    single = pm.prefill_time(int(iu), int(t.mean_input - iu))
    _, per_prompt = _prefill_batch(pm, t)
    best, why = 0.0, "TTFT: a lone prefill is slower than the target"
    reasons = {}
    for b in _batches(bmax):
        if chunk is None:
            d = pm.decode_step_time(b, ctx)
            tpot = d + b * per_prompt / out
            rho_max = max(0.0, min(MAX_RHO, (ttft - single - d) / ttft))
            rate_tpot = b / (out * tpot)
            rate_ttft = rho_max / per_prompt
        else:
            c = min(chunk, int(iu))
            s = pm.mixed_step_time(b, ctx, c, t.mean_input - iu + iu / 2)
            d = pm.decode_step_time(b, ctx)
            tpot = d + min(1.0, b * iu / (c * out)) * max(0.0, s - d)
            steps = math.ceil(iu / c)
            rho_max = max(0.0, min(MAX_RHO, (ttft - steps * s) / ttft))
            rate_tpot = BATCH_FILL * b / (out * tpot)
            rate_ttft = rho_max * c / (iu * s)
        if tpot > tau:
            reasons["tpot"] = True
            break
        rate = min(rate_tpot, rate_ttft)
        if rate > best:
            best = rate
            why = "TTFT: prefill queueing" if rate_ttft < rate_tpot else (
                f"{cap_reason} (batch {b})" if b == bmax else "TPOT: prefill work stalls decodes")
    if best == 0.0 and reasons.get("tpot"):
        why = "TPOT: even a lone decode step (with its share of prefill) is slower than the target"
    return Estimate(best, why, {"prefill_s": single, "batch_limit": bmax, "chunk": chunk})


def prefill_worker(pm: PerfModel, t: Traffic, slo: SLO, link_bw: float) -> Estimate:
    ttft = slo.ttft_s or math.inf
    step, per_prompt = _prefill_batch(pm, t)
    single = pm.prefill_time(int(t.uncached_input), int(t.mean_input - t.uncached_input))
    rho = max(0.0, min(MAX_RHO, (ttft - max(step, single)) / ttft)) if math.isfinite(ttft) else MAX_RHO
    if rho <= 0:
        return Estimate(0.0, "TTFT: a lone prefill is slower than the target", {"prefill_s": single})
    compute = rho / per_prompt
    kv_bytes = t.uncached_input * pm.model.kv_bytes_per_token()
    link = MAX_RHO * link_bw / kv_bytes
    if link < compute:
        return Estimate(link, "network: the link cannot carry the KV as fast as prefill makes it", {"prefill_s": single})
    return Estimate(compute, "prefill compute at the TTFT target", {"prefill_s": single})


def decode_worker(pm: PerfModel, t: Traffic, slo: SLO, max_num_seqs: int, exposed_transfer_s: float) -> Estimate:
    out = max(1.0, t.mean_output)
    if out <= 1:
        return Estimate(math.inf, "no decode work", {})
    tau = (slo.tpot_s or math.inf) * TPOT_MARGIN
    ctx = t.mean_input + out / 2
    bmax, cap_reason = _limits(pm, t, max_num_seqs)
    extra = exposed_transfer_s / (out - 1)
    best, why = 0.0, "TPOT: a lone decode step (plus the exposed transfer) is slower than the target"
    for b in _batches(bmax):
        d = pm.decode_step_time(b, ctx)
        if d + extra > tau:
            break
        best = BATCH_FILL * b / (out * d)
        why = f"{cap_reason} (batch {b})" if b == bmax else "TPOT: decode step time grows with the batch"
    return Estimate(best, why, {"batch_limit": bmax, "exposed_transfer_s": exposed_transfer_s})


def decode_capacity(pm: PerfModel, t: Traffic, max_num_seqs: int) -> float:
    """An upper bound on the requests per second one worker can decode, whatever the SLO: each decode step
    costs at least the cheapest per-sequence share of a step up to the batch cap, at the mean context its
    tokens are decoded at (a step's time is convex in its context, so the mean understates it). Prefill
    work on the same worker, a smaller batch or less KV room only lower it. The search prunes a unit whose
    bound is below the rate it would need to beat the best of its mode, without simulating it."""
    steps = t.mean_output - 1
    if steps <= 0:
        return math.inf
    ctx = t.decode_context or t.mean_input + t.mean_output / 2
    per_token = min(pm.decode_step_time(b, ctx) / b for b in _batches(max_num_seqs))
    return 1.0 / (steps * per_token)


def exposed_transfer(p: PerfModel, t: Traffic, bandwidth: float, latency_s: float, pipelined: bool) -> float:
    iu = t.uncached_input
    prefill = p.prefill_time(int(iu), int(t.mean_input - iu))
    return transfer(iu * p.model.kv_bytes_per_token(), bandwidth, latency_s, pipelined, p.layers, p.layer_time(prefill)).exposed_s
