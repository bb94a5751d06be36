"""Roofline step-time model: how long one scheduled batch takes on one worker.

A worker is one model replica on `tp` GPUs (tensor parallel). What a step computes and moves, per layer and
per GPU, is the model's own account (`core.model_spec.WorkModel`); here each operation takes
max(FLOPs / (peak FLOP/s x compute efficiency), bytes / (peak bandwidth x memory efficiency)), attention reads
the paged cache at its own efficiency, and with tp > 1 two all-reduces per layer join the shards over the
intra-node link (latency x log2(tp) + traffic / link each). A step is the layers plus the LM head, plus a
fixed overhead, a per-layer one (the floors of a layer's small kernels, which a roofline alone puts near zero
at batch 1), a per-sequence and a per-token overhead (scheduling, launches, sampling).
Decode (few tokens per sequence) is bound by bandwidth, a long prefill by compute: the model shows both.

The efficiencies default to round figures for tuned GPU kernels; `splitserve plan calibrate` fits them (and
the overheads) to the real engine on the machine at hand. The router's cost model calls `prefill_time`,
`decode_step_time` so that it and the planner share one model (the KV transfer: `core.transfer_time`).
"""

from __future__ import annotations

from dataclasses import dataclass

from splitserve.core.model_spec import Batch, ModelSpec, WorkModel, StepWork
from splitserve.sim.hardware import Hardware

GPU_RESERVE_BYTES = 1e9  # per GPU, beyond the weights: activations, CUDA context, workspace


@dataclass(frozen=True)
class Efficiency:
    compute: float = 0.6  # matrix products: fraction of peak FLOP/s
    attention: float = 0.5  # attention kernels: fraction of peak FLOP/s
    # A chunk of several tokens attending to its cached context (chunked prefill, a prefix-cache hit); None:
    # `attention`'s. A calibration fits it apart because the engine runs it another way (see
    # `core.model_spec.StepWork`): fitted to the AVX2 EPYC's 2-thread calibration it is 0.66 of peak where a
    # fresh prompt's causal attention is 1.40 (`results/interference_avx2/README.md`).
    prefix_attention: float | None = None
    memory: float = 0.8  # fraction of peak memory bandwidth (weights, activations)
    kv_memory: float = 0.7  # fraction of peak bandwidth when attention reads the paged KV cache
    comm: float = 0.7  # all-reduce: fraction of the intra-node link bandwidth
    step_overhead_s: float = 2e-3  # per step: scheduling, kernel launches
    layer_overhead_s: float = 0.0  # per layer per step: the latency floors of its kernels (GPU tables)
    seq_overhead_s: float = 5e-6  # per sequence in the batch
    token_overhead_s: float = 0.0  # per token in the batch

    def __post_init__(self) -> None:
        for name in ("compute", "attention", "prefix_attention", "memory", "kv_memory", "comm"):
            v = getattr(self, name)
            if v is None and name == "prefix_attention":
                continue
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
        self.counter = WorkModel(model, tp)
        self.model, self.hardware, self.tp, self.eff = model, hardware, tp, eff
        self.layers = model.num_layers
        self.compute_rate = hardware.flops * eff.compute
        self.att_rate = hardware.flops * eff.attention
        self.prefix_att_rate = hardware.flops * (eff.attention if eff.prefix_attention is None else eff.prefix_attention)
        self.mem_rate = hardware.mem_bw * eff.memory
        self.kv_rate = hardware.mem_bw * eff.kv_memory
        self.link_rate = hardware.link_bw * eff.comm
        self.ar_latency = hardware.link_latency_s * max(1, (tp - 1).bit_length())  # tree-like for small messages

    # ---------------------------------------------------------------------------------- core formula

    def timed(self, w: StepWork) -> StepCost:
        """The seconds of a step's work on this worker."""
        att_s = (w.attention_flops - w.prefix_attention_flops) / self.att_rate + w.prefix_attention_flops / self.prefix_att_rate
        layer = (max(w.linear_flops / self.compute_rate, w.linear_bytes / self.mem_rate)
                 + max(att_s, w.attention_bytes / self.kv_rate))
        if self.tp > 1:
            layer += 2 * (self.ar_latency + w.allreduce_bytes / self.link_rate)
        head = max(w.head_flops / self.compute_rate, w.head_bytes / self.mem_rate)
        e = self.eff
        t = (self.layers * (layer + e.layer_overhead_s) + head + e.step_overhead_s + e.seq_overhead_s * w.seqs
             + e.token_overhead_s * w.tokens)
        return StepCost(t, w.flops, w.bytes)

    def cost(self, tokens: int, samples: int, att_pairs: float, kv_tokens: int, seqs: int,
             prefix_pairs: float = 0.0) -> StepCost:
        """A step computing `tokens` new tokens for `seqs` sequences, `samples` of which sample; attention
        covers `att_pairs` query-key pairs, `prefix_pairs` of them between a chunk and its cached context, and
        reads `kv_tokens` tokens of K/V."""
        return self.timed(self.counter.work(tokens, samples, att_pairs, kv_tokens, seqs, prefix_pairs))

    def roofline_parts(self, seqs: Batch) -> tuple[float, ...]:
        """Seconds at peak (efficiency 1) of one step's parts, for fitting efficiencies: per layer (linear
        compute, linear memory, attention compute apart from prefix pairs, prefix attention compute, attention
        memory, all-reduce), then the LM head (compute, memory), then (sequences, tokens)."""
        w, hw = self.counter.batch(seqs), self.hardware
        comm = 2 * (self.ar_latency + w.allreduce_bytes / hw.link_bw) if self.tp > 1 else 0.0
        return (
            w.linear_flops / hw.flops, w.linear_bytes / hw.mem_bw,
            (w.attention_flops - w.prefix_attention_flops) / hw.flops, w.prefix_attention_flops / hw.flops,
            w.attention_bytes / hw.mem_bw, comm,
            w.head_flops / hw.flops, w.head_bytes / hw.mem_bw,
            w.seqs, w.tokens,
        )

    def step(self, seqs: Batch) -> StepCost:
        """A batch given as (new tokens, tokens already cached, samples) per sequence."""
        return self.timed(self.counter.batch(seqs))

    def scheduled(self, out) -> StepCost:
        """The cost of a core `SchedulerOutput` (the simulator's hot path)."""
        return self.timed(self.counter.scheduled(out))

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
        prefix = chunk * chunk_ctx if chunk > 1 else 0.0
        pairs = batch * (ctx + 1.0) + chunk * chunk_ctx + chunk * (chunk + 1) / 2
        return self.cost(batch + chunk, batch + 1, pairs, batch * (ctx + 1) + chunk_ctx + chunk, batch + 1, prefix).seconds

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
