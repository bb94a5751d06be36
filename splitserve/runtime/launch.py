"""Starting a service from parsed command-line arguments."""

from __future__ import annotations

import argparse
import logging

import torch

from splitserve.runtime.async_engine import AsyncEngine
from splitserve.runtime.engine import Engine

log = logging.getLogger("splitserve")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_engine(args: argparse.Namespace) -> Engine:
    from splitserve.cli import engine_config
    from splitserve.model.loader import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model, dtype=DTYPES[args.dtype], device=args.device)
    if args.served_model_name:
        loaded.name = args.served_model_name
    return Engine(loaded, engine_config(args))


def serve_colocated(args: argparse.Namespace) -> int:
    from splitserve.runtime.frontend import create_app, run_server

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        engine = AsyncEngine(build_engine(args)).start()
    except (FileNotFoundError, ValueError) as exc:
        log.error("cannot start: %s", exc)
        return 2
    try:
        run_server(create_app(engine), args.host, args.port, args.log_level)
    finally:
        engine.shutdown()
    return 0
