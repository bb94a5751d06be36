"""The one KV transfer-time formula, against hand-computed cases, and its three callers agreeing on it."""

import pytest

from splitserve.core.costs import CostModel
from splitserve.core.transfer_time import transfer, transfer_end
from splitserve.sim import hardware, models
from splitserve.sim.perf import Efficiency, PerfModel

H100 = hardware.gpu("h100")
L70 = models.model("llama-3.1-70b")


def test_unpipelined_exposes_latency_plus_every_byte():
    t = transfer(1e9, 1e8, 0.01, False, 10, layer_compute_s=0.5)
    assert t.exposed_s == t.total_s == pytest.approx(0.01 + 10.0)


def test_pipelined_exposes_one_layer_when_the_link_keeps_up():
    # x = 0.001 + 1e8 / 10 / 1e9 = 0.011 per layer, shorter than the 0.05 s of compute per layer.
    t = transfer(1e8, 1e9, 0.001, True, 10, layer_compute_s=0.05)
    assert t.exposed_s == pytest.approx(0.011)
    assert t.total_s == pytest.approx(10 * 0.001 + 0.1)


def test_a_slow_link_cannot_hide_behind_compute():
    # When a layer takes longer on the wire than to compute, the pipeline exposes L x - (L-1) c.
    t = transfer(1e9, 1e8, 0.0, True, 10, layer_compute_s=0.5)
    assert t.exposed_s == pytest.approx(10 * 1.0 - 9 * 0.5)
    assert transfer(0, 1e8, 0.0, True, 10) == transfer(0, 1e8, 0.0, False, 10)
    assert transfer(0, 1e8, 0.0, True, 10).exposed_s == 0.0


def test_end_time_waits_for_a_busy_link():
    # Compute ends at 10.0, its first of 4 layers at 9.4; a link busy until 11.0 starts the sends then.
    kw = dict(compute_end=10.0, first_layer_end=9.4)
    assert transfer_end(4e6, 1e6, 0.0, True, 4, **kw) == pytest.approx(13.4)  # 9.4 + 4 x 1.0
    assert transfer_end(4e6, 1e6, 0.0, True, 4, **kw, link_free=11.0) == pytest.approx(15.0)
    assert transfer_end(4e6, 1e6, 0.5, False, 4, **kw, link_free=11.0) == pytest.approx(15.5)
    assert transfer_end(0, 1e6, 0.5, False, 4, **kw, link_free=11.0) == 10.0  # nothing to send


def test_pipelined_over_rdma_exposes_one_layer_unpipelined_all():
    nbytes = 4096 * L70.kv_bytes_per_token()  # 1.34 GB
    bw = hardware.network("rdma-400").instance_bandwidth(1)
    lat = hardware.network("rdma-400").latency_s
    layer = PerfModel(L70, H100, 1, Efficiency()).layer_time(PerfModel(L70, H100, 4).prefill_time(4096))
    piped = transfer(nbytes, bw, lat, True, L70.num_layers, layer)
    whole = transfer(nbytes, bw, lat, False, L70.num_layers)
    per_layer = nbytes / L70.num_layers / bw
    assert piped.exposed_s < 0.030  # the claim: under 30 ms over 400 Gbit/s RDMA
    assert piped.exposed_s == pytest.approx(per_layer, rel=0.05)
    assert whole.exposed_s == pytest.approx(nbytes / bw, rel=0.01)
    assert whole.exposed_s > 50 * piped.exposed_s


@pytest.mark.parametrize("pipelined", [True, False])
def test_the_router_cost_model_uses_the_same_formula(pipelined):
    cm = CostModel(kv_bytes_per_token=1e5, num_layers=10, link_bytes_per_s=1e8, prefill_s_per_token=1e-4,
                   decode_step_s=0.02, pipelined=pipelined, link_latency_s=1e-3)
    expect = transfer(2000 * 1e5, 1e8, 1e-3, pipelined, 10, layer_compute_s=0.2 / 10).exposed_s
    assert cm.transfer_s(2000, prefill_s=0.2) == pytest.approx(expect)
