"""The roofline: decode is bound by memory bandwidth, long prefills by compute; and TP behaves."""

import pytest

from splitserve.sim import hardware, models
from splitserve.sim.perf import Efficiency, PerfModel

H100 = hardware.gpu("h100")
L70 = models.model("llama-3.1-70b")


def intensity_vs_ridge(pm: PerfModel, batch) -> float:
    """FLOPs per byte of the step over the hardware's ridge point (< 1: memory-bound, > 1: compute-bound)."""
    c = pm.step(batch)
    return (c.flops / c.bytes) / (pm.hardware.flops / pm.hardware.mem_bw)


def test_decode_is_memory_bound_and_long_prefill_compute_bound():
    pm = PerfModel(L70, H100, tp=4)
    assert intensity_vs_ridge(pm, [(1, 2048, True)] * 64) < 0.3
    assert intensity_vs_ridge(pm, [(8192, 0, True)]) > 3
    # Decode: 64 sequences cost far less than 64 single steps (the weights are read once per step) ...
    assert pm.decode_step_time(64, 2048) < 3 * pm.decode_step_time(1, 2048)
    # ... while prefill time grows with the tokens.
    assert pm.prefill_time(8192) > 1.8 * pm.prefill_time(4096)


def test_step_time_grows_with_batch_and_context_and_shrinks_with_tp():
    pm = PerfModel(L70, H100, tp=4)
    assert pm.decode_step_time(128, 8192) > pm.decode_step_time(128, 1024) > pm.decode_step_time(8, 1024)
    assert PerfModel(L70, H100, tp=8).prefill_time(4096) < pm.prefill_time(4096)
    # A cached prefix is not recomputed: only its attention is paid.
    assert pm.prefill_time(512, cached=3584) < 0.25 * pm.prefill_time(4096)


def test_efficiencies_and_overheads_scale_the_time():
    slow = PerfModel(L70, H100, 4, Efficiency(compute=0.3))
    fast = PerfModel(L70, H100, 4, Efficiency(compute=0.6))
    assert slow.prefill_time(8192) > 1.5 * fast.prefill_time(8192)  # attention has its own efficiency
    busy = PerfModel(L70, H100, 4, Efficiency(step_overhead_s=0.010))
    assert busy.decode_step_time(1, 100) - fast.decode_step_time(1, 100) == pytest.approx(0.008)
    # A layer's kernel floors are paid once per layer per step, whatever the batch.
    floors = PerfModel(L70, H100, 4, Efficiency(layer_overhead_s=30e-6))
    for batch in (1, 64):
        extra = floors.decode_step_time(batch, 100) - PerfModel(L70, H100, 4).decode_step_time(batch, 100)
        assert extra == pytest.approx(L70.num_layers * 30e-6)


def test_kv_capacity_counts_weights_and_tp():
    assert PerfModel(L70, H100, 1).kv_capacity_tokens() < 0  # 141 GB of weights on one 80 GB GPU
    assert PerfModel(L70, H100, 8).kv_capacity_tokens() > 2.5 * PerfModel(L70, H100, 4).kv_capacity_tokens()


def test_a_chunk_over_a_cached_prefix_has_its_own_attention_efficiency():
    base = PerfModel(L70, H100, 4)
    assert PerfModel(L70, H100, 4, Efficiency(prefix_attention=0.5)).prefill_time(512, 7680) == base.prefill_time(512, 7680)
    slow = PerfModel(L70, H100, 4, Efficiency(prefix_attention=0.1))
    # Only a chunk's pairs with its cached context are slower: a fresh prompt and a decode are not.
    assert slow.prefill_time(512, 7680) > 1.3 * base.prefill_time(512, 7680)
    assert slow.prefill_time(8192) == base.prefill_time(8192)
    assert slow.decode_step_time(64, 8192) == base.decode_step_time(64, 8192)
    assert slow.mixed_step_time(16, 2048, 512, 7680) > base.mixed_step_time(16, 2048, 512, 7680)
    assert slow.mixed_step_time(16, 2048, 512, 0) == base.mixed_step_time(16, 2048, 512, 0)
    with pytest.raises(ValueError, match="prefix_attention"):
        Efficiency(prefix_attention=0.0)
