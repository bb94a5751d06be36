"""`splitserve serve --ray [ADDRESS]`: the frontend/router in this process (the Ray driver), each
worker of each pool a Ray actor placed with its pool's resources. Everything else — the frontend, the
router, the workers, KV transfer, join and drain — is the single-machine code, called unchanged."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import secrets
from pathlib import Path

import ray
from fastapi import FastAPI
from ray.actor import ActorHandle

from splitserve.cluster.actor_pool import ROLES, ActorPools
from splitserve.cluster.admin import attach_actor_pools
from splitserve.cluster.resources import parse_resources
from splitserve.cluster.worker_actor import WorkerActor
from splitserve.runtime.config import worker_argv
from splitserve.runtime.frontend.pool_client import PoolClient
from splitserve.runtime.launch import serve_pools, setup_logging

log = logging.getLogger(__name__)

# A surplus worker drains for up to its own 600 s limit; SIGKILL only if it overruns that.
DRAIN_GRACE_S = 630.0


def serve_on_ray(args: argparse.Namespace, ray_init: dict) -> int:
    """Serve until SIGINT/SIGTERM on the Ray cluster `ray.init(**ray_init)` joins; 2 if the pools could not start."""
    setup_logging(args.log_level)
    _check_flags(args)
    try:
        resources = {role: parse_resources(getattr(args, f"{role}_resources")) for role in ROLES}
    except ValueError as exc:
        raise SystemExit(f"--prefill-resources / --decode-resources: {exc}") from None
    secret = Path(args.secret_file).read_bytes().strip() if args.secret_file else secrets.token_hex(32).encode()
    ray.init(**ray_init)
    try:
        router_url = _router_url(args)
        actor_class = ray.remote(WorkerActor)

        def make_actor(role: str) -> ActorHandle:
            pool = resources[role]
            argv = worker_argv(args, threads=args.threads or pool.threads())
            return actor_class.options(**pool.actor_options()).remote(role, router_url, secret, argv)

        failure: list[str] = []

        def on_startup_failed(message: str) -> None:
            log.error("cannot start: %s", message)
            failure.append(message)

        def install(app: FastAPI, engine: PoolClient) -> None:
            pools = ActorPools(engine, make_actor, join_timeout_s=args.startup_timeout, drain_grace_s=DRAIN_GRACE_S)
            attach_actor_pools(app, pools, {"prefill": args.prefill or 1, "decode": args.decode or 1}, on_startup_failed)

        try:
            code = serve_pools(args, [], secret, on_app=install)
        except SystemExit:
            # After a failed start the server stops on the SIGTERM it raised, which comes back here.
            if not failure:
                raise
        return 2 if failure else code
    finally:
        ray.shutdown()


def _check_flags(args: argparse.Namespace) -> None:
    if args.attach or args.colocated or args.in_process or args.pin:
        raise SystemExit("--ray runs prefill and decode pools: it does not combine with --attach, --colocated, --in-process or --pin")
    if bool(args.prefill) != bool(args.decode):
        raise SystemExit("--ray needs both --prefill N and --decode M (or neither, for 1 and 1)")
    if args.transfer != "tcp":
        raise SystemExit("--ray needs --transfer tcp: KV crosses nodes, and shared memory does not")


def _router_url(args: argparse.Namespace) -> str:
    """The frontend's URL as workers on any node reach it: this node's address when serving on all."""
    host = args.host
    if host in ("0.0.0.0", "::", ""):
        host = ray.util.get_node_ip_address()
    elif _is_loopback(host):
        elsewhere = {n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]} - {host}
        if any(not _is_loopback(ip) for ip in elsewhere):
            raise SystemExit(
                f"--host {host} cannot be reached from the cluster's other nodes ({', '.join(sorted(elsewhere))}): "
                "serve on --host 0.0.0.0 or this node's address"
            )
    return f"http://{host}:{args.port}"


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
