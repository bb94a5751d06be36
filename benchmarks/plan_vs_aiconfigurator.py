"""`splitserve plan` against NVIDIA aiconfigurator 0.12.0 on nine cases neither was tuned to (issue 18).

The cases span what the issue names: models 8B-70B (Llama 3.1 8B, Qwen3 32B, Llama 3.1 70B), clusters of
8-32 H100, H200 or B200, prompts of 512 to 16k tokens, tight and loose TPOT targets. Each case runs
`splitserve plan --json` and `aiconfigurator cli default` (TRT-LLM backend, its own perf database) with the
same model, GPU, cluster size, ISL/OSL and TTFT/TPOT targets, one after the other, and compares:

    verdict       splitserve's; aiconfigurator's best agg vs best disagg by output tokens/s per GPU of the
                  cluster (its own "Best Experiment Chosen")
    P:D ratio     prefill GPUs / decode GPUs of each one's best disaggregated configuration
    throughput    output tokens/s per GPU of the cluster (aiconfigurator's tokens/s/gpu_cluster; splitserve's
                  goodput x mean output / cluster GPUs), colocated and disaggregated
    errors        splitserve / aiconfigurator - 1

The two do not model the same pass rule: splitserve wants 90 % of Poisson requests within both targets
(its steady-state figure is reported beside it), aiconfigurator models steady state at a fixed
concurrency. aiconfigurator lives in its own virtual environment (default ../peers/aic, see
/work/shared/PEERS.md); without it only splitserve's side runs, and a line says so.

    python -m benchmarks.plan_vs_aiconfigurator [--cases 1,2] [--aic ../peers/aic/bin/aiconfigurator] [--reuse-aic]

Writes results/plan/vs_aiconfigurator.json and .png; the last line printed is a JSON summary. CPU work only,
minutes per case on a loaded 2-core machine (not part of `make test`).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

RESULTS = Path("results/plan")
AIC_DEFAULT = Path(__file__).resolve().parents[1].parent / "peers" / "aic" / "bin" / "aiconfigurator"
AIC_MODELS = {"llama-3.1-8b": "meta-llama/Meta-Llama-3.1-8B", "qwen3-32b": "Qwen/Qwen3-32B",
              "llama-3.1-70b": "meta-llama/Meta-Llama-3.1-70B"}
AIC_SYSTEMS = {"h100": "h100_sxm", "h200": "h200_sxm", "b200": "b200_sxm"}


@dataclass(frozen=True)
class Case:
    name: str
    model: str  # splitserve preset (AIC_MODELS gives aiconfigurator's)
    gpu: str
    gpus: int
    isl: int
    osl: int
    ttft_s: float
    tpot_s: float


CASES = (
    Case("8b-h100x8-short-tight", "llama-3.1-8b", "h100", 8, 512, 256, 0.5, 0.010),
    Case("8b-h100x16-1k-tight", "llama-3.1-8b", "h100", 16, 1024, 512, 1.0, 0.015),
    Case("8b-b200x8-8k-loose", "llama-3.1-8b", "b200", 8, 8192, 512, 2.0, 0.030),
    Case("32b-h200x8-4k-loose", "qwen3-32b", "h200", 8, 4000, 500, 1.5, 0.050),
    Case("32b-h100x16-2k-tight", "qwen3-32b", "h100", 16, 2048, 256, 1.0, 0.020),
    Case("32b-b200x16-16k-loose", "qwen3-32b", "b200", 16, 16384, 1024, 4.0, 0.040),
    Case("70b-h100x16-4k-loose", "llama-3.1-70b", "h100", 16, 4096, 256, 2.0, 0.050),
    Case("70b-h200x32-1k-tight", "llama-3.1-70b", "h200", 32, 1024, 1024, 1.0, 0.025),
    Case("70b-b200x32-16k-loose", "llama-3.1-70b", "b200", 32, 16384, 256, 5.0, 0.060),
)


def run_splitserve(c: Case) -> dict:
    cmd = [sys.executable, "-m", "splitserve", "plan", "--model", c.model, "--gpu", c.gpu, "--gpus", str(c.gpus),
           "--network", "rdma-400", "--isl", str(c.isl), "--osl", str(c.osl), "--slo-ttft", str(c.ttft_s),
           "--slo-tpot", str(c.tpot_s), "--json"]
    t0, cpu0 = time.perf_counter(), os.times()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    cpu1 = os.times()
    out = {"wall_s": time.perf_counter() - t0, "cpu_s": (cpu1.children_user + cpu1.children_system)
           - (cpu0.children_user + cpu0.children_system), "load": os.getloadavg()[0]}
    if proc.returncode != 0:
        return {**out, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    d = json.loads(proc.stdout)
    mean_out = d["inputs"]["mean_output"]

    def mode(r: dict | None) -> dict | None:
        if r is None:
            return None
        pools = {p["role"]: p for p in r["pools"]}
        gpus = {role: p["workers"] * p["tp"] for role, p in pools.items()}
        return {"config": r["config"], "goodput_rps": r["goodput_rps"], "gpus_used": r["gpus"],
                "output_tokens_per_s_per_cluster_gpu": r["goodput_rps"] * mean_out / c.gpus,
                "steady_goodput_rps": r.get("steady_goodput_rps"),
                "pd_ratio": gpus["prefill"] / gpus["decode"] if "prefill" in gpus else None}

    return {**out, "verdict": d["verdict"], "advantage": d["advantage"], "colocated": mode(d["colocated"]),
            "disaggregated": mode(d["disaggregated"])}


def _rows(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def run_aic(c: Case, aic: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [str(aic), "cli", "default", "--model-path", AIC_MODELS[c.model], "--backend", "trtllm",
               "--total-gpus", str(c.gpus), "--system", AIC_SYSTEMS[c.gpu], "--isl", str(c.isl), "--osl", str(c.osl),
               "--ttft", f"{c.ttft_s * 1e3:g}", "--tpot", f"{c.tpot_s * 1e3:g}", "--top-n", "1", "--no-color",
               "--save-dir", tmp]
        t0, cpu0 = time.perf_counter(), os.times()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        cpu1 = os.times()
        out = {"wall_s": time.perf_counter() - t0, "cpu_s": (cpu1.children_user + cpu1.children_system)
               - (cpu0.children_user + cpu0.children_system), "load": os.getloadavg()[0]}
        agg = next(Path(tmp).rglob("agg/best_config_topn.csv"), None)
        dis = next(Path(tmp).rglob("disagg/best_config_topn.csv"), None)
        if proc.returncode != 0 or (agg is None and dis is None):
            tail = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()][-1:]
            return {**out, "error": f"exit {proc.returncode}: {tail[0] if tail else ''}"}
        a = (_rows(agg) or [None])[0] if agg else None
        d = (_rows(dis) or [None])[0] if dis else None
    colo = None if a is None else {
        "config": f"{a['parallel']} x{int(c.gpus) // int(a['num_total_gpus'])} replicas, batch {a['bs']}",
        "output_tokens_per_s_per_cluster_gpu": float(a["tokens/s/gpu_cluster"]), "ttft_ms": float(a["ttft"]),
        "tpot_ms": float(a["tpot"])}
    disagg = None
    if d is not None:
        pg, dg = int(d["(p)workers"]) * int(d["(p)tp"]), int(d["(d)workers"]) * int(d["(d)tp"])
        disagg = {"config": f"{d['(p)workers']}P TP{d['(p)tp']} + {d['(d)workers']}D TP{d['(d)tp']}",
                  "output_tokens_per_s_per_cluster_gpu": float(d["tokens/s/gpu_cluster"]), "pd_ratio": pg / dg,
                  "ttft_ms": float(d["ttft"]), "tpot_ms": float(d["tpot"])}
    tput = {k: v["output_tokens_per_s_per_cluster_gpu"] for k, v in (("agg", colo), ("disagg", disagg)) if v}
    verdict = "disaggregate" if tput.get("disagg", 0.0) > tput.get("agg", 0.0) else "colocate"
    return {**out, "verdict": verdict, "colocated": colo, "disaggregated": disagg}


def _err(ours: float | None, theirs: float | None) -> float | None:
    return ours / theirs - 1 if ours is not None and theirs else None


def compare(ss: dict, aic: dict | None) -> dict:
    if aic is None or "error" in aic or "error" in ss:
        return {}

    def get(r: dict, mode: str, key: str) -> float | None:
        return (r.get(mode) or {}).get(key)

    tput = "output_tokens_per_s_per_cluster_gpu"
    return {"same_verdict": ss["verdict"] == aic["verdict"],
            "ratio_error": _err(get(ss, "disaggregated", "pd_ratio"), get(aic, "disaggregated", "pd_ratio")),
            "colocated_throughput_error": _err(get(ss, "colocated", tput), get(aic, "colocated", tput)),
            "disaggregated_throughput_error": _err(get(ss, "disaggregated", tput), get(aic, "disaggregated", tput))}


def summary(rows: list[dict]) -> dict:
    cmp = [r["compare"] for r in rows if r["compare"]]

    def med(key: str, fn=lambda v: v) -> float | None:
        vals = [fn(c[key]) for c in cmp if c.get(key) is not None]
        return statistics.median(vals) if vals else None

    ratio = [abs(c["ratio_error"]) for c in cmp if c.get("ratio_error") is not None]
    return {"cases": len(rows), "compared": len(cmp), "same_verdict": sum(c["same_verdict"] for c in cmp),
            "ratio_abs_error_median": med("ratio_error", abs), "ratio_abs_error_max": max(ratio) if ratio else None,
            "colocated_throughput_error_median": med("colocated_throughput_error"),
            "disaggregated_throughput_error_median": med("disaggregated_throughput_error"),
            "leans_disaggregate": sum(1 for r in rows if r["compare"] and r["splitserve"]["verdict"] == "disaggregate"
                                      and r["aiconfigurator"]["verdict"] == "colocate")}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    names = [r["case"]["name"] for r in rows]
    for i, (mode, colour) in enumerate((("colocated_throughput_error", "tab:blue"), ("disaggregated_throughput_error", "tab:orange"))):
        vals = [(r["compare"].get(mode) or 0.0) * 100 for r in rows]
        ax.bar([x + i * 0.4 for x in range(len(rows))], vals, 0.4, color=colour, label=mode.split("_")[0])
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xticks([x + 0.2 for x in range(len(rows))], names, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("splitserve / aiconfigurator - 1 (%)")
    ax.set_title("output tokens/s per cluster GPU at the SLO; * = different verdict")
    for x, r in enumerate(rows):
        if r["compare"] and not r["compare"]["same_verdict"]:
            ax.text(x + 0.2, 0, "*", ha="center", va="bottom", fontsize=14)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", help="comma-separated case numbers (1-based; default all)")
    ap.add_argument("--aic", type=Path, default=AIC_DEFAULT, help="aiconfigurator executable (default %(default)s)")
    ap.add_argument("--out", type=Path, default=RESULTS / "vs_aiconfigurator.json")
    ap.add_argument("--reuse-aic", action="store_true",
                    help="take aiconfigurator's side of each case from --out's earlier results where that case is "
                         "there unchanged (it depends only on the case: its perf database, not splitserve)")
    args = ap.parse_args(argv)
    picked = [i.strip() for i in args.cases.split(",")] if args.cases else []
    if any(not i.isdigit() or not 1 <= int(i) <= len(CASES) for i in picked):
        ap.error(f"--cases: numbers from 1 to {len(CASES)}, got {args.cases!r}")
    cases = [CASES[int(i) - 1] for i in picked] or list(CASES)
    have_aic = args.aic.exists()
    if not have_aic and not args.reuse_aic:
        print(f"aiconfigurator skipped: {args.aic} is absent (install it into its own venv, see /work/shared/PEERS.md)")
    earlier = {json.dumps(r["case"], sort_keys=True): r["aiconfigurator"] for r in json.loads(args.out.read_text())["rows"]
               if r.get("aiconfigurator")} if args.reuse_aic and args.out.exists() else {}
    rows = []
    for c in cases:
        ss = run_splitserve(c)
        aic = earlier.get(json.dumps(asdict(c), sort_keys=True)) or (run_aic(c, args.aic) if have_aic else None)
        row = {"case": asdict(c), "splitserve": ss, "aiconfigurator": aic, "compare": compare(ss, aic)}
        rows.append(row)
        print(json.dumps({"case": c.name, "splitserve": {k: ss.get(k) for k in ("verdict", "wall_s", "error")},
                          "aiconfigurator": {k: (aic or {}).get(k) for k in ("verdict", "wall_s", "error")},
                          **row["compare"]}), flush=True)
    result = {"summary": summary(rows), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    if any(r["compare"] for r in rows):
        plot(rows, args.out.with_suffix(".png"))
    print(json.dumps(result["summary"]))


if __name__ == "__main__":
    main()
