"""Calibration: the fit recovers a known model, and profiling drives the real engine over the grid."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from splitserve.calibrate.fit import fit
from splitserve.calibrate.table import Calibration, Point, cpu_hardware
from splitserve.sim.hardware import PresetError
from splitserve.sim.models import model
from splitserve.sim.perf import Efficiency, PerfModel

SMOL = model("smollm2-135m").with_dtype(4)
CPU = cpu_hardware(100e9, 20e9, 16e9, 1)


def synthetic_points(eff: Efficiency) -> list[Point]:
    pm = PerfModel(SMOL, CPU, 1, eff)
    batches = [[(n, c, True)] for n, c in [(16, 0), (64, 0), (256, 0), (512, 0), (128, 384)]]
    batches += [[(64, 0, True)] * 4, [(32, 0, True)] * 8]
    batches += [[(1, c, True)] * b for b in (1, 4, 16, 48) for c in (64, 512)]
    return [Point("x", b, pm.step(b).seconds) for b in batches]


def test_fit_recovers_the_step_times_of_a_known_model():
    truth = Efficiency(compute=0.45, attention=0.2, memory=0.7, step_overhead_s=0.02, seq_overhead_s=0.001, token_overhead_s=2e-5)
    points = synthetic_points(truth)
    eff, median, p90 = fit(SMOL, CPU, points)
    assert p90 < 0.05, (eff, median, p90)
    assert eff.step_overhead_s == pytest.approx(0.02, rel=0.3)


def test_fit_finds_a_slower_attention_over_a_cached_prefix():
    """One attention efficiency for fresh prompts and for chunks over a cached prefix could not time both (on
    this CPU with 2 threads a 128-token chunk over 2,048 cached tokens was fitted at 0.39 s, measured 0.48 s)."""
    truth = Efficiency(compute=0.45, attention=0.6, prefix_attention=0.15, memory=0.7, step_overhead_s=0.02,
                       seq_overhead_s=0.001, token_overhead_s=2e-5)
    pm = PerfModel(SMOL, CPU, 1, truth)
    chunks = [[(128, c, True)] for c in (256, 1024, 2048)] + [[(64, 448, True)], [(1, 900, True), (128, 1024, True)]]
    points = synthetic_points(truth) + [Point("prefill", b, pm.step(b).seconds) for b in chunks]
    eff, median, p90 = fit(SMOL, CPU, points)
    assert p90 < 0.05, (eff, median, p90)
    assert eff.prefix_attention is not None and eff.prefix_attention < 0.5 * eff.attention
    far = [(128, 3072, True)]  # beyond the points: the slope per cached token is what was fitted
    assert PerfModel(SMOL, CPU, 1, eff).step(far).seconds == pytest.approx(pm.step(far).seconds, rel=0.05)
    # Without such a chunk among the points, nothing says what the efficiency is: it stays attention's.
    fresh = [p for p in synthetic_points(truth) if all(n == 1 or c == 0 for n, c, _ in p.batch)]
    assert fit(SMOL, CPU, fresh)[0].prefix_attention is None


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0.1, 10.0), min_size=4, max_size=12), st.integers(0, 2), st.integers(0, 2**32 - 1))
def test_the_overheads_error_is_what_they_leave(weights, twin, seed):
    """For every active set the error credited is the residual of the overheads returned, also where two
    columns are one (every point one sequence: per-step and per-sequence overheads cannot be told apart)."""
    from splitserve.calibrate.fit import _overheads, _solvers

    rng = np.random.default_rng(seed)
    a = rng.uniform(0.5, 5.0, size=(len(weights), 3)) * np.array(weights)[:, None]
    a[:, (twin + 1) % 3] = a[:, twin]
    y = rng.normal(size=(8, len(weights)))
    err, x = _overheads(y, _solvers(a))
    assert np.all(x >= 0)
    assert np.allclose(err, ((x @ a.T - y) ** 2).sum(axis=1), atol=1e-9)


def test_refit_fits_a_calibrations_points_again_and_the_cli_writes_it(tmp_path, capsys):
    from splitserve.calibrate.fit import refit
    from splitserve.plan.cli import main

    truth = Efficiency(attention=0.6, prefix_attention=0.15)
    pm = PerfModel(SMOL, CPU, 1, truth)
    points = synthetic_points(truth) + [Point("prefill", [(128, c, True)], pm.step([(128, c, True)]).seconds) for c in (1024, 2048)]
    # As a version whose model had one attention efficiency saved it.
    old = Calibration(CPU, SMOL, Efficiency(attention=0.3), points, 0.2, 0.5, {"threads": 1})
    old.save(tmp_path / "old.json")
    new = refit(Calibration.load(tmp_path / "old.json"))
    assert new.efficiency.prefix_attention is not None and new.p90_rel_err < 0.1
    assert [p.seconds for p in new.points] == [p.seconds for p in points] and new.machine["threads"] == 1
    assert main(["calibrate", "--refit", str(tmp_path / "old.json"), "--out", str(tmp_path / "new.json")]) == 0
    assert "over a cached prefix" in capsys.readouterr().out
    assert Calibration.load(tmp_path / "new.json").efficiency == new.efficiency
    assert main(["calibrate", "--refit", str(tmp_path / "old.json"), "--base", str(tmp_path / "old.json")]) == 2
    assert "--base goes with --from-step-logs" in capsys.readouterr().err
    assert main(["calibrate", "--refit", str(tmp_path / "old.json"), "--from-step-logs", str(tmp_path)]) == 2
    assert "two sources of points" in capsys.readouterr().err
    assert main(["calibrate", "--refit", str(tmp_path / "missing.json")]) == 2
    assert "calibration file not found" in capsys.readouterr().err


def test_calibration_round_trips_through_json(tmp_path):
    points = synthetic_points(Efficiency())
    eff, med, p90 = fit(SMOL, CPU, points)
    cal = Calibration(CPU, SMOL, eff, points, med, p90, {"cpus": 2})
    path = tmp_path / "cal.json"
    cal.save(path)
    again = Calibration.load(path)
    assert again.perf().decode_step_time(8, 100) == pytest.approx(cal.perf().decode_step_time(8, 100))
    (tmp_path / "bad.json").write_text(json.dumps({"nope": 1}))
    with pytest.raises(PresetError, match="not a calibration file"):
        Calibration.load(tmp_path / "bad.json")
    with pytest.raises(PresetError, match="not found"):
        Calibration.load(tmp_path / "missing.json")


def test_profiling_runs_the_real_engine_over_the_grid(tmp_path):
    pytest.importorskip("transformers")
    from splitserve.calibrate.profile import Grid, profile_engine
    from splitserve.model.loader import load_model
    from splitserve.runtime.worker.engine import Engine, EngineConfig
    from tests.tiny_models import make_tiny_checkpoint

    loaded = load_model(make_tiny_checkpoint(tmp_path / "tiny"))
    engine = Engine(loaded, EngineConfig(max_num_seqs=16, num_blocks=256))
    grid = Grid(prefill=((1, 32, 0), (2, 16, 0), (1, 16, 32)), decode=((1, 20), (4, 40)), mixed=((2, 20, 16, 32),),
                decode_steps=2, repeats=2)
    points = profile_engine(engine, grid, loaded.config.vocab_size)
    assert [p.kind for p in points] == ["prefill"] * 3 + ["decode"] * 2 + ["prefill"]
    # A 16-token chunk over its 32 cached tokens, beside two decodes of 20-token prompts.
    chunk = [x for x in points[5].batch if x[0] > 1]
    assert chunk == [(16, 32, True)] and sorted(n for n, _, _ in points[5].batch) == [1, 1, 16]
    assert all(c > 20 for n, c, _ in points[5].batch if n == 1)
    assert points[0].batch == [(32, 0, True)]
    assert points[1].batch == [(16, 0, True), (16, 0, True)]
    assert points[2].batch == [(16, 32, True)]  # the cached prefix is not recomputed
    assert len(points[4].batch) == 4 and all(n == 1 for n, _, _ in points[4].batch)
    assert all(p.seconds > 0 for p in points)
    assert engine.pool.num_free_blocks == engine.pool.num_blocks  # the engine is left idle
    assert loaded.config.dtype_bytes == loaded.config.kv_dtype_bytes == 4  # the dtype it was loaded in
    eff, median, _ = fit(loaded.config, cpu_hardware(50e9, 10e9, 8e9, 1), points)
    assert median < 1.0


def test_a_calibration_is_read_without_torch(tmp_path):
    import subprocess
    import sys

    points = synthetic_points(Efficiency())
    eff, med, p90 = fit(SMOL, CPU, points)
    Calibration(CPU, SMOL, eff, points, med, p90).save(tmp_path / "cal.json")
    # A finder that refuses torch: the planner's reading of a calibration must not need it.
    code = (
        "import sys\n"
        "class NoTorch:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' or name.startswith('torch.'):\n"
        "            raise ImportError('torch is not importable here')\n"
        "sys.meta_path.insert(0, NoTorch())\n"
        "from splitserve.calibrate.table import Calibration\n"
        f"print(Calibration.load({str(tmp_path / 'cal.json')!r}).perf().decode_step_time(8, 100))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout) > 0


def test_calibration_waits_for_the_kernels_before_it_times_anything(tmp_path, monkeypatch):
    """The kernels build in the background: peaks and steps timed beside the compiler were a third and a tenth
    of their speed, so `calibrate` waits for the build first and says whether it timed them."""
    pytest.importorskip("transformers")
    import splitserve.calibrate.profile as profile
    from tests.tiny_models import make_tiny_checkpoint

    order: list[str] = []
    monkeypatch.setattr(profile.paged_kernel, "load", lambda timeout=None: order.append("kernels") or False)
    monkeypatch.setattr(profile, "measure_peaks", lambda threads, cpu_time=False: order.append("peaks") or (50e9, 10e9))
    real_profile = profile.profile_engine
    monkeypatch.setattr(profile, "profile_engine", lambda *a, **k: order.append("grid") or real_profile(*a, **k))
    cal = profile.calibrate(str(make_tiny_checkpoint(tmp_path / "tiny")), 1, quick=True)
    assert order == ["kernels", "peaks", "grid"]
    assert cal.machine["kernels"] is False


def test_a_decode_batch_whose_prompts_take_several_steps_to_prefill_is_still_timed(tmp_path):
    """Four 40-token prompts at a 32-token step budget prefill over five steps while the first ones decode:
    each must outlast that, or the batch never holds four decodes at once and the point is lost."""
    pytest.importorskip("transformers")
    from splitserve.calibrate.profile import Grid, profile_engine
    from splitserve.model.loader import load_model
    from splitserve.runtime.worker.engine import Engine, EngineConfig
    from tests.tiny_models import make_tiny_checkpoint

    loaded = load_model(make_tiny_checkpoint(tmp_path / "tiny"))
    engine = Engine(loaded, EngineConfig(max_num_seqs=16, num_blocks=256, max_num_batched_tokens=32))
    points = profile_engine(engine, Grid(prefill=(), decode=((4, 40),), decode_steps=2, repeats=1), loaded.config.vocab_size)
    assert len(points) == 1 and points[0].kind == "decode"
    assert len(points[0].batch) == 4 and all(n == 1 and c >= 40 for n, c, _ in points[0].batch)
    assert engine.pool.num_free_blocks == engine.pool.num_blocks


def test_a_grid_point_the_engine_cannot_run_is_reported_not_swallowed(tmp_path, caplog):
    """20 decodes at once on an engine that runs at most 16: no point, and a warning naming the one lost."""
    pytest.importorskip("transformers")
    from splitserve.calibrate.profile import Grid, profile_engine
    from splitserve.model.loader import load_model
    from splitserve.runtime.worker.engine import Engine, EngineConfig
    from tests.tiny_models import make_tiny_checkpoint

    loaded = load_model(make_tiny_checkpoint(tmp_path / "tiny"))
    engine = Engine(loaded, EngineConfig(max_num_seqs=16, num_blocks=256))
    with caplog.at_level("WARNING", logger="splitserve.calibrate.profile"):
        points = profile_engine(engine, Grid(prefill=(), decode=((20, 8),), decode_steps=2, repeats=1), loaded.config.vocab_size)
    assert points == []
    assert "20 decodes of 8-token contexts" in caplog.text
    assert engine.pool.num_free_blocks == engine.pool.num_blocks
