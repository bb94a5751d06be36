"""KV transfer throughput: splitserve's tcp, shm and nixl transports against a raw socket blast of the same bytes.

The KV of a 2,048-token SmolLM2-135M prompt (30 layers, 3 KV heads, head dim 64, fp32, 16-token
blocks: 94 MB) moves from a sender process to a receiver process over loopback, layer by layer, from
scattered source blocks into scattered destination blocks. Two baselines on plain blocking sockets:
  raw        one contiguous buffer sent in one call, read into one buffer: what the wire gives with no
             framing, no scatter, no bookkeeping (wire_ratio = tcp / raw);
  raw_paged  the same paged blocks as ours, one scatter-gather stream, no protocol: separates what the
             paged layout costs from what our framing, threads and acks cost (paged_ratio = tcp / raw_paged).
nixl (when NIXL is installed): one WRITE per layer through UCX between the two processes' agents, with
its notifications (nixl_ratio = nixl / raw). Each repetition runs them all back to back, so drift in
machine load hits them alike.

    python -m benchmarks.transfer [--reps 7] [--tokens 2048] [--device cuda]

--device cuda (benchmarks/gpu_check.sh): both caches in GPU memory; tcp and shm stage each layer through
pinned host buffers, nixl WRITEs VRAM -> VRAM; the raw baselines stay host to host (raw_paged is left out).

Writes results/transfer.json and results/transfer.png; the last line printed is a JSON summary.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import socket
import statistics
import threading
import time
from pathlib import Path
from typing import Callable

import torch

from splitserve.core.model_spec import ModelSpec
from splitserve.model.kv_cache import PagedKVCache
from splitserve.transfer import KVLayout, KVReceiver, KVSender
from splitserve.transfer.channel import IOV_MAX, consume
from splitserve.transfer.layout import CacheBytes
from splitserve.transfer.nixl_agent import module_name
from splitserve.transfer.staging import Staging, device_for

TRANSPORTS = ("tcp", "shm", "nixl") if module_name() else ("tcp", "shm")

SMOLLM2_135M = ModelSpec(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9, num_kv_heads=3,
    head_dim=64, rms_norm_eps=1e-5, rope_theta=100000.0, rope_scaling=None, max_position_embeddings=8192,
    tie_word_embeddings=True, attention_bias=False, architecture="llama",
)
BLOCK_SIZE = 16
SECRET = b"benchmark-secret"
FINGERPRINT = "smollm2-135m"
RESULTS = Path("results")


def make_cache(num_blocks: int, fill: bool, device: str = "cpu") -> PagedKVCache:
    cache = PagedKVCache(SMOLLM2_135M, num_blocks, BLOCK_SIZE, torch.float32, device)
    if fill:
        cache.tensor.copy_(torch.randn(cache.tensor.shape, generator=torch.Generator().manual_seed(0)))
    return cache


def digest(cache: PagedKVCache, block_ids: list[int]) -> str:
    return hashlib.blake2b(cache.tensor[:, block_ids].contiguous().cpu().numpy().tobytes(), digest_size=16).hexdigest()


def receiver_proc(conn, num_blocks: int, nbytes: int, dst_ids: list[int], device: str = "cpu") -> None:
    cache = make_cache(num_blocks, fill=False, device=device)
    layout = KVLayout.from_cache(cache, FINGERPRINT)
    receivers = {t: KVReceiver(cache, layout, SECRET, transport=t) for t in TRANSPORTS}
    for r in receivers.values():
        r.start()
    contiguous = memoryview(bytearray(nbytes))
    sinks = {"raw": lambda: [contiguous]}
    if device == "cpu":
        paged = CacheBytes(cache, layout)
        sinks["raw_paged"] = lambda: [v for layer in range(layout.num_layers) for v in paged.views(layer, dst_ids)]
    endpoints = {t: r.endpoint for t, r in receivers.items()}
    for name, buffers in sinks.items():
        server = socket.create_server(("127.0.0.1", 0))
        threading.Thread(target=raw_sink, args=(server, buffers), daemon=True).start()
        endpoints[name] = f"127.0.0.1:{server.getsockname()[1]}"
    conn.send(endpoints)
    while True:
        cmd, *args = conn.recv()
        if cmd == "expect":
            transport, tid = args
            receivers[transport].expect(tid, dst_ids, time.monotonic() + 60)
            conn.send("ok")
        elif cmd == "digest":
            conn.send(digest(cache, dst_ids))
        elif cmd == "zero":
            cache.tensor[:, dst_ids] = 0
            conn.send("ok")
        else:
            break
    for r in receivers.values():
        r.close()


def raw_sink(server: socket.socket, buffers: Callable[[], list[memoryview]]) -> None:
    """A plain blocking socket reading each transfer into `buffers()`, then answering one byte."""
    sock, _ = server.accept()
    while True:
        bufs = buffers()
        while bufs:
            n = sock.recvmsg_into(bufs[:IOV_MAX])[0]
            if not n:
                return
            consume(bufs, n)
        sock.sendall(b"!")


def sender_proc(conn, num_blocks: int, nbytes: int, src_ids: list[int], device: str = "cpu") -> None:
    cache = make_cache(num_blocks, fill=True, device=device)
    layout = KVLayout.from_cache(cache, FINGERPRINT)
    staging = Staging(dev, layout.block_bytes) if (dev := device_for(cache.tensor)) else None
    sender = KVSender(layout, SECRET, timeout=30.0, staging=staging)
    # The contiguous baseline sends real data (the first blocks' bytes), not never-touched zero pages.
    blob = memoryview(cache.tensor[:, : len(src_ids)].contiguous().cpu().view(torch.uint8).numpy().reshape(-1))
    sources = {"raw": lambda: [blob]}
    if device == "cpu":
        paged = CacheBytes(cache, layout)
        sources["raw_paged"] = lambda: [v for layer in range(layout.num_layers) for v in paged.views(layer, src_ids)]
    raw: dict[str, socket.socket] = {}
    while True:
        cmd, *args = conn.recv()
        if cmd in sources:
            if cmd not in raw:
                host, port = args[0].rsplit(":", 1)
                raw[cmd] = socket.create_connection((host, int(port)))
            sock = raw[cmd]
            t0 = time.perf_counter()
            bufs = sources[cmd]()
            while bufs:
                consume(bufs, sock.sendmsg(bufs[:IOV_MAX]))
            assert sock.recv(1) == b"!"
            conn.send(time.perf_counter() - t0)
        elif cmd == "send":
            endpoint, tid = args
            t0 = time.perf_counter()
            ticket = sender.start_ticket(endpoint, tid, len(src_ids))
            for layer in range(layout.num_layers):
                ticket.send_layer(layer, cache, src_ids)
            ticket.finish()
            ok = ticket.wait(60)
            conn.send((time.perf_counter() - t0, ok, ticket.error, ticket.bytes_sent))
        elif cmd == "digest":
            conn.send(digest(cache, src_ids))
        else:
            break
    sender.close()


def summarize(seconds: list[float], nbytes: int) -> dict:
    gbps = sorted(nbytes * 8 / s / 1e9 for s in seconds)
    q = statistics.quantiles(gbps, n=4) if len(gbps) > 1 else [gbps[0]] * 3
    return {
        "seconds": seconds,
        "gbps": gbps,
        "median_gbps": statistics.median(gbps),
        "min_gbps": gbps[0],
        "max_gbps": gbps[-1],
        "iqr_gbps": q[2] - q[0],
        "median_gigabytes_per_s": statistics.median(gbps) / 8,
    }


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in ["raw", "raw_paged", "tcp", "shm", "nixl"] if n in summary["results"]]
    labels = {"raw": "raw socket\n(contiguous)", "raw_paged": "raw socket\n(paged blocks)", "tcp": "splitserve\ntcp",
              "shm": "splitserve\nshm", "nixl": "splitserve\nnixl (UCX)"}
    colors = {"raw": "#999999", "raw_paged": "#cccccc", "tcp": "#1f77b4", "shm": "#2ca02c", "nixl": "#76b900"}
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, name in enumerate(names):
        r = summary["results"][name]
        ax.bar(i, r["median_gbps"], color=colors[name], alpha=0.8)
        ax.scatter([i] * len(r["gbps"]), r["gbps"], color="black", s=10, zorder=3)
    ax.set_xticks(range(len(names)), [labels[n] for n in names])
    ax.set_ylabel("throughput, Gbit/s (median bar, dots = runs)")
    ax.set_title(
        f"KV of a {summary['tokens']}-token SmolLM2-135M prompt ({summary['bytes'] / 1e6:.0f} MB), loopback, caches on {summary['device']}\n"
        f"wire_ratio (tcp / raw) = {summary['wire_ratio']:.2f}"
        + (f", paged_ratio (tcp / raw paged) = {summary['paged_ratio']:.2f}" if "paged_ratio" in summary else "")
        + (f", nixl / raw = {summary['nixl_ratio']:.2f}" if "nixl_ratio" in summary else ""),
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--device", default="cpu", help="where both KV caches live: cpu or cuda[:N]")
    args = ap.parse_args()

    num_prompt_blocks = -(-args.tokens // BLOCK_SIZE)
    num_blocks = 2 * num_prompt_blocks + 8
    layout_bytes = PagedKVCache.bytes_per_block(SMOLLM2_135M, BLOCK_SIZE, torch.float32)
    nbytes = num_prompt_blocks * layout_bytes
    # Scattered on both sides, different ids: the realistic case, not one contiguous run.
    g = torch.Generator().manual_seed(1)
    src_ids = torch.randperm(num_blocks, generator=g)[:num_prompt_blocks].tolist()
    dst_ids = torch.randperm(num_blocks, generator=g)[:num_prompt_blocks].tolist()

    ctx = mp.get_context("spawn")
    r_conn, r_child = ctx.Pipe()
    s_conn, s_child = ctx.Pipe()
    procs = [
        ctx.Process(target=receiver_proc, args=(r_child, num_blocks, nbytes, dst_ids, args.device), daemon=True),
        ctx.Process(target=sender_proc, args=(s_child, num_blocks, nbytes, src_ids, args.device), daemon=True),
    ]
    for p in procs:
        p.start()
    endpoints = r_conn.recv()

    baselines = ("raw", "raw_paged") if args.device == "cpu" else ("raw",)
    samples: dict[str, list[float]] = {name: [] for name in (*baselines, *TRANSPORTS)}
    seq = 0

    def run(name: str) -> float:
        nonlocal seq
        if name.startswith("raw"):
            s_conn.send((name, endpoints[name]))
            return s_conn.recv()
        seq += 1
        tid = f"{name}-{seq}"
        r_conn.send(("expect", name, tid))
        r_conn.recv()
        s_conn.send(("send", endpoints[name], tid))
        elapsed, ok, error, sent = s_conn.recv()
        if not ok or sent != nbytes:
            raise RuntimeError(f"{name} transfer failed: {error} ({sent} of {nbytes} bytes)")
        return elapsed

    verified = {}
    for name in samples:  # warm-up (connections, handshakes, first-touch page faults) and a byte check
        r_conn.send(("zero",))
        r_conn.recv()
        run(name)
        if name != "raw":  # raw lands in a plain buffer, not in the cache
            s_conn.send(("digest",))
            r_conn.send(("digest",))
            verified[name] = s_conn.recv() == r_conn.recv()
    for _ in range(args.reps):
        for name in samples:
            samples[name].append(run(name))
    for c in (s_conn, r_conn):
        c.send(("stop",))
    for p in procs:
        p.join(timeout=10)

    results = {name: summarize(s, nbytes) for name, s in samples.items()}

    def paired(base: str, ours: str) -> float:
        """Median over repetitions of ours/base throughput: each pair ran back to back, so slow drifts cancel."""
        return statistics.median(b / o for b, o in zip(samples[base], samples[ours]))
    summary = {
        "units": "Gbit/s (1e9 bits per second); seconds from the first send call to the receiver's confirmation",
        "tokens": args.tokens,
        "bytes": nbytes,
        "block_size": BLOCK_SIZE,
        "layers": SMOLLM2_135M.num_layers,
        "reps": args.reps,
        "cpus": os.cpu_count(),
        "device": args.device,
        "gpu": torch.cuda.get_device_name(torch.device(args.device)) if args.device.startswith("cuda") else None,
        "bytes_verified_equal": verified,
        "results": results,
        "wire_ratio": results["tcp"]["median_gbps"] / results["raw"]["median_gbps"],
        # Each repetition ran raw then tcp back to back: per-pair ratios cancel slow drifts in machine load.
        "wire_ratio_paired_median": paired("raw", "tcp"),
        **({"paged_ratio": results["tcp"]["median_gbps"] / results["raw_paged"]["median_gbps"],
            "paged_ratio_paired_median": paired("raw_paged", "tcp")} if "raw_paged" in results else {}),
        "shm_ratio": results["shm"]["median_gbps"] / results["raw"]["median_gbps"],
    }
    if "nixl" in results:
        summary["nixl_ratio"] = results["nixl"]["median_gbps"] / results["raw"]["median_gbps"]
        summary["nixl_ratio_paired_median"] = paired("raw", "nixl")
    RESULTS.mkdir(exist_ok=True)
    stem = "transfer" if args.device == "cpu" else "transfer-cuda"
    (RESULTS / f"{stem}.json").write_text(json.dumps(summary, indent=2))
    plot(summary, RESULTS / f"{stem}.png")
    for name, r in results.items():
        print(f"{name:>9}: median {r['median_gbps']:6.2f} Gbit/s  range [{r['min_gbps']:.2f}, {r['max_gbps']:.2f}]  IQR {r['iqr_gbps']:.2f}")
    print(json.dumps({
        "wire_ratio": round(summary["wire_ratio"], 3),
        "tcp_gbps": round(results["tcp"]["median_gbps"], 2),
        "raw_gbps": round(results["raw"]["median_gbps"], 2),
        "shm_gbps": round(results["shm"]["median_gbps"], 2),
        **({"raw_paged_gbps": round(results["raw_paged"]["median_gbps"], 2),
            "paged_ratio": round(summary["paged_ratio"], 3)} if "raw_paged" in results else {}),
        "wire_ratio_paired_median": round(summary["wire_ratio_paired_median"], 3),
        "shm_ratio": round(summary["shm_ratio"], 3),
        **({"nixl_gbps": round(results["nixl"]["median_gbps"], 2), "nixl_ratio": round(summary["nixl_ratio"], 3),
            "nixl_ratio_paired_median": round(summary["nixl_ratio_paired_median"], 3)} if "nixl" in results else {}),
        "bytes": nbytes,
        "reps": args.reps,
        "bytes_verified_equal": all(verified.values()),
    }))


if __name__ == "__main__":
    main()
