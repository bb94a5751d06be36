"""`splitserve` command line: serve, bench, plan."""

from __future__ import annotations

import argparse
import sys

from splitserve.runtime.engine import GiB, EngineConfig


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
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
    g.add_argument("--chunked-prefill", action="store_true", help="split long prompts across steps")
    g.add_argument("--no-prefix-caching", action="store_true")
    g.add_argument("--max-waiting", type=int, default=256, help="queue cap; beyond it requests get 429")


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
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="splitserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP service")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--log-level", default="info")
    add_engine_args(serve)
    serve.set_defaults(handler=_serve)

    from splitserve.bench.cli import add_parser as add_bench

    add_bench(sub)
    return parser


def _serve(args: argparse.Namespace) -> int:
    from splitserve.runtime.launch import serve_colocated

    return serve_colocated(args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
