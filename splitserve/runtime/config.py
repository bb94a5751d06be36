"""The flags of `serve` and `worker`, and the engine's configuration they make.

Also the way back, config → flags: `serve` starts each worker as `splitserve worker` with the engine the
user asked for (`worker_argv`). Torch-free, like everything a parser needs: `splitserve --help`, `bench`
and `plan` build the whole command line from here without loading the engine.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

GiB = 1 << 30
ENGINE_GROUP = "engine"


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = 16
    num_blocks: int | None = None  # default: as many as kv_cache_bytes holds
    kv_cache_bytes: int = 1 * GiB
    max_model_len: int | None = None  # default: the model's, capped at 8192
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    # On, as in vLLM: a step holds at most max_num_batched_tokens, so prompts arriving together cannot stall
    # running decodes for a whole batch of prefills (a chunk that continues a prompt costs one context read).
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True
    max_waiting: int = 256
    # Prompt tokens a step may compute while requests decode (None: only max_num_batched_tokens). A decode
    # worker defaults to DECODE_PREFILL_CHUNK: see build_engine.
    prefill_tokens_while_decoding: int | None = None


# A decode worker's prompts (recomputes after a failed transfer, local prefills) go this many tokens a step
# while it decodes: on one core of this machine 32 prompt tokens cost about one batch-1 decode step
# (~330 prompt tok/s vs 55-120 ms a decode step), so a running request's inter-token gap stays within about
# two decode steps instead of a whole prompt's prefill (a 1,000-token recompute stalled every running
# request for 3 s quiet, 9-16 s at load 10: issue 19).
DECODE_PREFILL_CHUNK = 32


def add_serve_args(serve: argparse.ArgumentParser) -> None:
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--log-level", default="info")
    pools = serve.add_argument_group("deployment (default: 1 prefill + 1 decode with >= 2 cores, else --in-process)")
    pools.add_argument("--prefill", type=int, default=0, help="prefill worker processes")
    pools.add_argument("--decode", type=int, default=0, help="decode worker processes")
    pools.add_argument("--colocated", type=int, default=0, help="colocated worker processes (the baseline)")
    pools.add_argument("--in-process", action="store_true", help="one colocated engine inside the frontend process")
    pools.add_argument("--attach", nargs="+", metavar="URL", default=None,
                       help="serve over workers already running (`splitserve worker`) at these URLs; start none")
    pools.add_argument("--pin", action="store_true", help="pin each worker to its own core")
    routing = serve.add_argument_group("routing")
    routing.add_argument("--router-policy", choices=["round_robin", "least_loaded", "kv_aware"], default="kv_aware")
    routing.add_argument("--no-conditional", action="store_true",
                         help="always prefill on a prefill worker (default: the cost model may choose the decode worker)")
    routing.add_argument("--overlap-weight", type=float, default=1.0, help="kv_aware: weight of uncached prompt blocks")
    routing.add_argument("--link-gbps", type=float, default=10.0, help="KV link speed prior, until transfers measure it")
    pools.add_argument("--on-transfer-failure", choices=["recompute", "fail"], default="recompute",
                       help="a failed KV transfer: prefill again on the decode worker, or fail the request")
    pools.add_argument("--transfer-deadline", type=float, default=10.0,
                       help="seconds a decode worker holds a reservation for KV to arrive (plus --transfer-deadline-per-token)")
    pools.add_argument("--transfer-deadline-per-token", type=float, default=0.01)
    pools.add_argument("--startup-timeout", type=float, default=300.0, help="seconds to wait for workers' health")
    security = serve.add_argument_group("security (README: Security)")
    security.add_argument("--api-key", action="append", default=None, metavar="KEY",
                          help="require `Authorization: Bearer KEY` on /v1/* (repeat for several keys; "
                               "also read from SPLITSERVE_API_KEY)")
    security.add_argument("--admin-token-file", default=None, metavar="FILE",
                          help="operator token for /admin/* and /debug/* (without it, only the deployment's own "
                               "workers may call /admin/*, and /debug/* is closed)")
    security.add_argument("--ssl-keyfile", default=None, help="serve the public port over TLS with this key ...")
    security.add_argument("--ssl-certfile", default=None, help="... and this certificate")
    security.add_argument("--max-body-mb", type=float, default=4.0, help="request bodies over this are refused with 413")
    add_transfer_args(serve)
    add_engine_args(serve)


def add_worker_args(worker: argparse.ArgumentParser) -> None:
    worker.add_argument("--role", choices=["prefill", "decode", "colocated"], required=True)
    worker.add_argument("--host", default="127.0.0.1")
    worker.add_argument("--port", type=int, default=8100)
    worker.add_argument("--log-level", default="info")
    worker.add_argument("--cpu", type=int, default=None, help="pin to this core")
    worker.add_argument("--router", default=None, metavar="URL",
                        help="join the deployment whose frontend/router is at URL (and drain through it on SIGTERM)")
    worker.add_argument("--advertise", default=None, metavar="URL",
                        help="the URL the router reaches this worker at (default: http://HOST:PORT)")
    add_transfer_args(worker)
    add_engine_args(worker)


def add_transfer_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("KV transfer")
    g.add_argument("--transfer", choices=["tcp", "shm", "nixl"], default="tcp",
                   help="KV transport (shm: same host only; nixl: NIXL/UCX WRITEs into the decode cache, splitserve[nixl])")
    g.add_argument("--no-layer-pipelining", dest="layer_pipelining", action="store_false",
                   help="send KV after the last layer instead of layer by layer (the baseline)")
    g.add_argument("--secret-file", default=None,
                   help="per-deployment secret: signs every control-plane call and authenticates KV connections "
                        "(serve: default generated; a worker and serve --attach need it)")


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(ENGINE_GROUP)
    g.add_argument("--model", default=None, help="HF checkpoint directory or .gguf file (default: bundled SmolLM2-135M-Instruct)")
    g.add_argument("--served-model-name", default=None, help="name clients use in `model` (default: from the checkpoint)")
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    g.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    g.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    g.add_argument("--kv-cache-gib", type=float, default=1.0, help="memory for the KV cache")
    g.add_argument("--num-blocks", type=int, default=None, help="KV blocks (overrides --kv-cache-gib)")
    g.add_argument("--max-model-len", type=int, default=None, help="context length limit (default: model's, at most 8192)")
    g.add_argument("--max-num-seqs", type=int, default=64, help="cap on running requests")
    g.add_argument("--max-num-batched-tokens", type=int, default=2048, help="token budget per step")
    g.add_argument("--chunked-prefill", action="store_true", default=True,
                   help="split prompts across steps to keep each step within --max-num-batched-tokens (the default)")
    g.add_argument("--no-chunked-prefill", dest="chunked_prefill", action="store_false",
                   help="schedule every prompt whole (a step may then hold up to --max-model-len tokens)")
    g.add_argument("--prefill-chunk-while-decoding", type=int, default=None, metavar="TOKENS",
                   help="prompt tokens per step while requests decode (default: %d on decode workers, "
                        "no cap elsewhere)" % DECODE_PREFILL_CHUNK)
    g.add_argument("--no-prefix-caching", action="store_true")
    g.add_argument("--max-waiting", type=int, default=256, help="queue cap; beyond it requests get 429")
    g.add_argument("--step-log-dir", default=None, metavar="DIR",
                   help="append every engine step (start, seconds, batch) to DIR/steps-ROLE-PID.jsonl")


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        block_size=args.block_size,
        num_blocks=args.num_blocks,
        kv_cache_bytes=int(args.kv_cache_gib * GiB),
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        enable_chunked_prefill=args.chunked_prefill,
        enable_prefix_caching=not args.no_prefix_caching,
        max_waiting=args.max_waiting,
        prefill_tokens_while_decoding=args.prefill_chunk_while_decoding,
    )


def engine_argv(args: argparse.Namespace, skip: tuple[str, ...] = ()) -> list[str]:
    """The engine options of `args` as command-line words, to start a worker with the same engine."""
    probe = argparse.ArgumentParser(add_help=False)
    add_engine_args(probe)
    argv: list[str] = []
    for action in probe._actions:
        value = getattr(args, action.dest, None)
        if action.dest in skip or value is None or value == action.default:
            continue
        flag = action.option_strings[0]
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            # A switch says its value only when set to its own constant (--no-chunked-prefill: False).
            argv += [flag] if value == action.const else []
        else:
            argv += [flag, str(value)]
    return argv


def worker_argv(args: argparse.Namespace, threads: int) -> list[str]:
    """A deployment's worker options beyond role, address and secret: transfer, logging, engine."""
    argv = ["--transfer", args.transfer, "--threads", str(threads), "--log-level", args.log_level,
            *engine_argv(args, skip=("threads",))]
    if not args.layer_pipelining:
        argv.append("--no-layer-pipelining")
    return argv


def worker_command(role: str, host: str, port: int, secret_file: str, argv: list[str]) -> list[str]:
    """The `splitserve worker` command line of one worker, in this Python."""
    return [sys.executable, "-m", "splitserve", "worker", "--role", role, "--host", host, "--port", str(port),
            "--secret-file", secret_file, *argv]
