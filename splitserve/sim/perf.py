"""Roofline step-time model: how long one scheduled batch takes on one worker, and what it moves.

A worker is one model replica on `tp` GPUs (tensor parallel). Each GPU does 1/tp of every matrix product
and of attention, and two all-reduces per layer join the shards over the intra-node link. Per layer:

    projections + MLP   FLOPs 2 * tokens * linear_params / tp     bytes: weights / tp + activations
    attention           FLOPs 4 * q_heads * head_dim * sum over sequences of (new * context + new^2 / 2) / tp
                        bytes: the K and V of every sequence's context and new tokens (/ tp), read from
                        the paged cache at its own efficiency
    all-reduce (tp > 1) 2 x (latency x log2(tp) + 2 (tp-1)/tp * tokens * hidden * bytes / link)
and once per step the LM head for the sequences that sample. Each operation takes
max(FLOPs / (peak FLOP/s x compute efficiency), bytes / (peak bandwidth x memory efficiency)); a step is
their sum plus a fixed overhead, a per-sequence and a per-token overhead (scheduling, launches, sampling).
Decode (few tokens per sequence) is bound by bandwidth, a long prefill by compute: the model shows both.

The efficiencies default to round figures for tuned GPU kernels; `splitserve plan calibrate` fits them (and
the overheads) to the real engine on the machine at hand. The router's cost model calls `prefill_time`,
`decode_step_time` so that it and the planner share one model (the KV transfer: `core.transfer_time`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from splitserve.sim.hardware import Hardware
from splitserve.sim.models import ModelSpec

GPU_RESERVE_BYTES = 1e9  # per GPU, beyond the weights: activations, CUDA context, workspace


@dataclass(frozen=True)
class Efficiency:
    compute: float = 0.6  # matrix products: fraction of peak FLOP/s
    attention: float = 0.5  # attention kernels: fraction of peak FLOP/s
    memory: float = 0.8  # fraction of peak memory bandwidth (weights, activations)
    kv_memory: float = 0.7  # fraction of peak bandwidth when attention reads the paged KV cache
    comm: float = 0.7  # all-reduce: fraction of the intra-node link bandwidth
    step_overhead_s: float = 2e-3  # per step: scheduling, kernel launches
    seq_overhead_s: float = 5e-6  # per sequence in the batch
    token_overhead_s: float = 0.0  # per token in the batch

    def __post_init__(self) -> None:
        for name in ("compute", "attention", "memory", "kv_memory", "comm"):
            v = getattr(self, name)
            if not 0 < v <= 4:
                raise ValueError(f"efficiency {name} must be in (0, 4], got {v}")


@dataclass(frozen=True)
class StepCost:
    seconds: float
    flops: float  # whole worker (all tp GPUs)
    bytes: float  # memory traffic, whole worker


class PerfModel:
    """Step times of one worker: `model` on `tp` GPUs of kind `hardware`."""

    def __init__(self, model: ModelSpec, hardware: Hardware, tp: int = 1, eff: Efficiency = Efficiency()) -> None:
        if tp < 1:
            raise ValueError(f"tensor parallel size must be >= 1, got {tp}")
        self.model, self.hardware, self.tp, self.eff = model, hardware, tp, eff
        m, wb = model, model.dtype_bytes
        self.layers = m.num_layers
        # Per GPU, per layer.
        self.lin_flops_tok = 2.0 * m.linear_params_per_layer / tp
        self.lin_weight_bytes = m.linear_params_per_layer * wb / tp
        # Activations read and written around each product (x, qkv, attn out, gate/up, down), per token.
        h, i = m.hidden_size, m.intermediate_size
        self.act_bytes_tok = (4 * h + m.q_dim + 2 * m.kv_dim + 3 * i) * wb / tp
        self.att_flops_coef = 4.0 * m.q_dim / tp
        self.kv_bytes_tok_layer = 2.0 * m.kv_dim * m.kv_dtype_bytes / tp
        self.head_flops_sample = 2.0 * h * m.vocab_size / tp
        self.head_bytes = h * m.vocab_size * wb / tp
        self.ar_bytes_tok = h * wb * 2.0 * (tp - 1) / tp  # ring all-reduce traffic per GPU, per token
        self.compute_rate = hardware.flops * eff.compute
        self.att_rate = hardware.flops * eff.attention
        self.mem_rate = hardware.mem_bw * eff.memory
        self.kv_rate = hardware.mem_bw * eff.kv_memory
        self.link_rate = hardware.link_bw * eff.comm
        self.ar_latency = hardware.link_latency_s * max(1, (tp - 1).bit_length())  # tree-like for small messages

    # ---------------------------------------------------------------------------------- core formula

    def cost(self, tokens: int, samples: int, att_pairs: float, kv_tokens: int, seqs: int) -> StepCost:
        """A step computing `tokens` new tokens for `seqs` sequences, `samples` of which sample; attention
        covers `att_pairs` query-key pairs and reads `kv_tokens` tokens of K/V."""
        lin_f = tokens * self.lin_flops_tok
        lin_b = self.lin_weight_bytes + tokens * self.act_bytes_tok
        att_f = att_pairs * self.att_flops_coef
        att_b = kv_tokens * self.kv_bytes_tok_layer
        layer = max(lin_f / self.compute_rate, lin_b / self.mem_rate) + max(att_f / self.att_rate, att_b / self.kv_rate)
        if self.tp > 1:
            layer += 2 * (self.ar_latency + tokens * self.ar_bytes_tok / self.link_rate)
        head_f = samples * self.head_flops_sample
        head_b = self.head_bytes if samples else 0.0
        head = max(head_f / self.compute_rate, head_b / self.mem_rate)
        e = self.eff
        t = (self.layers * layer + head + e.step_overhead_s + e.seq_overhead_s * seqs + e.token_overhead_s * tokens)
        flops = (self.layers * (lin_f + att_f) + head_f) * self.tp
        nbytes = (self.layers * (lin_b + att_b) + head_b) * self.tp
        return StepCost(t, flops, nbytes)

    def roofline_parts(self, seqs: Iterable[tuple[int, int, bool]]) -> tuple[float, ...]:
        """Seconds at peak (efficiency 1) of one step's parts, for fitting efficiencies: per layer (linear
        compute, linear memory, attention compute, attention memory, all-reduce), then the LM head (compute,
        memory), then (sequences, tokens)."""
        tokens, samples, pairs, kv, n_seqs = _totals(seqs)
        hw = self.hardware
        comm = 2 * (self.ar_latency + tokens * self.ar_bytes_tok / hw.link_bw) if self.tp > 1 else 0.0
        return (
            tokens * self.lin_flops_tok / hw.flops, (self.lin_weight_bytes + tokens * self.act_bytes_tok) / hw.mem_bw,
            pairs * self.att_flops_coef / hw.flops, kv * self.kv_bytes_tok_layer / hw.mem_bw, comm,
            samples * self.head_flops_sample / hw.flops, (self.head_bytes if samples else 0.0) / hw.mem_bw,
            n_seqs, tokens,
        )

    def step(self, seqs: Iterable[tuple[int, int, bool]]) -> StepCost:
        """A batch given as (new tokens, tokens already cached, samples) per sequence."""
        tokens, samples, pairs, kv, n_seqs = _totals(seqs)
        return self.cost(tokens, samples, pairs, kv, n_seqs)

    def scheduled(self, out) -> StepCost:
        """The cost of a core `SchedulerOutput` (the simulator's hot path)."""
        tokens = samples = kv = 0
        pairs = 0.0
        for s in out.seqs:
            n, c = s.num_new_tokens, s.start_pos
            tokens += n
            kv += c + n
            pairs += n * c + n * (n + 1) * 0.5
            if s.sample:
                samples += 1
        return self.cost(tokens, samples, pairs, kv, len(out.seqs))

    # ---------------------------------------------------------------------------------- questions

    def prefill_time(self, tokens: int, cached: int = 0) -> float:
        """One prompt alone: `tokens` new tokens after `cached` tokens found in the prefix cache."""
        return self.step([(tokens, cached, True)]).seconds

    def decode_step_time(self, batch: int, ctx: float) -> float:
        """One decode step of `batch` sequences, each with `ctx` tokens of context."""
        if batch <= 0:
            return 0.0
        ctx = max(0, int(ctx))
        return self.cost(batch, batch, batch * (ctx + 1.0), batch * (ctx + 1), batch).seconds

    def mixed_step_time(self, batch: int, ctx: float, chunk: int, chunk_ctx: float = 0) -> float:
        """A decode batch plus `chunk` prompt tokens of one sequence (chunked prefill)."""
        ctx, chunk_ctx = max(0, int(ctx)), max(0, int(chunk_ctx))
        pairs = batch * (ctx + 1.0) + chunk * chunk_ctx + chunk * (chunk + 1) / 2
        return self.cost(batch + chunk, batch + 1, pairs, batch * (ctx + 1) + chunk_ctx + chunk, batch + 1).seconds

    def layer_time(self, step_seconds: float) -> float:
        e = self.eff
        return max(0.0, step_seconds - e.step_overhead_s) / self.layers

    # ---------------------------------------------------------------------------------- memory

    def kv_capacity_tokens(self, mem_util: float = 0.9, reserve_bytes: float = GPU_RESERVE_BYTES) -> int:
        """Tokens of KV cache the worker holds after weights and a reserve; <= 0 means the model does not fit."""
        free = self.tp * (self.hardware.mem_bytes * mem_util - reserve_bytes) - self.model.weight_bytes
        return int(free // self.model.kv_bytes_per_token())

    @property
    def peak_flops(self) -> float:
        return self.hardware.flops * self.tp

    @property
    def peak_bandwidth(self) -> float:
        return self.hardware.mem_bw * self.tp


def _totals(seqs: Iterable[tuple[int, int, bool]]) -> tuple[int, int, float, int, int]:
    """(tokens, sampling sequences, attention query-key pairs, KV tokens read, sequences) of a batch given
    as (new tokens, tokens already cached, samples) per sequence."""
    tokens = samples = kv = n_seqs = 0
    pairs = 0.0
    for n, c, sample in seqs:
        tokens += n
        kv += c + n
        pairs += n * c + n * (n + 1) / 2
        samples += bool(sample)
        n_seqs += 1
    return tokens, samples, pairs, kv, n_seqs


# Module-level forms for callers without a PerfModel at hand (the router's cost model).


def prefill_time(model: ModelSpec, hardware: Hardware, tokens: int, cached: int = 0, tp: int = 1, eff: Efficiency = Efficiency()) -> float:
    return PerfModel(model, hardware, tp, eff).prefill_time(tokens, cached)


def decode_step_time(model: ModelSpec, hardware: Hardware, batch: int, ctx: float, tp: int = 1, eff: Efficiency = Efficiency()) -> float:
    return PerfModel(model, hardware, tp, eff).decode_step_time(batch, ctx)
