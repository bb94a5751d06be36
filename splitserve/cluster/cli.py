"""The command-line face of multi-node serving: `serve --ray ...` flags and `splitserve scale`.

Imports neither ray nor torch: `splitserve --help` and the single-machine path must not load them.
"""

from __future__ import annotations

import argparse

LOCAL = "local"  # `--ray` with no address: start a Ray instance on this machine


def add_ray_args(serve: argparse.ArgumentParser) -> None:
    g = serve.add_argument_group("Ray (many machines; needs `pip install splitserve[ray]`)")
    g.add_argument("--ray", nargs="?", const=LOCAL, default=None, metavar="ADDRESS",
                   help="place each worker as a Ray actor on the cluster at ADDRESS (host:port, or `auto` for "
                        "the one `ray start` made here); no ADDRESS: start a local Ray instance")
    g.add_argument("--prefill-resources", default=None, metavar="SPEC",
                   help="what each prefill worker asks Ray for: CPU=N,GPU=N,<custom>=N,label:<key>=<value> "
                        "(default CPU=1)")
    g.add_argument("--decode-resources", default=None, metavar="SPEC", help="the same for each decode worker")


def serve_ray(args: argparse.Namespace) -> int:
    """`serve --ray`: Ray is imported only here."""
    try:
        import ray  # noqa: F401
    except ModuleNotFoundError:
        raise SystemExit("--ray needs Ray: pip install 'splitserve[ray]' (or: pip install -r requirements-ray.txt)") from None
    from splitserve.cluster.ray_launcher import serve_on_ray

    local = {"address": "local", "include_dashboard": False}  # a new Ray instance on this machine
    return serve_on_ray(args, local if args.ray == LOCAL else {"address": args.ray})


def add_scale_parser(sub: argparse._SubParsersAction) -> None:
    scale = sub.add_parser("scale", help="resize the pools of a running `serve --ray` deployment")
    scale.add_argument("--url", default="http://127.0.0.1:8000", help="the deployment's frontend")
    scale.add_argument("--prefill", type=int, default=None, help="prefill workers wanted (default: unchanged)")
    scale.add_argument("--decode", type=int, default=None, help="decode workers wanted (default: unchanged)")
    scale.add_argument("--admin-token-file", required=True, metavar="FILE",
                       help="the operator token the deployment was started with (serve --admin-token-file)")
    scale.add_argument("--timeout", type=float, default=900.0,
                       help="seconds to wait: new workers must join, surplus ones finish their requests")
    scale.set_defaults(handler=_scale)


def _scale(args: argparse.Namespace) -> int:
    from splitserve.cluster.scale_client import scale

    return scale(args.url, args.prefill, args.decode, args.timeout, args.admin_token_file)
