"""splitserve against vLLM's CPU engine on the same weights, the same machine and the same seeded load.

Three servers, one at a time, each fed by `splitserve bench` (run_bench) with identical workloads:
  vllm       `vllm serve DIR --dtype float32` from the peer venv (README: "Against vLLM"), 2 OpenMP threads
  colocated  `splitserve serve --model DIR --colocated 1 --threads 2`
  1p1d       `splitserve serve --model DIR --prefill 1 --decode 1 --pin --threads 1`
DIR is the bundled SmolLM2-135M exported to an fp32 Hugging Face directory (benchmarks/hf_export.py), so both
engines load identical weights. For each server: greedy outputs of a few fixed prompts (token identity with
vLLM is checked on them), then per run r (seed r, the same for every server) Poisson loads at each rate
(prompts lognormal mean 1024 tokens, sigma 0.4; outputs 128; 16 requests), then batch-1 decode (prompt 64,
256 tokens out, one request at a time). Figures are medians over the runs with min/max.

    python -m benchmarks.vs_vllm [--runs 3] [--quick] [--systems vllm,colocated,1p1d] [--vllm PATH]

--quick: 1 run, 6 requests per rate, one batch-1 request: a smoke run, not a measurement. Without the peer
installed the vLLM server is skipped (one line says so) and the ratios are null. Writes
results/vs_vllm/vs_vllm.json and vs_vllm.png (bench's own per-run output under results/vs_vllm/runs/); the
last line printed is a JSON object with coloc_ttft_p50_vs_vllm, coloc_tpot_p50_vs_vllm (ours / vLLM's at 0.25
req/s), b1_decode_vs_vllm (our batch-1 tok/s / vLLM's) and split_itl_p99_vs_vllm (1P1D / vLLM at 0.25 req/s).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import time
from pathlib import Path

import httpx

from benchmarks.hf_export import export
from benchmarks.netns import Service, credentials
from splitserve.bench import BenchConfig, run_bench
from splitserve.bench.results import summary_dict
from splitserve.runtime.process import dies_with_parent, free_port, wait_healthy
from splitserve.workload.requests import LengthDist, SyntheticSpec

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "results" / "vs_vllm"
DEFAULT_VLLM = REPO.parent / "peers" / "vllm" / "bin" / "vllm"
SYSTEMS = ("vllm", "colocated", "1p1d")
SERVE_ARGS = {
    "colocated": ["--colocated", "1", "--threads", "2"],
    "1p1d": ["--prefill", "1", "--decode", "1", "--pin", "--threads", "1"],
}
# vLLM's CPU engine, as ../shared/PEERS.md runs it: 2 OpenMP threads on cores 0-1, no AOT compile cache (it
# fails to reload on CPU in 0.32.0), offline; 1 GiB of KV, as splitserve's default --kv-cache-gib (PEERS.md's 4 GiB
# got its worker OOM-killed on a shared 24 GB machine; 1 GiB holds ~23k tokens, far more than these loads keep).
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_USE_AOT_COMPILE": "0",
            "VLLM_HOST_IP": "127.0.0.1", "HF_HUB_OFFLINE": "1"}
IDENTITY_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three laws of thermodynamics are",
]
IDENTITY_TOKENS = 32


class Server:
    """One server under test: started, checked healthy (start-up seconds kept), stopped with its children."""

    def __init__(self, system: str, model_dir: Path, vllm: Path, bind: str, log_dir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        started = time.monotonic()
        if system == "vllm":
            log_dir.mkdir(parents=True, exist_ok=True)
            self.log = open(log_dir / "vllm.log", "w")
            env = {**os.environ, **VLLM_ENV, "VLLM_CPU_OMP_THREADS_BIND": bind}
            cmd = [str(vllm), "serve", str(model_dir), "--dtype", "float32", "--host", "127.0.0.1",
                   "--port", str(self.port), "--max-model-len", "4096"]
            # Its own session: vLLM's engine and worker processes are stopped with it, as one group.
            self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                         start_new_session=True, preexec_fn=dies_with_parent())
            self.service = None
            wait_healthy(self.url, self.proc, 600.0)
        else:
            self.service = Service(f"serve-{system}", ["serve", "--host", "127.0.0.1", "--port", str(self.port),
                                                       "--log-level", "warning", "--model", str(model_dir),
                                                       *SERVE_ARGS[system]], None, log_dir)
            self.service.wait_healthy(self.url, 600.0)
        self.startup_s = time.monotonic() - started

    def stop(self) -> None:
        if self.service is not None:
            self.service.stop()
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
        self.log.close()


def chosen_systems(ap: argparse.ArgumentParser, names: str, vllm: Path, known: tuple[str, ...]) -> list[str]:
    """The comma-separated systems asked for, checked; vLLM left out, with one line, when the peer is absent."""
    systems = [s.strip() for s in names.split(",") if s.strip()]
    unknown = set(systems) - set(known)
    if unknown:
        ap.error(f"unknown systems {sorted(unknown)}; choose from {list(known)}")
    if "vllm" in systems and not vllm.exists():
        print(f"vLLM skipped: the peer is not installed at {vllm} (README: 'Against vLLM' says how)", flush=True)
        systems.remove("vllm")
    return systems


def greedy_texts(url: str) -> list[str]:
    """Greedy continuations of IDENTITY_PROMPTS (also the warm-up)."""
    model = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]
    texts = []
    for prompt in IDENTITY_PROMPTS:
        r = httpx.post(url + "/v1/completions", timeout=300, json={
            "model": model, "prompt": prompt, "max_tokens": IDENTITY_TOKENS, "temperature": 0, "ignore_eos": True})
        r.raise_for_status()
        texts.append(r.json()["choices"][0]["text"])
    return texts


def load(rate: float, requests: int, seed: int) -> SyntheticSpec:
    return SyntheticSpec(rate=rate, arrival="poisson", input=LengthDist("lognormal", 1024, 0.4),
                         output=LengthDist("fixed", 128), num_requests=requests, seed=seed)


def b1_load(requests: int, seed: int) -> SyntheticSpec:
    return SyntheticSpec(rate=1.0, input=LengthDist("fixed", 64), output=LengthDist("fixed", 256),
                         num_requests=requests, seed=seed)


def measure(system: str, server: Server, model_dir: Path, args: argparse.Namespace) -> dict:
    base = dict(url=server.url, tokenizer=str(model_dir), timeout_s=600.0)
    out: dict = {"startup_s": server.startup_s, "greedy": greedy_texts(server.url), "rates": {}, "b1": []}
    for run in range(args.runs):
        for rate in args.rates:
            result = run_bench(BenchConfig(load=load(rate, args.requests, run), deadline_s=args.requests / rate + 600,
                                           out_dir=OUT / "runs" / system / f"rate{rate:g}-run{run}", **base))
            s = summary_dict(result.runs[-1])
            out["rates"].setdefault(str(rate), []).append(s)
            if server.service is not None:
                out.setdefault("rate_phases", {}).setdefault(str(rate), []).extend(phase_records(server.url, args.requests))
            print(f"[{system}] {rate:g} req/s run {run + 1}: TTFT p50 {_f(s['ttft']['p50'])} s, "
                  f"TPOT p50 {_f(s['tpot']['p50'], 1e3)} ms, ITL p99 {_f(s['itl']['p99'])} s, "
                  f"{s['output_throughput']:.1f} tok/s, ok {s['num_ok']}/{s['num_requests']} {s['errors'] or ''}",
                  flush=True)
        result = run_bench(BenchConfig(load=b1_load(args.b1_requests, run), concurrency=1,
                                       out_dir=OUT / "runs" / system / f"b1-run{run}", **base))
        s = summary_dict(result.runs[-1])
        out["b1"].append(s)
        print(f"[{system}] batch-1 decode run {run + 1}: TPOT p50 {_f(s['tpot']['p50'], 1e3)} ms, "
              f"ok {s['num_ok']}/{s['num_requests']} {s['errors'] or ''}", flush=True)
        if server.service is not None:
            out.setdefault("b1_phases", []).extend(phase_records(server.url, args.b1_requests))
    return out


PHASES = ("reserve_s", "queue_s", "prefill_s")


def phase_records(url: str, n: int) -> list[dict]:
    """The frontend's per-phase records of the last n requests (splitserve only): where each one's TTFT went."""
    with credentials().client(timeout=30.0) as operator:
        r = operator.get(url + "/debug/requests", params={"limit": n})
    r.raise_for_status()
    return [{k: rec[k] for k in ("path", "prompt_tokens", "ttft_s", *PHASES)} for rec in r.json()]


def ttft_breakdown(records: list[dict]) -> dict:
    """Median seconds of each phase of the requests' TTFT: reserving blocks on the decode worker (split
    only), the computing worker's queue, the prefill itself, and the rest, the hand-off: HTTP calls between
    frontend and workers, and on the split path the KV's last layer, the decode worker's admission and the
    first token's way back."""
    got = [r for r in records if r["ttft_s"] is not None]
    if not got:
        return {}
    med = {k: statistics.median(r[k] or 0.0 for r in got) for k in ("ttft_s", *PHASES)}
    med["handoff_s"] = statistics.median(r["ttft_s"] - sum(r[k] or 0.0 for k in PHASES) for r in got)
    return {**med, "requests": len(got), "paths": sorted({r["path"] for r in got})}


def _f(x: float | None, scale: float = 1.0) -> str:
    return "n/a" if x is None else f"{x * scale:.2f}"


def spread(xs: list[float | None]) -> dict:
    """Median, min and max of the runs that measured something (a run whose requests all failed has none)."""
    got = [x for x in xs if x is not None]
    if not got:
        return {"median": None, "min": None, "max": None, "runs": xs}
    return {"median": statistics.median(got), "min": min(got), "max": max(got), "runs": xs}


def table(m: dict, rates: list[float]) -> dict:
    """Medians with spread of the figures the issue's table shows."""
    t: dict = {"startup_s": m["startup_s"],
               "b1_tpot_s": spread([s["tpot"]["p50"] for s in m["b1"]]),
               "b1_tok_s": spread([1 / s["tpot"]["p50"] if s["tpot"]["p50"] else None for s in m["b1"]]),
               "b1_ttft_breakdown": ttft_breakdown(m.get("b1_phases", []))}
    for rate in rates:
        runs = m["rates"][str(rate)]
        t[str(rate)] = {f"{k}_{p}": spread([s[k][p] for s in runs])
                        for k in ("ttft", "tpot", "itl") for p in ("p50", "p90", "p99")}
        t[str(rate)]["output_tok_s"] = spread([s["output_throughput"] for s in runs])
        t[str(rate)]["ttft_breakdown"] = ttft_breakdown(m.get("rate_phases", {}).get(str(rate), []))
    return t


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = list(doc["tables"])
    panels = [(f"{r} req/s: {k}", r, k) for r in doc["config"]["rates"] for k in ("ttft_p50", "tpot_p50", "itl_p99")]
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(3 * (len(panels) + 1), 3.4))
    colors = {"vllm": "tab:gray", "colocated": "tab:blue", "1p1d": "tab:orange"}

    def bars(ax, vals: list[dict]) -> None:
        # A system whose runs all failed has no bar (median None).
        shown = [(s, v) for s, v in zip(systems, vals) if v["median"] is not None]
        ax.bar([s for s, _ in shown], [v["median"] for _, v in shown], color=[colors[s] for s, _ in shown],
               yerr=[[v["median"] - v["min"] for _, v in shown], [v["max"] - v["median"] for _, v in shown]], capsize=3)

    for ax, (title, rate, key) in zip(axes, panels):
        bars(ax, [doc["tables"][s][str(rate)][key] for s in systems])
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("s")
    bars(axes[-1], [doc["tables"][s]["b1_tok_s"] for s in systems])
    axes[-1].set_title("batch-1 decode", fontsize=9)
    axes[-1].set_ylabel("tokens/s")
    for ax in axes:
        ax.tick_params(axis="x", labelsize=7)
    fig.suptitle(f"SmolLM2-135M fp32 on {doc['cpus']} cores, median of {doc['config']['runs']} runs "
                 f"(load average at end {doc['load_average_at_end'][0]:.1f})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--requests", type=int, default=16, help="requests per rate and run")
    ap.add_argument("--rates", type=float, nargs="+", default=[0.25, 0.5])
    ap.add_argument("--b1-requests", type=int, default=3, help="batch-1 decode requests per run, one at a time")
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--vllm", type=Path, default=DEFAULT_VLLM, help="the peer's `vllm` script (default %(default)s)")
    ap.add_argument("--vllm-bind", default="0-1",
                    help="VLLM_CPU_OMP_THREADS_BIND (default %(default)s, as PEERS.md); 'nobind' on a machine others load: "
                         "OpenMP threads pinned to busy cores stall at every barrier (0.1-1 tok/s measured at load 20)")
    ap.add_argument("--quick", action="store_true", help="1 run, 6 requests per rate, 1 batch-1 request")
    args = ap.parse_args()
    if args.quick:
        args.runs, args.requests, args.b1_requests = 1, 6, 1
    systems = chosen_systems(ap, args.systems, args.vllm, SYSTEMS)

    model_dir = export()
    started = time.time()
    measured: dict = {}
    for system in systems:
        server = Server(system, model_dir, args.vllm, args.vllm_bind, OUT / "logs")
        print(f"[{system}] healthy after {server.startup_s:.1f} s", flush=True)
        try:
            measured[system] = measure(system, server, model_dir, args)
        finally:
            server.stop()

    tables = {s: table(m, args.rates) for s, m in measured.items()}
    for s, t in tables.items():
        for what, b in (("batch-1", t["b1_ttft_breakdown"]), (f"{args.rates[0]:g} req/s", t[str(args.rates[0])]["ttft_breakdown"])):
            if b:
                print(f"[{s}] {what} TTFT {b['ttft_s'] * 1e3:.0f} ms (median of {b['requests']}, {'/'.join(b['paths'])}): "
                      + ", ".join(f"{k[:-2]} {b[k] * 1e3:.0f} ms" for k in (*PHASES, "handoff_s")), flush=True)
    identity = None
    if "vllm" in measured:
        ref = measured["vllm"]["greedy"]
        identity = {s: [a == b for a, b in zip(m["greedy"], ref)] for s, m in measured.items() if s != "vllm"}
        for s, same in identity.items():
            print(f"greedy identity with vLLM, {s}: {sum(same)} of {len(same)} prompts", flush=True)

    def med(system: str, key: str) -> float | None:
        t = tables.get(system)
        return t[str(args.rates[0])][key]["median"] if t else None

    summary = {
        "coloc_ttft_p50_vs_vllm": ratio(med("colocated", "ttft_p50"), med("vllm", "ttft_p50")),
        "coloc_tpot_p50_vs_vllm": ratio(med("colocated", "tpot_p50"), med("vllm", "tpot_p50")),
        "b1_decode_vs_vllm": ratio(*(tables[s]["b1_tok_s"]["median"] if s in tables else None
                                     for s in ("colocated", "vllm"))),
        "split_itl_p99_vs_vllm": ratio(med("1p1d", "itl_p99"), med("vllm", "itl_p99")),
        "split_tpot_p90_vs_vllm": ratio(med("1p1d", "tpot_p90"), med("vllm", "tpot_p90")),
        "rate_of_ratios": args.rates[0],
        "greedy_identity": identity,
        "runs": args.runs,
        "load_average_at_end": os.getloadavg()[0],
    }
    doc = {"summary": summary, "config": {**vars(args), "vllm": str(args.vllm), "model_dir": str(model_dir),
                                          "systems": systems, "serve_args": SERVE_ARGS, "vllm_env": VLLM_ENV},
           "cpus": os.cpu_count(), "load_average_at_end": os.getloadavg(), "wall_s": time.time() - started,
           "tables": tables, "measured": measured}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "vs_vllm.json").write_text(json.dumps(doc, indent=1, default=str))
    plot(doc, OUT / "vs_vllm.png")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
