"""The pure part of benchmarks.sim_accuracy: how fast the workers really ran, from their step logs."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from benchmarks.sim_accuracy import Speeds, StepSpeed, busy_ahead


class FlatModel:
    """Every step modelled at 10 ms per new token."""

    def step(self, seqs):
        return SimpleNamespace(seconds=0.01 * sum(n for n, _, _ in seqs))


def write_log(path, role: str, steps: list[tuple[float, float, int]]) -> None:
    lines = [{"role": role, "pid": 1, "clock": "unix"}] + [{"t": t, "s": s, "b": [[n, 0, 1]]} for t, s, n in steps]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))


T0 = 1000.0


@pytest.fixture
def speed(tmp_path):
    # Decode: 10 steps alone at the model's speed (10 ms each), then 10 at 1.5x while a prefill computes.
    decode = [(T0 + i, 0.01, 1) for i in range(10)] + [(T0 + 20 + 0.02 * i, 0.015, 1) for i in range(10)]
    # Prefill: one 30-token step (0.3 s modelled) over the second group of decode steps, taking 0.36 s;
    # one more after the span.
    prefill = [(T0 + 19.99, 0.36, 30), (T0 + 99, 5.0, 10)]
    write_log(tmp_path / "steps-decode-2.jsonl", "decode", decode)
    write_log(tmp_path / "steps-prefill-1.jsonl", "prefill", prefill)
    return StepSpeed(tmp_path, FlatModel())


def test_each_step_knows_its_kind_and_how_much_of_it_a_neighbour_computed(speed):
    steps = speed.steps(T0, T0 + 50)  # the prefill at T0 + 99 belongs to another run
    assert [k for k, _, _, _ in steps["decode"]] == ["decode"] * 20
    assert [shared for _, _, _, shared in steps["decode"]] == pytest.approx([0.0] * 10 + [1.0] * 10)
    assert steps["prefill"] == [("prefill", 0.36, pytest.approx(0.3), pytest.approx(0.15 / 0.36))]


def test_speed_alone_and_beside_a_neighbour(speed):
    s = speed.speeds(T0, T0 + 50)
    assert s.run["decode"] == pytest.approx(0.25 / 0.2) and s.run["prefill"] == pytest.approx(1.2)
    assert s.by_kind == pytest.approx({"decode/decode": 1.25})  # one prefill step: too few for a kind's speed
    assert s.alone == pytest.approx({"decode/decode": 1.0}) and s.beside == pytest.approx({"decode/decode": 1.5})


def test_a_worker_idle_over_the_span_has_no_speed(speed):
    s = speed.speeds(T0, T0 + 15)  # only the first decode steps: the prefill worker logged nothing here
    assert set(s.run) == {"decode"} and s.run["decode"] == pytest.approx(1.0)


def step(*new_tokens: int):
    return SimpleNamespace(seqs=[SimpleNamespace(num_new_tokens=n) for n in new_tokens])


def worker(role: str, running: tuple[tuple[int, int, int], ...] = ()):
    """A simulated worker's state as step_time reads it; `running`: (prompt, generated, max_tokens) each."""
    load = SimpleNamespace(running=len(running), running_tokens=sum(p + g for p, g, _ in running),
                           most_tokens_owed=max((m - g for _, g, m in running), default=0))
    perf = SimpleNamespace(decode_step_time=lambda batch, ctx: 0.001 * batch + 1e-5 * ctx)
    return SimpleNamespace(role=role, busy=False, step_start=0.0, step_seconds=0.0, sched=SimpleNamespace(load=lambda: load), perf=perf)


def test_busy_ahead_counts_the_step_in_flight_and_the_tokens_still_owed():
    w = worker("decode", running=((90, 2, 6), (10, 0, 3)))  # 4 tokens still owed by the first
    assert busy_ahead(w, 0.0) == pytest.approx(4 * (0.002 + 1e-5 * 51))
    w.busy, w.step_start, w.step_seconds = True, 1.0, 0.5
    assert busy_ahead(w, 1.2) == pytest.approx(0.3 + 4 * (0.002 + 1e-5 * 51))
    assert busy_ahead(worker("prefill"), 0.0) == 0.0


def test_step_time_follows_the_step_kind_and_the_simulated_neighbour():
    s = Speeds(run={"decode": 1.25, "prefill": 1.2}, by_kind={"decode/decode": 1.25, "decode/prefill": 1.1},
               alone={"decode/decode": 1.0}, beside={"decode/decode": 1.5})
    decode, prefill = worker("decode"), worker("prefill")
    step_time = s.neighbour(SimpleNamespace(workers=[decode, prefill]))
    assert step_time(decode, 5.0, step(1, 1), 0.04) == pytest.approx(0.04)
    prefill.busy, prefill.step_start, prefill.step_seconds = True, 4.0, 1.02  # computing until 5.02
    assert step_time(decode, 5.0, step(1, 1), 0.04) == pytest.approx(0.04 * 1.25)  # beside it for half the step
    assert step_time(decode, 4.5, step(1), 0.04) == pytest.approx(0.04 * 1.5)
    assert step_time(decode, 4.5, step(1, 9), 0.2) == pytest.approx(0.2 * 1.1)  # a local prefill: no line
    assert step_time(prefill, 4.0, step(64), 1.0) == pytest.approx(1.2)  # nothing of its kind: the role's
    assert s.single()(decode, 0.0, step(1), 0.04) == pytest.approx(0.05)
    assert s.single()(SimpleNamespace(role="colocated"), 0.0, step(1), 0.1) == pytest.approx(0.1)
