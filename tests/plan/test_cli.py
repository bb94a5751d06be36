"""`splitserve plan` from the command line: bad input is one line and exit code 2; JSON, files and report work."""

import json
import subprocess
import sys

import pytest

from splitserve.plan.cli import main

FAST = ["--model", "llama-3.1-8b", "--gpu", "h100", "--gpus", "4", "--network", "rdma-400", "--isl", "512", "--osl", "16",
        "--slo-ttft", "1", "--slo-tpot", "0.05", "--requests", "40", "--top-k", "1", "--tp", "1", "--chunks", "512",
        "--jobs", "1", "--quiet"]


def run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "change, message",
    [
        ({"--gpu": "tpu-v9"}, "unknown GPU 'tpu-v9'"),
        ({"--model": "gpt-17"}, "unknown model 'gpt-17'"),
        ({"--network": "smoke-signals"}, "unknown network"),
        ({"--slo-ttft": "0.001"}, "TTFT 0.001 s is impossible"),
        ({"--slo-tpot": "0.0001"}, "TPOT 0.1 ms is impossible"),
        ({"--gpus": "0"}, "--gpus must be >= 1"),
        ({"--tp": "x"}, "--tp takes comma-separated integers"),
        ({"--slo-ttft": "soon"}, "--slo-ttft takes a duration such as 600ms"),
        ({"--slo-tpot": "0ms"}, "--slo-tpot must be positive"),
        ({"--isl": "200000"}, "Llama-3.1-8B's context of 131,072 tokens"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(change, message, capsys):
    argv = list(FAST)
    for k, v in change.items():
        argv[argv.index(k) + 1] = v
    code, out, err = run(argv, capsys)
    assert code == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_missing_trace_and_missing_slo(capsys, tmp_path):
    code, _, err = run(FAST + ["--trace", str(tmp_path / "nope.jsonl")], capsys)
    assert code == 2 and "trace file not found" in err
    argv = [a for a in FAST if a not in ("--slo-tpot", "0.05")]
    code, _, err = run(argv, capsys)
    assert code == 2 and "--slo-tpot" in err


def test_a_70b_model_on_too_few_gpus_is_refused(capsys):
    argv = list(FAST)
    argv[argv.index("--model") + 1] = "llama-3.1-70b"
    code, _, err = run(argv, capsys)
    assert code == 2 and "does not fit" in err


def test_json_and_report_files(capsys, tmp_path):
    code, out, err = run(FAST + ["--json", "--out", str(tmp_path / "p")], capsys)
    assert code == 0, err
    doc = json.loads(out)
    assert doc["kind"] == "plan" and doc["verdict"] in ("colocate", "disaggregate")
    for mode in ("colocated", "disaggregated"):
        m = doc[mode]
        assert m["goodput_rps"] > 0 and m["tokens_per_s_per_gpu"] > 0 and m["cost_per_m_tokens"] > 0
        assert m["metrics"]["ttft"]["p90"] <= 1.0 and m["metrics"]["tpot"]["p90"] <= 0.05 * 1.5
        assert {p["role"] for p in m["metrics"]["pools"]} <= {"colocated", "prefill", "decode"}
        assert all(0 <= p["compute_util"] <= 1 and 0 <= p["bandwidth_util"] <= 1 for p in m["metrics"]["pools"])
    assert doc["reasons"]
    assert {f.name for f in (tmp_path / "p").iterdir()} == {"plan.json", "plan.png", "index.html"}
    code, out, err = run(["report", str(tmp_path / "p" / "plan.json"), "--out", str(tmp_path / "r")], capsys)
    assert code == 0, err
    html = (tmp_path / "r" / "index.html").read_text()
    assert "verdict" in html and "data:image/png;base64," in html
    code, _, err = run(["report", str(tmp_path / "missing.json"), "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and "not found" in err


def test_table_output_and_module_entry_point():
    proc = subprocess.run([sys.executable, "-m", "splitserve.plan", *FAST], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "verdict:" in proc.stdout and "goodput" in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "splitserve.plan", *FAST[:2], "--gpu", "nope"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.startswith("splitserve plan: error:") and "Traceback" not in bad.stderr


def test_an_over_context_prompt_is_refused_at_once(capsys):
    """Before: every configuration simulated (31-74 s), then "no configuration meets TTFT"."""
    import time

    from tests.runtime.deployment import loaded_bound

    argv = list(FAST)
    argv[argv.index("--isl") + 1] = "200000"
    t0 = time.monotonic()
    code, _, err = run(argv, capsys)
    assert code == 2 and "context of 131,072 tokens" in err
    assert time.monotonic() - t0 < loaded_bound(1.0)  # 1 s on a quiet machine, stretched by the load


def test_slo_durations_take_units():
    from splitserve.plan.cli import build_parser, spec_from_args

    def slo(ttft, tpot):
        argv = list(FAST)
        argv[argv.index("--slo-ttft") + 1], argv[argv.index("--slo-tpot") + 1] = ttft, tpot
        return spec_from_args(build_parser().parse_args(argv)).slo

    assert slo("600ms", "50ms") == slo("0.6s", "0.05") == slo("0.6", "0.05s")
    assert slo("600ms", "50ms").ttft_s == 0.6
