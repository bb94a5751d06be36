"""Every engine step lands in the step log with its batch; a failing observer never fails a step."""

from __future__ import annotations

import time

import pytest

from splitserve.core.request import SamplingParams
from splitserve.model.loader import load_model
from splitserve.runtime.worker.engine import Engine, EngineConfig
from splitserve.runtime.worker.step_log import StepLog, read_step_log
from tests.tiny_models import make_tiny_checkpoint


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return Engine(load_model(make_tiny_checkpoint(tmp_path_factory.mktemp("steplog"))), EngineConfig(num_blocks=64))


def test_every_step_is_logged_with_its_batch(engine, tmp_path):
    log = StepLog(tmp_path, "colocated")
    engine.step_observers.append(log.observe)
    try:
        params = SamplingParams(max_tokens=3, ignore_eos=True)
        engine.add_request("a", list(range(3, 23)), params, time.monotonic())
        engine.add_request("b", list(range(3, 8)), params, time.monotonic())
        before = time.time()
        steps = 0
        while engine.has_work():
            engine.step(time.monotonic())
            steps += 1
    finally:
        engine.step_observers.remove(log.observe)
    header, logged = read_step_log(log.path)
    assert header["role"] == "colocated" and log.path.name.startswith("steps-colocated-")
    assert len(logged) == steps == 3
    # The prompts (20 and 5 new tokens, nothing cached) in one step, then one token each per decode step.
    assert sorted(logged[0]["b"]) == [[5, 0, 1], [20, 0, 1]]
    assert sorted(logged[1]["b"]) == [[1, 5, 1], [1, 20, 1]]
    assert all(s["s"] > 0 and s["t"] >= before - 1 for s in logged)
    assert logged[0]["t"] <= logged[1]["t"] <= logged[2]["t"]


def test_a_last_line_cut_by_a_killed_writer_is_left_out_and_any_other_damage_is_an_error(tmp_path):
    log = StepLog(tmp_path, "decode")
    log.observe(type("Out", (), {"seqs": []})(), 0.05)
    whole = log.path.read_bytes()
    log.path.write_bytes(whole + b'{"t": 1795046400.1, "s": 0.0')  # killed mid-write
    header, steps = read_step_log(log.path)
    assert header["role"] == "decode" and len(steps) == 1
    first, rest = whole.split(b"\n", 1)
    log.path.write_bytes(first + b"\n" + b'{"t": 1.0, "s"\n' + rest)  # damage before the end
    with pytest.raises(ValueError, match="line 2"):
        read_step_log(log.path)


def test_a_failing_observer_does_not_fail_the_step(engine):
    def broken(out, seconds):
        raise RuntimeError("observer bug")

    engine.step_observers.append(broken)
    try:
        engine.add_request("c", list(range(3, 13)), SamplingParams(max_tokens=2, ignore_eos=True), time.monotonic())
        outputs = []
        while engine.has_work():
            outputs += engine.step(time.monotonic())
    finally:
        engine.step_observers.remove(broken)
    assert sum(len(o.new_token_ids) for o in outputs) == 2
    assert outputs[-1].finished and outputs[-1].finish_reason == "length"


def test_a_file_that_is_not_a_step_log_is_refused(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_text('{"t": 1}\n')
    with pytest.raises(ValueError, match="not a splitserve step log"):
        read_step_log(f)


def test_serve_hands_the_step_log_dir_to_its_workers(tmp_path):
    from splitserve.cli import build_parser
    from splitserve.runtime.config import engine_argv

    args = build_parser().parse_args(["serve", "--prefill", "1", "--decode", "1", "--step-log-dir", str(tmp_path)])
    argv = engine_argv(args)
    assert argv[argv.index("--step-log-dir") + 1] == str(tmp_path)


def test_an_unwritable_step_log_dir_is_a_clear_startup_error(tmp_path, caplog):
    from splitserve.cli import main

    taken = tmp_path / "a-file"
    taken.write_text("")
    checkpoint = make_tiny_checkpoint(tmp_path / "tiny")
    assert main(["serve", "--in-process", "--model", str(checkpoint), "--step-log-dir", str(taken)]) == 2
    assert "cannot start" in caplog.text and "a-file" in caplog.text
