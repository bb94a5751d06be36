"""Live phase utilisation (issue #7): roofline FLOPs/bytes per step over measured time and machine peaks."""

import json

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from splitserve.core.scheduler import ScheduledSeq, SchedulerOutput
from splitserve.core.model_spec import ModelSpec
from splitserve.runtime.worker.peaks import MachinePeaks, machine_peaks, peaks_from_calibration
from splitserve.runtime.worker.utilization import BANDWIDTH_METRIC, COMPUTE_METRIC, UtilizationCollector, UtilizationMeter

# SmolLM2-135M's shape, in float32.
CONFIG = ModelSpec.from_hf_config({
    "architectures": ["LlamaForCausalLM"], "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
    "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0, "max_position_embeddings": 8192, "tie_word_embeddings": True,
}).with_dtype(4)
PEAKS = MachinePeaks(flops=1e12, bandwidth=50e9)  # a CPU-like machine: ridge at 20 FLOP/byte


def step(*seqs):
    return SchedulerOutput([ScheduledSeq(None, start, new, sample) for new, start, sample in seqs])


def meter(clock=lambda: 100.0):
    return UtilizationMeter(CONFIG, PEAKS, window_s=10.0, clock=clock)


def roofline_seconds(m, out):
    c = m.cost(out)
    return max(c.flops / PEAKS.flops, c.bytes / PEAKS.bandwidth)


def test_prefill_is_compute_heavy_decode_is_bandwidth_heavy():
    prefill, decode = step((1024, 0, True)), step((1, 1024, True))
    p, d = meter(), meter()
    # Synthetic step times: each step at its roofline time x 2 (half the machine's peak on its binding resource).
    p.observe(prefill, 2 * roofline_seconds(p, prefill), now=100.0)
    d.observe(decode, 2 * roofline_seconds(d, decode), now=100.0)
    up, ud = p.utilization(100.0), d.utilization(100.0)
    assert up.compute > ud.compute * 10
    assert ud.bandwidth > ud.compute
    assert up.compute > up.bandwidth
    assert up.compute == pytest.approx(0.5) and ud.bandwidth == pytest.approx(0.5)
    # The accounting is the planner's: FLOPs grow with tokens, bytes are dominated by the weights for decode.
    assert p.cost(prefill).flops > 500 * d.cost(decode).flops


def test_window_and_busy_fraction():
    m = meter()
    out = step((1, 100, True))
    for i in range(10):
        m.observe_work(1e9, 1e8, 0.01, now=float(i))  # 10 steps of 10 ms, one per second
    u = m.utilization(now=9.0)
    assert u.steps == 10 and u.compute == pytest.approx(1e9 / 0.01 / PEAKS.flops)
    assert u.busy == pytest.approx(0.1 / 9.01, rel=1e-3)
    assert m.utilization(now=100.0).steps == 0  # all older than the window
    assert m.utilization(now=100.0).compute == 0.0
    m.observe(out, 0.002, now=100.0)
    assert m.utilization(now=100.0).steps == 1


def test_a_step_faster_than_the_measured_peak_raises_it():
    m = meter()
    m.observe_work(4e12, 1e9, 1.0, now=100.0)  # 4x the measured FLOP/s peak
    assert m.peaks.flops == 4e12 and m.utilization(100.0).compute == pytest.approx(1.0)
    assert UtilizationMeter(CONFIG, PEAKS, adaptive=False).peaks.flops == 1e12


def test_prometheus_gauges():
    m = meter(clock=lambda: 5.0)
    m.observe_work(2e11, 5e9, 1.0, now=5.0)
    reg = CollectorRegistry()
    reg.register(UtilizationCollector(m, {"role": "prefill"}))
    text = generate_latest(reg).decode()
    assert f'{COMPUTE_METRIC}{{role="prefill"}} 0.2' in text
    assert f'{BANDWIDTH_METRIC}{{role="prefill"}} 0.1' in text


def test_attach_observes_every_engine_step():
    class Engine:
        step_observers: list = []

    e, m = Engine(), meter()
    m.attach(e)
    e.step_observers[0](step((16, 0, True)), 0.5)
    assert m.total_s == 0.5 and m.total_flops > 0


def test_peaks_from_a_calibration_file(tmp_path, monkeypatch):
    f = tmp_path / "cal.json"
    f.write_text(json.dumps({"hardware": {"flops": 2e12, "mem_bw": 4e10}}))
    assert peaks_from_calibration(f).flops == 2e12
    monkeypatch.setenv("SPLITSERVE_CALIBRATION", str(f))
    assert machine_peaks().bandwidth == 4e10
    f.write_text("{}")
    with pytest.raises(ValueError):
        peaks_from_calibration(f)
