"""`splitserve plan local`: each deployment of this machine simulated over the requests bench would send, the
winner named, and how sure the pick is across a band of step times (issue 19: the planner a user runs)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from splitserve.bench.config import TraceLoad
from splitserve.bench.runner import workload_at
from splitserve.calibrate.table import Calibration
from splitserve.plan.cli import main
from splitserve.plan.local_deployments import Machine, Probe, predict_goodput, serving_step_time
from splitserve.plan.local_pick import DeploymentGoodput, LocalPick, pick_deployment
from splitserve.plan.spec import WorkloadDef
from splitserve.workload.goodput import Bracket, Goodput
from splitserve.workload.requests import LengthDist, Scaling, SyntheticSpec, read_trace
from splitserve.workload.slo import SLO
from tests.bench.trace_files import write_azure, write_mooncake

CALIBRATION = Path(__file__).resolve().parents[2] / "results" / "sim_accuracy" / "calibration.json"
HEAVY = SyntheticSpec(rate=1.0, input=LengthDist("lognormal", 1024, 0.4), output=LengthDist("fixed", 64), num_requests=12)
SLO_ = SLO(8.0, 0.25, 0.5)


@pytest.fixture(scope="module")
def machine() -> Machine:
    cal = Calibration.load(CALIBRATION)
    return Machine(cal, cal, link_bw=4e9)


def _heavy(rate: float, trial: int):
    return WorkloadDef(synthetic=HEAVY, num_requests=12).trial(rate, trial).requests


def test_plan_simulates_the_very_requests_bench_sends(tmp_path):
    syn = WorkloadDef(synthetic=HEAVY, num_requests=12)
    assert syn.trial(0.3, 2) == workload_at(HEAVY, None, 0.3, 2)
    assert syn.trial(0.3, 0).requests != syn.trial(0.3, 1).requests  # each trial its own draw
    azure = write_azure(tmp_path / "azure.csv", [(f"2023-11-16 18:15:{i:02d}.000", 100 + 37 * i, 5 + i) for i in range(12)])
    mooncake = write_mooncake(tmp_path / "mooncake.jsonl", [(3000 * (i // 3), 600 + 50 * i, 20 + i, list(range(i % 4 + 1)))
                                                            for i in range(12)])
    for path in (azure, mooncake):
        trace, scaling = read_trace(path), Scaling(length_scale=0.5, jitter_s=3.0, seed=3, max_requests=10)
        wl = WorkloadDef(trace=trace, scaling=scaling, num_requests=10)
        assert wl.trial(0.5, 1) == workload_at(TraceLoad(str(path), scaling=scaling), trace, 0.5, 1)


def test_step_scale_slows_every_step_and_a_slower_machine_serves_no_more(machine):
    assert serving_step_time(machine, "1p1d") is None
    slow = Machine(machine.one_thread, machine.two_threads, machine.link_bw, step_scale=2.0,
                   serving_speed={"1p1d/decode/decode": 1.5})
    hook = serving_step_time(slow, "1p1d")
    assert hook is not None
    bracket = Bracket(0.05, 0.6, 0.05)
    fast = predict_goodput(machine, "1p1d", _heavy, SLO_, bracket, 2, 0.9).lower
    assert predict_goodput(slow, "1p1d", _heavy, SLO_, bracket, 2, 0.9).lower < fast


def test_the_band_brackets_each_goodput_and_a_pick_that_turns_inside_it_is_not_robust(machine):
    bracket = Bracket(0.05, 0.6, 0.05)
    pick = pick_deployment(machine, ("colocated", "chunked", "1p1d"), _heavy, SLO_, bracket, 2, 0.9, 0.4)
    for d in pick.deployments:
        assert d.slower <= d.goodput <= d.faster
        assert d.nominal.lower == predict_goodput(machine, d.deployment, _heavy, SLO_, bracket, 2, 0.9).lower
    assert any(d.slower < d.faster for d in pick.deployments)
    assert pick.winner in pick.contenders() and pick.robust == (len(pick.contenders()) == 1)
    flat = pick_deployment(machine, ("1p1d",), _heavy, SLO_, bracket, 1, 0.9, 0.0)
    assert flat.deployments[0].slower == flat.deployments[0].faster == flat.deployments[0].goodput
    with pytest.raises(ValueError, match="band"):
        pick_deployment(machine, ("1p1d",), _heavy, SLO_, bracket, 1, 0.9, 1.0)


def _goodput(name: str, nominal: float, slower: float, faster: float) -> DeploymentGoodput:
    return DeploymentGoodput(name, Goodput[Probe](nominal or None, nominal, None, ()), slower, faster)


@pytest.mark.parametrize("rows, winner, robust, contenders", [
    ([("a", 1.0, 0.8, 1.2), ("b", 0.5, 0.4, 0.6)], "a", True, ("a",)),
    ([("a", 1.0, 0.5, 1.2), ("b", 0.9, 0.8, 1.0)], "a", False, ("a", "b")),  # b wins with slower steps
    ([("a", 0.0, 0.0, 0.0), ("b", 0.0, 0.0, 0.1)], None, False, ("b",)),  # nothing passes, b would if faster
    ([("a", 0.0, 0.0, 0.0)], None, True, ()),
    ([("a", 2.0, 1.5, 4.0), ("b", 4.0, 4.0, 4.0)], "b", True, ("b",)),  # a tie at the top keeps the nominal pick
])
def test_the_winner_and_its_contenders_across_the_band(rows, winner, robust, contenders):
    pick = LocalPick(0.1, tuple(_goodput(*r) for r in rows))
    assert (pick.winner, pick.robust, pick.contenders()) == (winner, robust, contenders)


def _cal_file(tmp_path: Path, threads: int) -> Path:
    doc = json.loads(CALIBRATION.read_text())
    doc["machine"]["threads"] = threads
    path = tmp_path / f"cal-{threads}t.json"
    path.write_text(json.dumps(doc))
    return path


def _argv(tmp_path: Path, **change: str) -> list[str]:
    flags = {"--calibration-1t": str(_cal_file(tmp_path, 1)), "--calibration-2t": str(_cal_file(tmp_path, 2)),
             "--isl": "1024", "--isl-dist": "lognormal", "--isl-spread": "0.4", "--osl": "64", "--num-requests": "12",
             "--slo-ttft": "8", "--slo-tpot": "250ms", "--slo-gap": "0.5s", "--rate-lo": "0.05", "--rate-hi": "0.6",
             "--resolution": "0.05", "--trials": "2", "--deployments": "colocated,1p1d", **change}
    return ["local", *[x for k, v in flags.items() if v is not None for x in (k, v)], "--json"]


def test_the_cli_predicts_as_the_planner_does_and_names_the_winner(tmp_path, capsys, machine):
    assert main(_argv(tmp_path)) == 0
    doc = json.loads(capsys.readouterr().out)
    got = {d["deployment"]: d for d in doc["deployments"]}
    bracket = Bracket(0.05, 0.6, 0.05)
    for name in ("colocated", "1p1d"):
        assert got[name]["goodput"] == predict_goodput(machine, name, _heavy, SLO_, bracket, 2, 0.9).lower
        assert got[name]["slower"] <= got[name]["goodput"] <= got[name]["faster"]
    best = max(got, key=lambda n: got[n]["goodput"])
    assert doc["winner"] == (best if got[best]["goodput"] > 0 else None)
    assert doc["slo"] == {"ttft_s": 8.0, "tpot_s": 0.25, "max_gap_s": 0.5} and doc["band"] == 0.1


def test_the_cli_prints_a_table_and_a_verdict(tmp_path, capsys):
    argv = _argv(tmp_path, **{"--deployments": "1p1d,chunked"})
    assert main(argv) == 0
    doc = json.loads(capsys.readouterr().out)
    assert main([a for a in argv if a != "--json"]) == 0
    out = capsys.readouterr().out
    assert "1p1d" in out and "chunked" in out and "steps +10%" in out
    if doc["winner"] is None:
        assert "no deployment meets the SLO at 0.05 req/s" in out
    elif doc["robust"]:
        assert f"run {doc['winner']}" in out
    else:
        assert f"{doc['winner']} wins at the calibration's speed" in out and "measure" in out


@pytest.mark.parametrize("change, message", [
    ({"--slo-ttft": None, "--slo-tpot": None, "--slo-gap": None}, "give at least one of --slo-ttft"),
    ({"--slo-gap": "soon"}, "--slo-gap takes a duration"),
    ({"--deployments": "colocated,4p4d"}, "--deployments: unknown deployment '4p4d'"),
    ({"--rate-lo": "0.6", "--rate-hi": "0.1"}, "--rate-lo and --rate-hi need 0 < lo < hi"),
    ({"--band": "1.5"}, "--band must be in [0, 1)"),
    ({"--trials": "0"}, "--trials must be at least 1"),
    ({"--num-requests": "3"}, "--requests must be at least 10"),
    ({"--chunk": "0"}, "--chunk must be at least 1"),
    ({"--link-gbps": "0"}, "--link-gbps must be positive"),
])
def test_bad_input_is_one_line_naming_the_flag(tmp_path, capsys, change, message):
    assert main(_argv(tmp_path, **change)) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_a_calibration_of_the_wrong_thread_count_or_none_at_all_is_refused(tmp_path, capsys):
    swapped = _argv(tmp_path, **{"--calibration-2t": str(_cal_file(tmp_path, 1))})
    assert main(swapped) == 2
    assert "--calibration-2t" in capsys.readouterr().err
    assert main(_argv(tmp_path, **{"--calibration-1t": str(tmp_path / "missing.json")})) == 2
    assert "--calibration-1t: cannot read" in capsys.readouterr().err


def test_local_is_listed_under_plan(tmp_path):
    from splitserve.plan.cli import build_parser

    args = build_parser().parse_args(_argv(tmp_path))
    assert isinstance(args, argparse.Namespace) and args.plan_command == "local" and args.isl == 1024.0
