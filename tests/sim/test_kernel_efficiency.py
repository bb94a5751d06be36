"""Every GPU preset's kernel table says where each figure comes from: a figure that is not `Efficiency`'s
round default names its published source, and the round defaults are marked as such."""

from dataclasses import fields

import pytest

from splitserve.sim import hardware
from splitserve.sim.kernel_efficiency import DEFAULT, TABLES, kernel_table
from splitserve.sim.perf import Efficiency


@pytest.mark.parametrize("gpu", sorted(TABLES))
def test_every_figure_off_the_default_names_its_source(gpu):
    table, default = kernel_table(gpu), Efficiency()
    hardware.gpu(gpu)  # a table per preset, under the preset's own name
    for f in fields(Efficiency):
        value, source = getattr(table.efficiency, f.name), table.source(f.name)
        if value != getattr(default, f.name):
            assert source != DEFAULT and any(ch.isdigit() for ch in source), (gpu, f.name)
        if f.name in ("compute", "attention", "memory", "kv_memory") and source != DEFAULT:
            assert 0 < value <= 1


def test_kernel_and_overhead_figures_are_sourced_for_every_preset_and_the_rest_marked_unsourced():
    for gpu in ("h100", "h200", "a100", "l40s", "b200"):
        t = kernel_table(gpu)
        for name in ("compute", "memory", "kv_memory", "layer_overhead_s", "step_overhead_s"):
            assert t.source(name) != DEFAULT, (gpu, name)
        assert t.source("seq_overhead_s") == DEFAULT
        # A decoder layer's kernel floors are tens of microseconds, and with CUDA graphs no fixed step time.
        assert 10e-6 < t.efficiency.layer_overhead_s < 100e-6 and t.efficiency.step_overhead_s == 0.0
    assert kernel_table("no-such-gpu").efficiency == Efficiency()
