"""The pure parts of benchmarks.interference (issue 19): the workloads, the deployments' flags, the latency
figures, the wall-time estimate, the measured-vs-predicted table and headline, and the planner's prediction
on this repository's calibration (simulation only, a few seconds)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from benchmarks.interference_measure import serve_args
from benchmarks.interference_report import (
    attainment_by_gap,
    band_holds,
    estimate_s,
    goodput_rejudged,
    headline,
    latency_figures,
    planned_rates,
    prediction_holds,
    table,
)
from benchmarks.interference_speed import (
    MIN_MODELLED_S,
    held_out_calibrations,
    held_out_speed,
    speed_by_workload,
    step_sums,
    workload_sums,
)
from benchmarks.interference_stall import classify, stall_breakdown
from benchmarks.interference_workloads import DEFAULT_SLO, cases
from splitserve.bench.results import Run
from splitserve.calibrate.table import Calibration
from splitserve.plan.local_deployments import (
    DEPLOYMENTS,
    Machine,
    cluster,
    serving_step_time,
    simulated_attainment,
    speed_key,
    within_spread,
)
from splitserve.workload.record import RequestRecord
from splitserve.workload.slo import SLO, summarize
from tests.bench.conftest import AZURE, MOONCAKE

CALIBRATION = Path(__file__).resolve().parents[2] / "results" / "sim_accuracy" / "calibration.json"


@pytest.fixture(scope="module")
def every(tmp_path_factory):
    return cases(tmp_path_factory.mktemp("wl"), 24)


def test_every_deployment_has_flags_on_the_same_two_cores():
    for d in DEPLOYMENTS:
        flags = serve_args(d, 128)
        threads = int(flags[flags.index("--threads") + 1])
        workers = sum(int(flags[flags.index(f) + 1]) for f in ("--colocated", "--prefill", "--decode") if f in flags)
        assert threads * workers == 2, d
    assert "--no-conditional" in serve_args("1p1d", 128) and "--no-conditional" not in serve_args("1p1d_conditional", 128)
    with pytest.raises(ValueError):
        serve_args("2p2d", 128)


TRACE_WORKLOADS = {"mooncake", "azure_code"}  # read from ../shared/traces, which a clean clone lacks


@pytest.mark.parametrize("name", ["prompt_heavy", "mooncake", "azure_code", "short_prompts", "mixed"])
def test_each_workload_decodes_and_is_the_same_requests_for_the_same_run(every, name):
    assert set(every) == {"prompt_heavy", "mooncake", "azure_code", "short_prompts", "mixed"}
    if name in TRACE_WORKLOADS and not (MOONCAKE.is_file() and AZURE.is_file()):
        pytest.skip(f"shared traces not found beside the repository ({MOONCAKE.parent})")
    case = every[name]
    w = case.requests(case.rate_lo, 0)
    assert len(w.requests) == max(24, case.min_requests) == case.num_requests
    assert [r.input_len for r in w.requests] == [r.input_len for r in case.requests(case.rate_lo, 0).requests]
    assert w.mean_rate == pytest.approx(case.rate_lo, rel=0.5)
    outputs = [r.output_len for r in w.requests]
    assert np.mean(outputs) >= 16, f"{name}: answers too short to decode"


def test_a_run_may_last_until_its_slowest_trials_last_request_has_drained(every):
    case = every["prompt_heavy"]
    last = [case.requests(case.rate_lo, t).requests[-1].arrival_s for t in range(3)]
    assert case.deadline_s(3, 60.0) == pytest.approx(max(last) + 60.0)
    # The case this guards: a Poisson trial whose requests spread past requests / rate (24 at 0.1 req/s).
    assert max(last) > 24 / case.rate_lo


def test_the_synthetic_workloads_have_the_shapes_they_are_named_for(every):
    heavy = every["prompt_heavy"].requests(0.2, 0).requests
    assert np.mean([r.input_len for r in heavy]) > 700 and {r.output_len for r in heavy} == {128}
    short = every["short_prompts"].requests(1.0, 0).requests
    assert max(r.input_len for r in short) < 300
    mixed = [r.input_len for r in every["mixed"].requests(1.0, 0).requests]
    assert min(mixed) < 200 and max(mixed) > 800  # bimodal: both kinds in the first 24
    assert sum(c.seed_like for c in every.values()) == 1


def _record(i: int, times: list[float]) -> RequestRecord:
    return RequestRecord(i, 0.0, 100, len(times), sent_s=0.0, first_token_s=times[0], token_times_s=times,
                         end_s=times[-1], completion_tokens=len(times), status=200)


def test_latency_figures_are_medians_over_runs_with_their_spread_and_gaps_in_decode_steps():
    run_a = [_record(0, [1.0, 1.1, 1.2, 2.2]), _record(1, [2.0, 2.1, 2.2, 2.3])]
    run_b = [_record(0, [3.0, 3.1, 3.2, 3.3])]
    f = latency_figures([run_a, run_b], decode_step_s=0.1)
    assert f["worst_gap_max_s"] == pytest.approx((1.0 + 0.1) / 2)  # runs: 1.0 and 0.1
    assert f["worst_gap_max_s_spread"] == pytest.approx([0.1, 1.0])
    assert f["worst_gap_max_steps"] == pytest.approx(5.5)
    assert f["ttft_p50_s"] == pytest.approx((1.5 + 3.0) / 2)


def test_the_same_runs_are_judged_again_at_each_stall_bound():
    smooth = _record(0, [1.0, 1.1, 1.2, 1.3])  # worst gap 0.1 s
    stalled = _record(1, [1.0, 1.1, 1.7, 1.8])  # worst gap 0.6 s
    slow = _record(2, [9.0, 9.1])  # first token past the 8 s TTFT: fails at any stall bound
    runs = {"1p1d": [[smooth, smooth, slow]], "colocated": [[smooth, stalled, slow], [smooth, stalled, smooth]]}
    got = attainment_by_gap(runs, SLO(ttft_s=8.0, max_gap_s=0.5), bounds=(0.15, 1.0))
    assert got["1p1d"] == {"0.15": pytest.approx(2 / 3), "1": pytest.approx(2 / 3)}
    # colocated: runs at 0.15 s give 1/3 and 2/3 (median 0.5); at 1 s, 2/3 and 1.
    assert got["colocated"] == {"0.15": pytest.approx(0.5), "1": pytest.approx(5 / 6)}


def test_a_sweeps_runs_judged_at_a_stricter_stall_bound_give_its_goodput_there():
    smooth = _record(0, [1.0, 1.1, 1.2, 1.3])  # worst gap 0.1 s
    stalled = _record(1, [1.0, 1.1, 1.5, 1.6])  # worst gap 0.4 s: within 0.5 s, not within 0.25 s
    late = _record(2, [9.0, 9.1])  # past the 8 s TTFT
    runs = {0.2: [[smooth, smooth]] * 3, 1.0: [[smooth, stalled]] * 3, 2.0: [[late, stalled]] * 3}
    assert goodput_rejudged(runs, SLO(ttft_s=8.0, max_gap_s=0.5), 0.9) == (1.0, 2.0)
    assert goodput_rejudged(runs, SLO(ttft_s=8.0, max_gap_s=0.25), 0.9) == (0.2, 1.0)
    assert goodput_rejudged({0.2: [[late]]}, SLO(ttft_s=8.0), 0.9) == (0.0, 0.2)
    assert goodput_rejudged({0.2: [[smooth]], 1.0: [[smooth]]}, SLO(ttft_s=8.0), 0.9) == (1.0, None)


def test_the_estimate_counts_every_run_of_every_sweep():
    assert planned_rates(0.5, 1.5, 0.25) == [0.5, 1.5, 1.0, 1.0]
    one = estimate_s({"w": (0.5, 1.5, 0.25, 10)}, 1, 1)
    assert estimate_s({"w": (0.5, 1.5, 0.25, 10)}, 2, 3) == pytest.approx(2 * (3 * (one - 30.0) + 30.0))
    assert estimate_s({"w": (0.5, 1.5, 0.25, 20)}, 1, 1) > one


def test_the_table_and_headline_judge_the_planner_by_the_measured_spread():
    measured = {"heavy": {"colocated": (0.0, 0.1), "1p1d": (0.3, 0.4), "1p1d_conditional": (0.2, 0.35)},
                "short": {"colocated": (2.0, None), "1p1d": (1.0, 1.5)}}
    predicted = {"heavy": {"colocated": 0.05, "1p1d": 0.25, "1p1d_conditional": 0.33}, "short": {"colocated": 1.0, "1p1d": 1.2}}
    rows = table(measured, predicted)
    by = {(r["workload"], r["deployment"]): r for r in rows}
    assert by["heavy", "1p1d"]["measured_winner"] == "1p1d" and by["heavy", "1p1d"]["predicted_winner"] == "1p1d_conditional"
    assert by["heavy", "1p1d"]["agrees"]  # conditional failed at 0.35, above 1p1d's 0.3: within the spread
    assert not by["short", "1p1d"]["agrees"]  # 1p1d failed at 1.5, below colocated's 2.0
    assert by["heavy", "1p1d"]["error"] == pytest.approx(-1 / 6)
    lat = {"heavy": {"1p1d": {"itl_p99_s": 0.2}, "colocated": {"itl_p99_s": 2.0}}}
    head = headline(rows, lat, "heavy")
    assert head["planner_winner_agreement"] == 0.5
    # Cells both passed: heavy 1p1d 0.25/0.3, conditional 0.33/0.2, short colocated 1.0/2.0, 1p1d 1.2/1.0.
    logs = [math.log(0.3 / 0.25), math.log(0.33 / 0.2), math.log(2.0), math.log(1.2)]
    assert head["prediction_log_error"] == pytest.approx(sum(logs) / 4) and head["prediction_log_error_cells"] == 4
    assert head["prediction_pass_mismatches"] == 1  # heavy colocated: 0.05 predicted, nothing passed
    assert head["split_stall_ratio_vs_colocated"] == pytest.approx(0.1)
    assert head["best_split_goodput_ratio"] is None and "best_split_goodput_ratio_note" in head
    mixed = table({"mixed": {"colocated": (0.4, 0.6), "1p1d": (0.6, 0.8), "1p1d_conditional": (0.8, 1.0)}}, {})
    assert headline(mixed, {}, None)["conditional_wins_mixed"]
    nothing = table({"heavy": {"colocated": (0.0, 0.1), "1p1d": (0.0, 0.1)}}, {"heavy": {"colocated": 0.0, "1p1d": 0.2}})
    assert nothing[0]["agrees"] is None and headline(nothing, {}, None)["planner_winner_agreement"] is None
    assert not within_spread({"a": (1.0, 1.2), "b": (0.5, 0.9)}, "b") and within_spread({"a": (1.0, 1.2), "b": (0.5, None)}, "b")
    # A prediction holds within 15 % of the highest rate passed, or inside the measured bracket.
    assert by["heavy", "1p1d"]["prediction_holds"] is False  # 0.25 against (0.3, 0.4): 17 % low
    assert by["heavy", "1p1d_conditional"]["prediction_holds"]  # 0.33 inside (0.2, 0.35)
    assert by["heavy", "colocated"]["prediction_holds"]  # 0.05: below 0.1, the lowest rate, which failed
    assert by["short", "colocated"]["prediction_holds"] is False  # 1.0 where 2.0 passed
    assert head["predictions_holding"] == "3 of 5"


@pytest.mark.parametrize("predicted, lo, hi, holds", [
    (1.0, 1.0, 1.5, True), (1.14, 1.0, 1.1, True), (1.16, 1.0, 1.1, False), (0.86, 1.0, 1.5, True),
    (0.84, 1.0, 1.5, False), (1.4, 1.0, 1.5, True), (3.0, 2.0, None, True), (0.0, 0.0, 0.1, True), (0.1, 0.0, 0.1, False),
])
def test_a_prediction_holds_within_15_percent_or_inside_the_measured_bracket(predicted, lo, hi, holds):
    assert prediction_holds(predicted, lo, hi) is holds


@pytest.mark.parametrize("slower, faster, lo, hi, holds", [
    (0.8, 1.2, 1.0, 1.5, True), (0.5, 0.8, 1.0, 1.5, False), (0.5, 0.86, 1.0, 1.5, True),  # reaches 15 % below lo
    (1.6, 2.0, 1.0, 1.5, False), (1.1, 2.0, 1.0, 1.5, True), (3.0, 4.0, 2.0, None, True),
    (0.0, 0.2, 0.0, 0.1, True), (0.1, 0.2, 0.0, 0.1, False),  # nothing passed: only a band reaching 0 holds
])
def test_a_band_holds_when_some_goodput_in_it_would(slower, faster, lo, hi, holds):
    assert band_holds(slower, faster, lo, hi) is holds
    if holds:  # and then some goodput in it does hold on its own
        assert any(prediction_holds(slower + (faster - slower) * k / 100, lo, hi) for k in range(101))


def test_the_headline_counts_robust_picks_and_winners_among_the_contenders():
    measured = {"heavy": {"chunked": (0.3, 0.4), "1p1d": (0.1, 0.2)}, "short": {"chunked": (1.0, 1.5), "1p1d": (2.0, None)},
                "none": {"chunked": (0.0, 0.1), "1p1d": (0.0, 0.1)}}
    predicted = {"heavy": {"chunked": 0.3, "1p1d": 0.1}, "short": {"chunked": 2.0, "1p1d": 1.8}, "none": {"chunked": 0.0, "1p1d": 0.0}}
    band = {"heavy": {"chunked": (0.2, 0.35), "1p1d": (0.05, 0.15)}, "short": {"chunked": (1.6, 2.2), "1p1d": (1.7, 2.4)},
            "none": {"chunked": (0.0, 0.1), "1p1d": (0.0, 0.0)}}
    picks = {"heavy": {"robust": True, "contenders": ["chunked"]}, "short": {"robust": False, "contenders": ["chunked", "1p1d"]},
             "none": {"robust": True, "contenders": []}}
    rows = table(measured, predicted, band)
    by = {(r["workload"], r["deployment"]): r for r in rows}
    assert by["short", "chunked"]["predicted_band"] == [1.6, 2.2] and by["short", "chunked"]["band_holds"] is False
    assert by["short", "1p1d"]["band_holds"] and by["heavy", "chunked"]["band_holds"]
    head = headline(rows, {}, None, picks)
    assert head["planner_winner_agreement"] == 0.5  # short: chunked picked, 1p1d measured
    assert head["robust_picks"] == "1 of 2"  # "none" judged no winner: not counted
    assert head["planner_contender_agreement"] == 1.0  # short's contenders name 1p1d
    assert head["predictions_holding_in_band"] == "5 of 6"


def _step_log(path: Path, role: str, steps: list[tuple[float, list[list[int]]]]) -> None:
    lines = [{"role": role, "pid": 1, "clock": "unix"}] + [{"t": 1e9 + i, "s": s, "b": b} for i, (s, b) in enumerate(steps)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))


def test_the_serving_speed_of_a_workload_comes_only_from_the_other_workloads_step_logs(tmp_path):
    cal = Calibration.load(CALIBRATION)
    machine = Machine(cal, cal, link_bw=2e9)
    perf = cal.perf()
    decode, prefill = [[1, 500, 1]] * 8, [[512, 0, 1]]
    t_dec, t_pre = perf.step([(1, 500, True)] * 8).seconds, perf.step([(512, 0, True)]).seconds
    # Enough steps of each kind for the modelled time to pass MIN_MODELLED_S.
    n_dec, n_pre = math.ceil(2 * MIN_MODELLED_S / t_dec), math.ceil(2 * MIN_MODELLED_S / t_pre)
    # Workload "a": decode steps at 1.2x the model, prefills at 1.5x; workload "b": 1.1x and 1.3x.
    _step_log(tmp_path / "a" / "1p1d" / "steps" / "steps-decode-1.jsonl", "decode", [(1.2 * t_dec, decode)] * n_dec)
    _step_log(tmp_path / "a" / "1p1d" / "steps" / "steps-prefill-2.jsonl", "prefill", [(1.5 * t_pre, prefill)] * n_pre)
    _step_log(tmp_path / "b" / "1p1d" / "steps" / "steps-decode-3.jsonl", "decode", [(1.1 * t_dec, decode)] * n_dec)
    _step_log(tmp_path / "b" / "1p1d" / "steps" / "steps-prefill-4.jsonl", "prefill", [(1.3 * t_pre, prefill)] * n_pre)
    got = step_sums(tmp_path / "a" / "1p1d" / "steps", "1p1d", machine)
    assert got[speed_key("1p1d", "decode", "decode")][0] == pytest.approx(n_dec * 1.2 * t_dec)
    sums = workload_sums(tmp_path, ["a", "b", "c"], DEPLOYMENTS, machine)
    assert set(sums) == {"a", "b"}  # "c" kept no sweep
    assert speed_by_workload(sums)["a"][speed_key("1p1d", "prefill", "prefill")] == pytest.approx(1.5)
    for_a, for_c = held_out_speed(sums, "a"), held_out_speed(sums, "c")
    assert for_a[speed_key("1p1d", "decode", "decode")] == pytest.approx(1.1)  # b's only: a's own runs never count
    assert for_a[speed_key("1p1d", "prefill", "prefill")] == pytest.approx(1.3)
    assert for_c[speed_key("1p1d", "decode", "decode")] == pytest.approx(1.15, abs=1e-3)  # pooled by time
    # The simulator runs the deployment's steps at that speed: a slower machine serves fewer within the SLO.
    served = Machine(cal, cal, link_bw=2e9, serving_speed={speed_key("1p1d", "decode", "decode"): 3.0,
                                                           speed_key("1p1d", "prefill", "prefill"): 3.0})
    assert serving_step_time(machine, "1p1d") is None and serving_step_time(served, "colocated") is None
    requests = cases(tmp_path, 20)["prompt_heavy"].requests(0.3, 0).requests
    assert simulated_attainment(served, "1p1d", requests, DEFAULT_SLO) < simulated_attainment(machine, "1p1d", requests, DEFAULT_SLO)


def test_a_workloads_served_calibrations_are_fitted_to_the_other_workloads_steps_only(tmp_path):
    cal = Calibration.load(CALIBRATION)
    machine = Machine(cal, cal, link_bw=2e9)
    perf = cal.perf()
    shapes = [[[128, c, 0]] + [[1, 800, 1]] * d for c in (0, 256, 512, 1024) for d in (0, 1, 2, 4)]
    shapes += [[[1, c, 1]] * b for b in (1, 2, 4, 8) for c in (300, 900)]
    for w, slow in (("a", 1.3), ("b", 1.6)):  # 2-thread steps served 1.3x the model on "a", 1.6x on "b"
        steps = [(slow * perf.step([tuple(x) for x in b]).seconds, b) for b in shapes for _ in range(3)]
        _step_log(tmp_path / w / "chunked" / "steps" / "steps-colocated-1.jsonl", "colocated", steps)
    refit, report = held_out_calibrations(tmp_path, ["a", "b", "c"], "a", machine)
    assert report["1t"] == {"kept_profiled": "no other workload's step logs"} and refit.one_thread is cal
    assert report["2t"]["step_logs"] == 1 and report["2t"]["steps"] == 3 * len(shapes)
    decode = [(1, 900, True)] * 4
    # Fitted to b's steps alone: b's 1.6x, not a's 1.3x.
    assert refit.two_threads.perf().step(decode).seconds == pytest.approx(1.6 * perf.step(decode).seconds, rel=0.1)
    _, for_c = held_out_calibrations(tmp_path, ["a", "b", "c"], "c", machine)
    assert for_c["2t"]["step_logs"] == 2


def test_the_planner_sees_a_colocated_decode_stall_that_the_split_avoids(every):
    """On the seed's load, simulated from this machine's calibration: colocated's decodes stall behind each
    long prefill (worst gaps over the 0.5 s SLO), the split's decode worker does not."""
    cal = Calibration.load(CALIBRATION)
    machine = Machine(cal, cal, link_bw=2e9)
    requests = every["prompt_heavy"].requests(0.15, 0).requests
    gap_only = SLO(max_gap_s=DEFAULT_SLO.max_gap_s)
    assert simulated_attainment(machine, "1p1d", requests, gap_only) > simulated_attainment(machine, "colocated", requests, gap_only)
    spec, _ = cluster(machine, "1p1d")
    assert {p.role: p.prefill_tokens_while_decoding for p in spec.pools} == {"prefill": None, "decode": 32}


@pytest.mark.parametrize("steps, cause", [
    # A gap from 10.0 to 10.4 s against 0.1 s decode steps.
    ([(9.95, 0.1, 0, 1), (10.05, 0.35, 512, 2)], "prompt in step"),  # a 512-token chunk rode in one step
    ([(9.95, 0.1, 0, 1), (10.05, 0.35, 0, 1)], "long step"),
    ([(9.95, 0.1, 0, 1), (10.3, 0.1, 0, 1)], "worker paused"),  # nothing ran from 10.05 to 10.3
    ([(9.95 + 0.1 * k, 0.1, 0, 1) for k in range(5)], "steps passed"),  # steps went on; the token did not come
])
def test_a_gap_is_put_down_to_what_the_decode_worker_did_meanwhile(steps, cause):
    got, figures = classify((10.0, 10.4), steps)
    assert got == cause, figures
    assert figures["gap_s"] == pytest.approx(0.4)


def test_the_stall_breakdown_lines_the_client_up_with_the_step_log(tmp_path):
    t0 = 1_800_000_000.0
    # A decode worker's step log (runtime/worker/step_log.py's format): five 0.1 s decode steps, then one of
    # 0.5 s that also computed a 64-token prompt.
    steps = [(t0 + 1.0 + 0.1 * k, 0.1, [[1, 100 + k, 1]]) for k in range(5)] + [(t0 + 1.5, 0.5, [[1, 105, 1], [64, 0, 1]])]
    lines = [{"role": "decode", "pid": 1, "clock": "unix"}] + [{"t": t, "s": s, "b": b} for t, s, b in steps]
    (tmp_path / "steps-decode-1.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (tmp_path / "steps-prefill-2.jsonl").write_text(json.dumps({"role": "prefill", "pid": 2, "clock": "unix"}) + "\n"
                                                    + json.dumps({"t": t0 + 1.5, "s": 0.5, "b": [[512, 0, 1]]}) + "\n")
    rec = RequestRecord(0, 0.0, 100, 8, sent_s=0.5, first_token_s=1.1, token_times_s=[1.1, 1.2, 1.3, 1.4, 1.5, 2.0],
                        end_s=2.0, completion_tokens=6, status=200)
    run = Run(0.1, 0, None, [rec], summarize([rec]), started_unix=t0)
    got = stall_breakdown([run], tmp_path, 0.1)
    assert got["requests"] == 1 and got["most_common"] == "prompt in step"
    assert got["causes"]["prompt in step"]["gap_steps_max"] == pytest.approx(5.0)
    assert got["worst"][0]["prompt_tokens"] == 64
    # No decode-only step ran at that batch (2): the gap counts in the run's unit there too.
    assert got["gap_batch_steps_max"] == pytest.approx(5.0)


def test_a_gap_of_one_big_batch_step_is_one_step_at_its_batch(tmp_path):
    """Batch-1 steps of 0.1 s, then batch-4 steps of 0.25 s: a 0.25 s gap is 2.5 median steps but one step of
    the batch that made it, and a 0.5 s gap there (a token skipped a step) is two; as many steps end within each."""
    t0 = 1_800_000_000.0
    steps = ([(t0 + 0.1 * k, 0.1, [[1, 100 + k, 1]]) for k in range(20)]
             + [(t0 + 2.0 + 0.25 * k, 0.25, [[1, 200 + k, 1]] * 4) for k in range(6)])
    lines = [{"role": "decode", "pid": 1, "clock": "unix"}] + [{"t": t, "s": s, "b": b} for t, s, b in steps]
    (tmp_path / "steps-decode-1.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    smooth = RequestRecord(0, 0.0, 100, 8, sent_s=1.9, first_token_s=2.25, token_times_s=[2.25, 2.5, 2.75, 3.0],
                           end_s=3.0, completion_tokens=4, status=200)
    skipped = RequestRecord(1, 0.0, 100, 8, sent_s=1.9, first_token_s=2.25, token_times_s=[2.25, 2.5, 3.0],
                            end_s=3.0, completion_tokens=3, status=200)
    # A hand-off whose first token reached the client 0.1 s into a step and whose second token came two
    # steps later: it sat one whole step out.
    late = RequestRecord(2, 0.0, 100, 8, sent_s=1.9, first_token_s=2.35, token_times_s=[2.35, 3.0],
                         end_s=3.0, completion_tokens=2, status=200)
    # Tokens reach the client 2 ms after their step ends, when the next step has already begun: still one.
    delivered = RequestRecord(3, 0.0, 100, 8, sent_s=1.9, first_token_s=2.252, token_times_s=[2.252, 2.502, 2.752],
                              end_s=2.752, completion_tokens=3, status=200)
    for rec, batch_steps, spanned in ((smooth, 1.0, 1), (skipped, 2.0, 2), (late, 2.6, 3), (delivered, 1.0, 1)):
        run = Run(0.1, 0, None, [rec], summarize([rec]), started_unix=t0)
        got = stall_breakdown([run], tmp_path, 0.1)
        assert got["step_s_by_batch"] == {"1": pytest.approx(0.1), "4": pytest.approx(0.25)}
        assert got["worst"][0]["gap_steps"] == pytest.approx(batch_steps * 2.5)
        assert got["gap_batch_steps_max"] == pytest.approx(batch_steps)
        assert got["steps_ended_max"] == spanned and got["requests_over_2_steps"] == (spanned > 2)
