"""Phase utilisation on a real 1P1D deployment, as a user sees it in `/metrics` (issue #7).

`splitserve serve --prefill 1 --decode 1 --pin --threads 1 --no-conditional` on the bundled SmolLM2-135M:
one worker per core, every prompt prefilled on the prefill worker. The load is closed-loop (`splitserve
bench --concurrency C`) with fixed lengths, one stage per concurrency level: C requests in flight bound
the decode worker's batch by C, which is what moves decode along the roofline. While each stage runs, a
scraper reads both workers' `/metrics` every second: the gauges

    splitserve_compute_utilization_ratio            achieved FLOP/s while stepping / the machine's peak
    splitserve_memory_bandwidth_utilization_ratio   achieved bytes/s while stepping / the peak
    splitserve_engine_busy_ratio                    the fraction of the window spent in steps

(the worker's meter averages the steps of its last 30 s; splitserve/runtime/worker/utilization.py). Each stage
lasts at least that window, and its figure is the last reading, when every step in the window is the
stage's own. Peaks: this machine's, measured once per thread count and cached (1 thread: a float32
matrix product and a large copy), unless $SPLITSERVE_CALIBRATION names a calibration file.

What to expect on a CPU: the ridge point (peak FLOP/s / peak bytes/s) is a few FLOP per byte, against
hundreds on a GPU, and a batch-b decode step of fp32 weights does about b/2 FLOP per byte. So decode is
bandwidth-heavy only at small batches here; the stages show where it crosses.

    python -m benchmarks.utilization [--concurrency 1 2 4 8] [--stage-s 45] [--input-len 512] [--output-len 64]
                                     [--replot]

Writes results/utilization.json and results/utilization.png (gauges over time per worker, and per stage);
the last line printed is a JSON summary: per stage, each worker's compute and bandwidth utilisation, and
the two ratios the issue asks about (prefill compute / decode compute, decode bandwidth / decode compute).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.netns import Service, credentials
from benchmarks.poller import Poller
from splitserve.bench import BenchConfig, run_bench
from splitserve.runtime.process import free_port
from splitserve.runtime.worker.utilization import BANDWIDTH_METRIC, BUSY_METRIC, COMPUTE_METRIC
from splitserve.workload.requests import LengthDist, SyntheticSpec

RESULTS = Path("results")
OUT = RESULTS / "utilization"
SERVE_FLAGS = ["--prefill", "1", "--decode", "1", "--pin", "--threads", "1", "--no-conditional"]
GAUGES = {COMPUTE_METRIC: "compute", BANDWIDTH_METRIC: "bandwidth", BUSY_METRIC: "busy"}
WINDOW_S = 30.0  # the worker meter's default window


def read_gauges(client: httpx.Client, url: str) -> dict[str, float]:
    text = client.get(url + "/metrics", timeout=10.0).text
    return {GAUGES[f.name]: f.samples[0].value for f in text_string_to_metric_families(text) if f.name in GAUGES}


class Scraper(Poller):
    """Reads every worker's gauges once a second, while the load runs in the foreground."""

    def __init__(self, workers: dict[str, str], interval_s: float = 1.0) -> None:
        super().__init__(interval_s)
        self.workers = workers
        self.samples: list[dict] = []
        self.stage: str | None = None

    def poll(self, client: httpx.Client) -> None:
        for role, url in self.workers.items():
            try:
                g = read_gauges(client, url)
            except httpx.HTTPError:
                continue
            self.samples.append({"t": time.monotonic() - self.started, "role": role, "stage": self.stage, **g})


def run_stage(url: str, concurrency: int, args: argparse.Namespace) -> dict:
    # Enough requests to keep C in flight for about the stage's length, at the rate the one prefill worker
    # allows (SmolLM2 on one core: ~330 prompt tokens/s, ~18 decode steps/s at batch 1).
    prefill_s, decode_s = args.input_len / 330, args.output_len / 18
    rate = min(concurrency / (prefill_s + decode_s), 1 / prefill_s)
    n = max(2 * concurrency, int(args.stage_s * rate) + concurrency)
    spec = SyntheticSpec(rate=1.0, input=LengthDist("fixed", args.input_len), output=LengthDist("fixed", args.output_len),
                         num_requests=n, seed=concurrency)
    started = time.monotonic()
    result = run_bench(BenchConfig(load=spec, url=url, concurrency=concurrency, timeout_s=600.0,
                                   out_dir=OUT / f"c{concurrency}"))
    s = result.summary
    return {"concurrency": concurrency, "requests": n, "ok": s.num_ok, "errors": s.errors,
            "wall_s": time.monotonic() - started, "ttft_p50_s": s.ttft.p50, "tpot_p50_s": s.tpot.p50}


def summarize(stages: list[dict]) -> dict:
    out = {}
    for st in stages:
        p, d = st["gauges"]["prefill"], st["gauges"]["decode"]
        out[f"c{st['concurrency']}"] = {
            "prefill_compute": p["compute"], "prefill_bandwidth": p["bandwidth"],
            "decode_compute": d["compute"], "decode_bandwidth": d["bandwidth"],
            "prefill_over_decode_compute": p["compute"] / d["compute"] if d["compute"] else None,
            "decode_bandwidth_over_compute": d["bandwidth"] / d["compute"] if d["compute"] else None,
        }
    return out


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.5))
    colors = {"prefill": "tab:red", "decode": "tab:blue"}
    for role in ("prefill", "decode"):
        for k, st in enumerate(doc["stages"]):  # one segment per stage: the idle gaps are not data
            ss = [s for s in doc["samples"] if s["role"] == role and s["stage"] == f"c{st['concurrency']}"]
            t = [s["t"] for s in ss]
            ax.plot(t, [s["compute"] for s in ss], color=colors[role], label=f"{role}: compute" if k == 0 else None)
            ax.plot(t, [s["bandwidth"] for s in ss], color=colors[role], ls="--",
                    label=f"{role}: bandwidth" if k == 0 else None)
    for st in doc["stages"]:
        ax.axvline(st["t_end"], color="0.7", lw=0.8)
        ax.text(st["t_end"], ax.get_ylim()[1] * 0.98, f" C={st['concurrency']}", va="top", ha="right", fontsize=8)
    ax.set_xlabel("s since the first stage")
    ax.set_ylabel("utilisation while stepping (30 s window)")
    ax.set_title("/metrics of a 1P1D deployment under load")
    ax.legend(fontsize=8)
    cs = [st["concurrency"] for st in doc["stages"]]
    width = 0.2
    for k, (role, kind) in enumerate([("prefill", "compute"), ("prefill", "bandwidth"), ("decode", "compute"),
                                      ("decode", "bandwidth")]):
        bx.bar([i + (k - 1.5) * width for i in range(len(cs))], [st["gauges"][role][kind] for st in doc["stages"]],
               width, color=colors[role], alpha=1.0 if kind == "compute" else 0.45, label=f"{role} {kind}",
               hatch=None if kind == "compute" else "//")
    bx.set_xticks(range(len(cs)), [f"C={c}" for c in cs])
    bx.set_ylabel("utilisation at the end of the stage")
    bx.set_title(f"peaks: {doc['peaks']}")
    bx.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--stage-s", type=float, default=45.0, help="about how long each stage runs (>= the 30 s window)")
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--replot", action="store_true", help="redraw the plot from results/utilization.json, run nothing")
    args = ap.parse_args()
    if args.replot:
        plot(json.loads((RESULTS / "utilization.json").read_text()), RESULTS / "utilization.png")
        return
    if args.stage_s < WINDOW_S:
        ap.error(f"--stage-s must cover the meter's {WINDOW_S:g} s window")
    OUT.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = Service("serve-1p1d", ["serve", "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
                                    *SERVE_FLAGS], None, OUT / "logs")
    stages = []
    try:
        server.wait_healthy(url)
        with credentials().client() as operator:
            workers = {w["role"]: w["url"] for w in operator.get(url + "/debug/workers").json()}
        httpx.post(url + "/v1/completions", json={"prompt": "warm up", "max_tokens": 4}, timeout=120).raise_for_status()
        with Scraper(workers) as scraper:
            for c in args.concurrency:
                scraper.stage = f"c{c}"
                stage = run_stage(url, c, args)
                with httpx.Client() as client:  # the stage's last reading, taken now rather than up to 1 s ago
                    stage["gauges"] = {role: read_gauges(client, u) for role, u in workers.items()}
                stage["t_end"] = scraper.samples[-1]["t"] if scraper.samples else 0.0
                stages.append(stage)
                g = stage["gauges"]
                print(f"[C={c}] {stage['ok']}/{stage['requests']} ok in {stage['wall_s']:.0f} s; prefill compute "
                      f"{g['prefill']['compute']:.2f} bw {g['prefill']['bandwidth']:.2f}; decode compute "
                      f"{g['decode']['compute']:.2f} bw {g['decode']['bandwidth']:.2f}", file=sys.stderr)
                scraper.stage = None
                time.sleep(WINDOW_S)  # idle: the next stage's window holds none of this one's steps
    finally:
        server.stop()
    peaks = os.environ.get("SPLITSERVE_CALIBRATION") or "measured here, 1 thread (~/.cache/splitserve/peaks.json)"
    doc = {"serve_args": SERVE_FLAGS, "input_len": args.input_len, "output_len": args.output_len, "peaks": peaks,
           "cpus": os.cpu_count(), "load_average": os.getloadavg(), "stages": stages, "samples": scraper.samples,
           "summary": summarize(stages)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "utilization.json").write_text(json.dumps(doc, indent=1))
    plot(doc, RESULTS / "utilization.png")
    print(json.dumps(doc["summary"]))


if __name__ == "__main__":
    main()
