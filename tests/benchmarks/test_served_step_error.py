"""benchmarks.served_step_error: how far a calibration times the steps a worker served, and a clear
message for arguments it cannot use."""

from __future__ import annotations

import pytest

from benchmarks.served_step_error import main, step_errors
from splitserve.calibrate.from_steps import calibrate_from_steps
from tests.sim.test_calibrate_from_steps import _base, _served_log


def test_a_profiled_calibration_times_served_steps_short_and_a_refit_one_does_not(tmp_path):
    steps = _served_log(tmp_path)  # served with every kernel a third slower than the base was profiled
    base = _base()
    errs = step_errors(steps, {"base": base, "refit": calibrate_from_steps(base, [steps])})
    for kind in ("prefill", "decode"):
        signed, absolute = errs["base"][kind]
        assert signed < -0.15 and absolute == pytest.approx(-signed)
        assert abs(errs["refit"][kind][0]) < 0.1


def test_the_command_reports_every_two_thread_sweep(tmp_path, capsys):
    _served_log(tmp_path / "out" / "mixed" / "chunked")
    cal = tmp_path / "cal.json"
    _base().save(cal)
    main([str(tmp_path / "out"), f"old={cal}"])
    line = capsys.readouterr().out.strip()
    assert line.startswith("mixed chunked {") and '"old"' in line


@pytest.mark.parametrize("argv, says", [
    (["{out}", "no-equals-sign"], "expected NAME=FILE"),
    (["{out}", "old={out}/missing.json"], "calibration file not found"),
    (["{out}/nowhere", "old=x.json"], "not a folder"),
])
def test_bad_arguments_get_one_line_naming_them(tmp_path, argv, says):
    with pytest.raises(SystemExit) as e:
        main([a.format(out=tmp_path) for a in argv])
    assert says in str(e.value)
