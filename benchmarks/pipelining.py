"""Layer pipelining of the KV transfer over real links: how much transfer time prefill compute hides.

The prefill worker runs in network namespace A, the decode worker and the frontend (`splitserve serve
--attach`) in namespace B; KV crosses a veth pair shaped with tc tbf to 1 Gbit/s or 100 Mbit/s (and, as a
reference, the unshaped loopback of namespace B, both workers in it). Each worker is pinned to its own
core with one thread. One request at a time, greedy, 2 output tokens (the second comes from the decode
worker, so the frontend's phase record carries its wait for KV), distinct random prompts (no prefix hits).

Per request: exposed transfer = last KV byte sent - last layer computed, on the prefill worker's clock
(the delta of `splitserve_kv_transfer_exposed_seconds` sum/count around the request); prefill_s, ttft_s,
reserve_s, kv_wait_s from the frontend's GET /debug/requests; kv_done_after_ttft_s = reserve_s + kv_wait_s
- ttft_s (the decode side's view: how long after the first token its KV was complete). "Sent" on the
prefill side means handed to the kernel: up to a socket buffer (~8 MB: 64 ms at 1 Gbit/s, 0.64 s at
100 Mbit/s) may still be queued then, which the decode view includes and the sender view does not.
Pipelined and unpipelined (`--no-layer-pipelining`) run on fresh workers, one after the other, per link.

Headlines (1 Gbit/s, 2,048 tokens): exposed_fraction = exposed / prefill time, pipelined (target <= 0.02;
the floor is one layer's transfer); pipelining_gain = unpipelined exposed / pipelined exposed (target >= 10).
At 100 Mbit/s the link, not compute, is the bottleneck: the KV of a prompt takes longer to send than to
compute, so even pipelined the excess shows (plotted on its own).

    python -m benchmarks.pipelining [--quick] [--reps 3] [--links loopback,1gbit,100mbit] [--lengths 512,2048,8190]
                                    [--transfer tcp|nixl]

`--transfer nixl` moves KV with NIXL WRITEs; UCX is limited to its tcp transport on the veth (UCX_TLS=tcp,
UCX_NET_DEVICES), since on one host it would otherwise take shared memory between the namespaces and
bypass the shaped link. "Sent"
then means the WRITE completed. Results go to results/pipelining-nixl.json / .png.

Needs root (namespaces, tc) and 2 cores. Writes results/pipelining.json and results/pipelining.png; the
last line printed is a JSON object. The largest prompt is 8,190 tokens: 8,192 context = prompt + 2 outputs.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import secrets
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import httpx
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.netns import A_ADDR, B_ADDR, DEV, Link, Service, credentials, entered, install_cleanup, tcp_throughput
from splitserve.bench.prompts import PromptBuilder
from splitserve.bench.vocab import find_vocab
from splitserve.core.model_spec import ModelSpec
from splitserve.model.gguf_file import config_from_gguf, open_gguf
from splitserve.model.loader import BUNDLED_NAME, bundled_gguf_path
from splitserve.workload.requests import RequestSpec

RESULTS = Path("results")
LINKS = {"loopback": None, "1gbit": 1e9, "100mbit": 1e8}
LINK_LABELS = {"loopback": "loopback (unshaped)", "1gbit": "1 Gbit/s", "100mbit": "100 Mbit/s"}
MAX_PROMPT = 8190
LENGTHS = (512, 2048, MAX_PROMPT)
OUTPUT_TOKENS = 2
HEADLINE = ("1gbit", 2048)
PREFILL_PORT, DECODE_PORT, FRONTEND_PORT = 8100, 8200, 8000
EXPOSED = "splitserve_kv_transfer_exposed_seconds"
TRANSFER = "splitserve_kv_transfer_seconds"
BYTES = "splitserve_kv_transfer_bytes_total"
FAILURES = "splitserve_kv_transfer_failures_total"
# One request at a time: 1 GiB (~23k tokens of SmolLM2 KV) holds the largest prompt with room to spare.
KV_CACHE_GIB = "1.0"


# ------------------------------------------------------------------ pure helpers (tests/benchmarks)


def scrape(text: str) -> dict[str, float]:
    """Prometheus text -> {sample name: value}, summing over label sets (causes of failure, etc.)."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name] = out.get(s.name, 0.0) + s.value
    return out


def transfer_delta(before: dict[str, float], after: dict[str, float]) -> dict | None:
    """What one request's transfer added to the prefill worker's metrics; None while it is still running.

    A transfer ends in exactly one of: an observation of the transfer histograms, or a failure count."""
    def d(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    done, failed = d(TRANSFER + "_count"), d(FAILURES)
    if done + failed < 1:
        return None
    if failed:
        return {"ok": False, "exposed_s": None, "transfer_s": None, "bytes": None}
    # The exposed histogram is observed only when the last layer's compute time is known.
    exposed = d(EXPOSED + "_sum") if d(EXPOSED + "_count") >= 1 else None
    return {"ok": True, "exposed_s": exposed, "transfer_s": d(TRANSFER + "_sum"), "bytes": int(d(BYTES))}


def spread(values: list[float | None]) -> dict:
    """Median and range of the runs that produced a value."""
    xs = [v for v in values if v is not None]
    if not xs:
        return {"median": None, "min": None, "max": None, "runs": values}
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "runs": values}


def summarize_case(samples: list[dict], layers: int, link_bytes_per_s: float) -> dict:
    """Medians and ranges over the reps, with what the wire alone needs for these bytes: all of them
    (wire_s, what an unpipelined transfer exposes at best) and one layer's (the pipelined floor)."""
    keys = ("exposed_s", "prefill_s", "ttft_s", "kv_wait_s", "kv_done_after_ttft_s", "transfer_s")
    out = {k: spread([s.get(k) for s in samples]) for k in keys}
    out["exposed_fraction"] = fraction(out, "exposed_s")
    out["failures"] = sum(not s["ok"] for s in samples)
    nbytes = next((s["bytes"] for s in samples if s.get("bytes")), None)
    out["bytes"] = nbytes
    out["wire_s"] = nbytes / link_bytes_per_s if nbytes else None
    out["one_layer_wire_s"] = nbytes / layers / link_bytes_per_s if nbytes else None
    return out


def fraction(case: dict, key: str) -> float | None:
    """Median exposed time (by `key`) over median prefill time."""
    exposed, prefill = case[key]["median"], case["prefill_s"]["median"]
    return exposed / prefill if exposed is not None and prefill else None


def headline(cases: dict, link: str, tokens: int, key: str = "exposed_s") -> tuple[float | None, float | None]:
    """(exposed fraction, pipelining gain) of one case from its pipelined and unpipelined medians of `key`
    (exposed_s: the prefill worker's view; kv_done_after_ttft_s: the decode worker's)."""
    on, off = cases.get(f"{link}/pipelined/{tokens}"), cases.get(f"{link}/unpipelined/{tokens}")
    if on is None:
        return None, None
    exposed_on, exposed_off = on[key]["median"], off[key]["median"] if off else None
    gain = exposed_off / exposed_on if exposed_on and exposed_on > 0 and exposed_off is not None else None
    return fraction(on, key), gain


# ------------------------------------------------------------------ the deployment


def model_layers(model: str | None) -> int:
    """Layers of the served model, read from its config without loading weights."""
    path = Path(model) if model else bundled_gguf_path()
    if path.is_dir():
        return ModelSpec.from_hf_config(json.loads((path / "config.json").read_text())).num_layers
    return config_from_gguf(open_gguf(path)).num_layers


@dataclass
class Deployment:
    """Prefill worker in A (or B, for loopback), decode worker and frontend in B; all served on `link`."""

    link: Link
    loopback: bool
    pipelined: bool
    model: str | None
    secret_file: str
    log_dir: Path
    transfer: str = "tcp"

    def __post_init__(self) -> None:
        self.services: list[Service] = []
        p_ns, p_host = (self.link.b, "127.0.0.1") if self.loopback else (self.link.a, A_ADDR)
        d_host = "127.0.0.1" if self.loopback else B_ADDR
        self.prefill_url = f"http://{p_host}:{PREFILL_PORT}"
        self.decode_url = f"http://{d_host}:{DECODE_PORT}"
        self.url = f"http://127.0.0.1:{FRONTEND_PORT}"
        mode = "pipelined" if self.pipelined else "unpipelined"
        model = ["--model", self.model] if self.model else []
        common = ["--threads", "1", "--secret-file", self.secret_file, "--no-prefix-caching", "--transfer", self.transfer,
                  "--kv-cache-gib", KV_CACHE_GIB, "--log-level", "warning", *model]
        try:
            prefill = self._start(f"{mode}-prefill", p_ns, ["worker", "--role", "prefill", "--host", p_host,
                                  "--port", str(PREFILL_PORT), "--cpu", "0", *common,
                                  *([] if self.pipelined else ["--no-layer-pipelining"])])
            decode = self._start(f"{mode}-decode", self.link.b, ["worker", "--role", "decode", "--host", d_host,
                                 "--port", str(DECODE_PORT), "--cpu", "1", *common])
            prefill.wait_healthy(self.prefill_url)
            decode.wait_healthy(self.decode_url)
            # Every prompt goes to the prefill worker (the router would prefill short ones on the decode worker),
            # and a long unpipelined transfer at 100 Mbit/s must not pass the decode side's KV deadline.
            frontend = self._start(f"{mode}-frontend", self.link.b, [
                "serve", "--attach", self.prefill_url, self.decode_url, "--host", "127.0.0.1",
                "--port", str(FRONTEND_PORT), "--no-conditional", "--transfer-deadline", "300",
                "--log-level", "warning", *model])
            frontend.wait_healthy(self.url)
        except BaseException:
            self.stop()
            raise

    def _start(self, name: str, ns: str, argv: list[str]) -> Service:
        s = Service(name, argv, ns, self.log_dir)
        self.services.append(s)
        return s

    def stop(self) -> None:
        for s in reversed(self.services):  # the frontend first: it would only log its workers' deaths
            s.stop()


def measure(dep: Deployment, client: httpx.Client, prompt: list[int], timeout_s: float) -> dict:
    """One request; the caller's thread must be in namespace B (where the frontend listens)."""
    before = scrape(client.get(dep.prefill_url + "/metrics").text)
    r = client.post(dep.url + "/v1/completions", timeout=timeout_s, json={
        "prompt": prompt, "max_tokens": OUTPUT_TOKENS, "temperature": 0.0, "ignore_eos": True})
    if r.status_code != 200:
        raise RuntimeError(f"request failed: HTTP {r.status_code} {r.text[:300]}")
    rec = client.get(dep.url + "/debug/requests", params={"limit": 1}).json()[-1]
    if rec["path"] != "split" or rec["events"]:
        raise RuntimeError(f"request did not take the split path cleanly: {rec['path']} {rec['events']}")
    # The transfer outlives the response (the first token never waits for it): poll until it settles.
    end = time.monotonic() + timeout_s
    while (delta := transfer_delta(before, scrape(client.get(dep.prefill_url + "/metrics").text))) is None:
        if time.monotonic() > end:
            raise RuntimeError(f"transfer not settled {timeout_s:.0f} s after the response")
        time.sleep(0.25)
    sample = {**delta, **{k: rec[k] for k in ("prefill_s", "queue_s", "ttft_s", "reserve_s", "kv_wait_s", "decode_s")}}
    sample["prompt_tokens"] = rec["prompt_tokens"]
    if None not in (rec["reserve_s"], rec["kv_wait_s"], rec["ttft_s"]):
        sample["kv_done_after_ttft_s"] = rec["reserve_s"] + rec["kv_wait_s"] - rec["ttft_s"]
    return sample


def run_link(name: str, args: argparse.Namespace, prompt: Callable[[int], list[int]], layers: int,
             secret_file: str, log_dir: Path, cases: dict, links: dict) -> None:
    rate_bps = LINKS[name]
    with Link(rate_bps, tag=name) as link:
        src, dst = (link.b, "127.0.0.1") if rate_bps is None else (link.a, B_ADDR)
        # About two seconds of the link's worth of bytes: long enough that TCP's ramp-up does not show.
        rate = tcp_throughput(src, link.b, dst, int(min(256 << 20, (rate_bps or 1e12) / 8 * 2)))
        links[name] = {"configured_bps": rate_bps, "measured_bytes_per_s": rate}
        print(f"[{name}] one TCP stream: {rate * 8 / 1e9:.3f} Gbit/s", file=sys.stderr)
        for pipelined in (True, False):
            mode = "pipelined" if pipelined else "unpipelined"
            dep = Deployment(link, rate_bps is None, pipelined, args.model, secret_file, log_dir / name, args.transfer)
            samples: dict[int, list[dict]] = {n: [] for n in args.lengths}
            try:
                with entered(link.b), credentials().client(timeout=30.0) as client:
                    measure(dep, client, prompt(256), args.timeout)  # warm-up: KV connection, first-touch pages
                    for rep in range(args.reps):  # lengths inside reps: slow drifts in load hit every length
                        for n in args.lengths:
                            s = measure(dep, client, prompt(n), args.timeout)
                            samples[n].append(s)
                            print(f"[{name} {mode} {n}] rep {rep + 1}: exposed {_ms(s['exposed_s'])}, "
                                  f"prefill {s['prefill_s']:.2f} s, kv after ttft {_ms(s.get('kv_done_after_ttft_s'))}",
                                  file=sys.stderr)
            finally:
                dep.stop()
            for n, ss in samples.items():
                cases[f"{name}/{mode}/{n}"] = {"link": name, "mode": mode, "tokens": n,
                                               **summarize_case(ss, layers, rate), "samples": ss}


def _ms(x: float | None) -> str:
    return "n/a" if x is None else f"{x * 1e3:.0f} ms"


# ------------------------------------------------------------------ plot


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases, links = doc["cases"], doc["links"]
    colors = {"loopback": "#2ca02c", "1gbit": "#1f77b4", "100mbit": "#d62728"}
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.6))
    tiny = 1e-4  # log axes: a fully hidden transfer (0 s) is drawn at 0.1 ms

    def rows(link: str, mode: str) -> list[dict]:
        return sorted((c for c in cases.values() if c["link"] == link and c["mode"] == mode
                       and c["exposed_s"]["median"] is not None), key=lambda c: c["tokens"])

    for name in links:
        label = LINK_LABELS.get(name, name)
        for mode, style in (("pipelined", "-o"), ("unpipelined", "--s")):
            rs = rows(name, mode)
            if not rs:
                continue
            xs = [c["tokens"] for c in rs]
            med = [max(c["exposed_s"]["median"], tiny) for c in rs]
            err = [[m - max(c["exposed_s"]["min"], tiny) for m, c in zip(med, rs)],
                   [max(c["exposed_s"]["max"], tiny) - m for m, c in zip(med, rs)]]
            ax.errorbar(xs, med, yerr=err, fmt=style, color=colors.get(name), capsize=3, label=f"{label}, {mode}")
            if mode == "pipelined":
                ax.plot(xs, [c["one_layer_wire_s"] for c in rs], ":", color=colors.get(name), alpha=0.6,
                        label=f"{label}: one layer's bytes on the wire")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("exposed KV transfer, s (median, bars: min-max)")
    ax.set_title(f"exposed transfer (last layer computed -> last byte sent)\n1 Gbit/s, 2,048 tokens: "
                 f"exposed_fraction {_fmt(doc['exposed_fraction'])}, pipelining_gain {_fmt(doc['pipelining_gain'])}",
                 fontsize=9)
    ax.legend(fontsize=7)

    # The link-bound regime: at 100 Mbit/s sending a prompt's KV takes longer than computing it.
    name = "100mbit" if "100mbit" in links else next(iter(links))
    rs = rows(name, "pipelined")
    if rs:
        xs = [c["tokens"] for c in rs]
        bx.plot(xs, [c["prefill_s"]["median"] for c in rs], "-o", color="black", label="prefill compute")
        bx.plot(xs, [c["wire_s"] for c in rs], ":^", color="gray", label="KV bytes / measured link rate")
        for key, view, color in (("exposed_s", "sender view", colors.get(name)),
                                 ("kv_done_after_ttft_s", "decode view", "#9467bd")):
            for mode, style in (("pipelined", "-o"), ("unpipelined", "--s")):
                ex = [cases.get(f"{name}/{mode}/{n}", {}).get(key, {}).get("median") for n in xs]
                bx.plot(xs, [float("nan") if e is None else max(e, tiny) for e in ex], style, color=color,
                        label=f"exposed, {mode}, {view}")
        bx.set_xscale("log", base=2)
        bx.set_yscale("log")
        bx.set_xlabel("prompt tokens")
        bx.set_ylabel("seconds (median)")
        bx.set_title(f"{LINK_LABELS.get(name, name)}: once the wire takes longer than compute, pipelining hides only\n"
                     "compute's worth (sender view: to the socket; decode: KV complete - TTFT)", fontsize=9)
        bx.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3g}"


# ------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 rep, prompts 512 and 2,048, links 1gbit and 100mbit")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--links", default=",".join(LINKS), help=f"comma list of {', '.join(LINKS)}")
    ap.add_argument("--lengths", default=",".join(map(str, LENGTHS)), help=f"prompt tokens (at most {MAX_PROMPT})")
    ap.add_argument("--model", default=None, help="as for `splitserve serve` (default: bundled SmolLM2-135M)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per request and its transfer")
    ap.add_argument("--transfer", choices=["tcp", "nixl"], default="tcp", help="the KV transport under test")
    args = ap.parse_args()
    if args.quick:
        args.reps, args.links, args.lengths = 1, "1gbit,100mbit", "512,2048"
    args.lengths = [int(x) for x in args.lengths.split(",")]
    links = [x.strip() for x in args.links.split(",") if x.strip()]
    bad = [x for x in links if x not in LINKS] + [str(n) for n in args.lengths if not 0 < n <= MAX_PROMPT]
    if bad:
        raise SystemExit(f"unknown link or prompt length out of range: {', '.join(bad)}")
    if os.geteuid() != 0:
        raise SystemExit("needs root: it makes network namespaces and tc qdiscs")

    install_cleanup()
    if args.transfer == "nixl":
        # The workers inherit these: KV must cross the veth, not shared memory, and UCX must not offer the
        # peer its loopback address, which the other namespace cannot reach.
        os.environ["UCX_TLS"] = "tcp"
        os.environ["UCX_NET_DEVICES"] = DEV
    builder = PromptBuilder(find_vocab(args.model or BUNDLED_NAME, args.model), secrets.randbits(63))
    index = itertools.count()  # every prompt distinct: none finds another's KV anywhere

    def prompt(n: int) -> list[int]:
        return builder.build(next(index), RequestSpec(0.0, n, OUTPUT_TOKENS))

    log_dir = Path(tempfile.mkdtemp(prefix="splitserve-pipelining-"))
    secret_file = credentials().secret_file
    layers = model_layers(args.model)
    cases: dict = {}
    measured_links: dict = {}
    started = time.time()
    for name in links:
        run_link(name, args, prompt, layers, str(secret_file), log_dir, cases, measured_links)

    fraction, gain = headline(cases, *HEADLINE)
    fraction_decode, gain_decode = headline(cases, *HEADLINE, key="kv_done_after_ttft_s")
    doc = {
        "exposed_fraction": fraction,
        "pipelining_gain": gain,
        "exposed_fraction_decode_view": fraction_decode,
        "pipelining_gain_decode_view": gain_decode,
        "targets": {"exposed_fraction": "<= 0.02", "pipelining_gain": ">= 10"},
        "headline_case": {"link": HEADLINE[0], "tokens": HEADLINE[1]},
        "definitions": {
            "exposed_s": "prefill worker: last KV byte handed to the socket - last layer computed",
            "exposed_fraction": "median exposed_s / median prefill_s (headline: pipelined)",
            "pipelining_gain": "median unpipelined exposed_s / median pipelined exposed_s",
            "*_decode_view": "the same with kv_done_after_ttft_s in place of exposed_s",
            "kv_done_after_ttft_s": "decode side: KV complete - first token at the frontend (reserve_s + kv_wait_s - ttft_s)",
        },
        "setup": {
            "model": args.model or BUNDLED_NAME, "output_tokens": OUTPUT_TOKENS, "reps": args.reps,
            "lengths": args.lengths, "threads_per_worker": 1, "prefill_cpu": 0, "decode_cpu": 1,
            "shaping": "tc tbf on both veth ends", "prefix_caching": False, "cpus": os.cpu_count(),
            "transfer": args.transfer + (" (UCX_TLS=tcp)" if args.transfer == "nixl" else ""),
            "load_average_at_end": os.getloadavg(), "wall_s": time.time() - started, "logs": str(log_dir),
        },
        "links": measured_links,
        "cases": cases,
    }
    RESULTS.mkdir(exist_ok=True)
    stem = "pipelining" if args.transfer == "tcp" else f"pipelining-{args.transfer}"
    (RESULTS / f"{stem}.json").write_text(json.dumps(doc, indent=1))
    plot(doc, RESULTS / f"{stem}.png")
    medians = {k: {m: c[m]["median"] for m in ("exposed_s", "kv_done_after_ttft_s", "prefill_s")}
               for k, c in cases.items()}
    print(json.dumps({"exposed_fraction": fraction, "pipelining_gain": gain,
                      "exposed_fraction_decode_view": fraction_decode, "pipelining_gain_decode_view": gain_decode,
                      "medians": medians}))


if __name__ == "__main__":
    main()
