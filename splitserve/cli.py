"""`splitserve` command line: serve, bench, plan."""

# Only the parser is built at start, from torch-free modules; a command imports what it runs when it
# runs, so `splitserve --help`, `bench` and `plan` never load torch (tests/test_torch_free_start.py).

from __future__ import annotations

import argparse
import sys

from splitserve.bench.cli import add_parser as add_bench
from splitserve.cluster.cli import add_ray_args, add_scale_parser, serve_ray
from splitserve.plan.cli import add_parser as add_plan
from splitserve.runtime.config import add_serve_args, add_worker_args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="splitserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP service (router + worker pools)")
    add_serve_args(serve)
    add_ray_args(serve)
    serve.set_defaults(handler=_serve)

    worker = sub.add_parser("worker", help="one worker process (normally started by `serve`)")
    add_worker_args(worker)
    worker.set_defaults(handler=_worker)

    add_bench(sub)
    add_plan(sub)
    add_scale_parser(sub)
    return parser


def _serve(args: argparse.Namespace) -> int:
    if args.ray is not None:
        return serve_ray(args)
    from splitserve.runtime.launch import serve

    return serve(args)


def _worker(args: argparse.Namespace) -> int:
    from splitserve.runtime.launch import run_worker

    return run_worker(args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
