"""A calibration fitted to served steps (`splitserve plan calibrate --from-step-logs`): the step logs'
steps grouped by shape, each group's median step a point, the fit then times served steps as they ran."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from splitserve.calibrate.fit import fit
from splitserve.calibrate.from_steps import MAX_POINTS, calibrate_from_steps, points_from_steps, shape
from splitserve.calibrate.table import Calibration, Point, cpu_hardware
from splitserve.plan.cli import main
from splitserve.sim.models import model
from splitserve.sim.perf import Efficiency, PerfModel

SMOL = model("smollm2-135m").with_dtype(4)
CPU = cpu_hardware(100e9, 20e9, 16e9, 2)
ALONE = Efficiency(compute=0.45, attention=0.2, memory=0.7, step_overhead_s=0.005, seq_overhead_s=0.0005, token_overhead_s=1e-5)
# Served: every kernel a third slower and more per-step overhead (the frontend's turns on the cores).
SERVED = Efficiency(compute=0.3, attention=0.13, memory=0.47, step_overhead_s=0.012, seq_overhead_s=0.0005, token_overhead_s=1e-5)


def _base() -> Calibration:
    pm = PerfModel(SMOL, CPU, 1, ALONE)
    batches = [[(n, c, True)] for n, c in ((16, 0), (128, 0), (512, 0), (1024, 0), (128, 512))]
    batches += [[(1, c, True)] * b for b in (1, 4, 16) for c in (64, 512)]
    points = [Point("prefill" if b[0][0] > 1 else "decode", b, pm.step(b).seconds) for b in batches]
    eff, med, p90 = fit(SMOL, CPU, points)
    return Calibration(CPU, SMOL, eff, points, med, p90, {"threads": 2, "clock": "wall"})


def _served_batches(rng: random.Random) -> list[list[tuple[int, int, bool]]]:
    """What a chunked worker runs: 128-token chunks over a growing prefix beside a few decodes, and decodes."""
    out = []
    for _ in range(400):
        decodes = [(1, rng.randint(600, 1400), True) for _ in range(rng.randint(1, 6))]
        if rng.random() < 0.3:
            ctx = rng.choice((0, 128, 256, 512, 768, 1024))
            out.append([(128, ctx, ctx + 128 >= 1024)] + decodes)
        else:
            out.append(decodes)
    return out


def _write_log(path: Path, role: str, steps: list[tuple[list, float]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [{"role": role, "pid": 1, "clock": "unix"}]
    lines += [{"t": 1e9 + i, "s": s, "b": [[n, c, int(x)] for n, c, x in b]} for i, (b, s) in enumerate(steps)]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))


def _served_log(tmp_path: Path, seed: int = 0) -> Path:
    rng = random.Random(seed)
    served = PerfModel(SMOL, CPU, 1, SERVED)
    steps = [(b, served.step(b).seconds * rng.uniform(0.95, 1.05)) for b in _served_batches(rng)]
    _write_log(tmp_path / "steps" / "steps-colocated-1.jsonl", "colocated", steps)
    return tmp_path / "steps"


def _rel_errors(cal: Calibration, steps: list[tuple[list, float]]) -> list[float]:
    pm = cal.perf()
    return sorted(abs(pm.step(b).seconds - s) / s for b, s in steps)


def test_a_fit_to_served_steps_times_them_as_they_ran_where_the_profiled_one_does_not(tmp_path):
    base = _base()
    refit = calibrate_from_steps(base, [_served_log(tmp_path)])
    # Held-out served steps (another draw): the refit times them within a few %, the profiled one far under.
    rng = random.Random(1)
    served = PerfModel(SMOL, CPU, 1, SERVED)
    held_out = [(b, served.step(b).seconds) for b in _served_batches(rng)]
    refit_err, base_err = _rel_errors(refit, held_out), _rel_errors(base, held_out)
    assert refit_err[len(refit_err) * 9 // 10] < 0.10
    assert base_err[len(base_err) // 2] > 0.25
    assert refit.hardware == base.hardware and refit.model == base.model
    assert refit.machine["clock"] == "served wall time (step logs)" and refit.machine["steps"] == 400
    assert refit.machine["base_efficiency"]["compute"] == base.efficiency.compute
    again = tmp_path / "refit.json"
    refit.save(again)
    assert Calibration.load(again).efficiency == refit.efficiency


def test_steps_are_grouped_by_shape_and_each_group_gives_its_median_step():
    a, b = [(1, 700, True)] * 4, [(1, 900, True)] * 4  # 4 decodes, context 2,800 and 3,600: one group
    assert shape(a) == shape(b) == ("decode", 3, 3, 6)
    assert shape([(128, 0, False), (1, 700, True)])[0] == "prefill"
    steps = [(a, 0.05), (b, 0.07), (a, 0.06), ([(1, 64, True)], 0.02)]
    points = points_from_steps(steps, min_steps=3)
    assert len(points) == 1  # the single decode at context 64 is seen once: no point
    assert points[0].kind == "decode" and points[0].seconds == 0.06 and points[0].batch == a
    many = [([(2**nb, 64 * 2**k, True)] * m, 0.01) for m in (1, 2, 4, 8, 16, 32) for nb in range(1, 11)
            for k in range(12) for _ in range(3)]  # 720 shapes, each seen 3 times
    assert len(points_from_steps(many)) == MAX_POINTS


def test_too_few_or_one_kind_of_steps_is_refused_with_the_reason(tmp_path):
    base = _base()
    with pytest.raises(ValueError, match="no step log at"):
        calibrate_from_steps(base, [tmp_path / "nothing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no steps-"):
        calibrate_from_steps(base, [tmp_path / "empty"])
    decodes = [([(1, 100 * k, True)] * k, 0.01 * k) for k in range(1, 9) for _ in range(3)]
    _write_log(tmp_path / "d" / "steps-decode-1.jsonl", "decode", decodes)
    with pytest.raises(ValueError, match="needs prefill and decode steps"):
        calibrate_from_steps(base, [tmp_path / "d"])


def test_the_cli_fits_from_step_logs_and_refuses_a_half_given_request(tmp_path, capsys):
    base = tmp_path / "cal-2t.json"
    _base().save(base)
    logs = _served_log(tmp_path)
    out = tmp_path / "served.json"
    assert main(["calibrate", "--from-step-logs", str(logs), "--base", str(base), "--out", str(out)]) == 0
    assert "step-time error over" in capsys.readouterr().out
    assert Calibration.load(out).machine["step_logs"] == [str(logs / "steps-colocated-1.jsonl")]
    assert main(["calibrate", "--from-step-logs", str(logs), "--out", str(out)]) == 2
    assert "--from-step-logs needs --base" in capsys.readouterr().err
    assert main(["calibrate", "--base", str(base), "--out", str(out)]) == 2
    assert "--base goes with --from-step-logs" in capsys.readouterr().err
    assert main(["calibrate", "--from-step-logs", str(tmp_path / "nope"), "--base", str(base)]) == 2
    assert "cannot calibrate from step logs: no step log at" in capsys.readouterr().err
