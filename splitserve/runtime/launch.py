"""Starting services from parsed command-line arguments: one worker, or a whole deployment.

`serve` with pools starts each worker as its own OS process, waits for their health, runs the frontend
in this process, and takes every worker down with it (SIGINT/SIGTERM, or this process dying: workers
get SIGTERM from the kernel through PR_SET_PDEATHSIG), so no worker is ever orphaned.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import secrets
import signal
import subprocess
import tempfile
import threading
from dataclasses import replace
from pathlib import Path
from typing import AsyncIterator, Callable

import torch
import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from splitserve.runtime.auth import Guard, Rule, Verifier
from splitserve.runtime.config import DECODE_PREFILL_CHUNK, engine_config, worker_argv, worker_command
from splitserve.runtime.frontend.pool_client import PoolConfig, PoolClient
from splitserve.runtime.supervisor import Supervisor
from splitserve.runtime.process import (
    dies_with_parent,
    free_port,
    freeze_startup_heap,
    stop_processes,
    terminate_on_signals,
    wait_healthy,
)
from splitserve.runtime.wire import WorkerError
from splitserve.runtime.worker.async_engine import AsyncEngine
from splitserve.runtime.worker.engine import Engine

log = logging.getLogger("splitserve")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # httpx logs every request at INFO: the frontend's background polls of each worker (10 a second per
    # worker) filled 1.8 MB of log in 10 minutes. Its warnings and errors still show.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger().level))


def build_engine(args: argparse.Namespace, role: str = "colocated") -> Engine:
    from splitserve.model.loader import load_model
    from splitserve.runtime.worker.kernel_caches import bound_kernel_caches
    from splitserve.runtime.worker.step_log import StepLog

    bound_kernel_caches()  # before the model first runs: the caches read their size once
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model, dtype=DTYPES[args.dtype], device=args.device)
    if args.served_model_name:
        loaded.name = args.served_model_name
    config = engine_config(args)
    if role == "decode" and config.prefill_tokens_while_decoding is None:
        config = replace(config, prefill_tokens_while_decoding=DECODE_PREFILL_CHUNK)
    engine = Engine(loaded, config)
    if args.step_log_dir:
        engine.step_observers.append(StepLog(args.step_log_dir, role).observe)
    return engine


def serve(args: argparse.Namespace) -> int:
    setup_logging(args.log_level)
    if args.attach:
        if args.secret_file is None:
            raise SystemExit("serve --attach needs --secret-file: the attached workers' deployment secret signs every call to them")
        return serve_pools(args, [url.rstrip("/") for url in args.attach], read_secret(args.secret_file))
    pools = _pool_sizes(args)
    if pools is None:
        return _serve_in_process(args)
    return _spawn_and_serve(args, *pools)


def _pool_sizes(args: argparse.Namespace) -> tuple[int, int, int] | None:
    """(prefill, decode, colocated) worker processes, or None for one engine inside this process."""
    if args.in_process:
        return None
    if args.prefill or args.decode:
        if not (args.prefill and args.decode):
            raise SystemExit("a split deployment needs both --prefill N and --decode M (N, M >= 1)")
        return args.prefill, args.decode, 0
    if args.colocated:
        return 0, 0, args.colocated
    # The default: split when there are cores to give each phase its own; otherwise one engine.
    return (1, 1, 0) if (os.cpu_count() or 1) >= 2 else None


def _serve_in_process(args: argparse.Namespace) -> int:
    from splitserve.runtime.frontend.app import create_app, http_server

    try:
        engine = AsyncEngine(build_engine(args))
    except (OSError, ValueError) as exc:  # a missing model, an unwritable step log
        log.error("cannot start: %s", exc)
        return 2
    app = create_app(engine, served_model_name=args.served_model_name, max_body_bytes=_max_body(args))
    _guard(app, args, None)
    server = http_server(app, args.host, args.port, args.log_level, ssl_keyfile=args.ssl_keyfile,
                         ssl_certfile=args.ssl_certfile)
    serve_beside_engine(server, engine)
    return 0 if server.started else 1


def serve_beside_engine(server: uvicorn.Server, engine: AsyncEngine) -> None:
    """Step `engine` on this thread, the one that loaded its model, so that the process has one OpenMP team
    (async_engine.py says why); serve HTTP on a side thread until SIGINT or SIGTERM, caught here and handed
    to `server` (a worker's starts its drain). Returns when both have stopped; a failed engine stops the
    server, a stopped server the engine."""

    def serve_http() -> None:
        try:
            server.run()
        finally:
            engine.stop()

    http = threading.Thread(target=serve_http, name="http")
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, server.handle_exit)
    freeze_startup_heap()
    http.start()
    try:
        engine.run()
    finally:
        server.should_exit = True
        http.join()


def _spawn_and_serve(args: argparse.Namespace, n_prefill: int, n_decode: int, n_colocated: int) -> int:
    secret_file = _secret_file(args.secret_file)
    roles = ["prefill"] * n_prefill + ["decode"] * n_decode + ["colocated"] * n_colocated
    ports = [free_port(args.host) for _ in roles]
    urls = [f"http://{args.host}:{port}" for port in ports]
    threads = args.threads or max(1, (os.cpu_count() or 1) // len(roles))
    cpus = [i % (os.cpu_count() or 1) if args.pin else None for i in range(len(roles))]
    procs: list[subprocess.Popen] = []
    supervisor: Supervisor | None = None
    # A shutdown stops the supervisor before the workers: it would otherwise take their exits for deaths
    # and start them again.
    terminate_on_signals(procs, first=lambda: supervisor.stop() if supervisor is not None else None)
    try:
        for role, port, cpu in zip(roles, ports, cpus):
            procs.append(_spawn_worker(args, role, port, secret_file, cpu, threads))
        for url, proc in zip(urls, procs):
            wait_healthy(url, proc, args.startup_timeout)
        log.info("workers up: %d prefill, %d decode, %d colocated", n_prefill, n_decode, n_colocated)
        # A worker that dies starts again on its port and rejoins through the frontend, as any worker joins.
        scheme = "https" if args.ssl_certfile else "http"
        host = "127.0.0.1" if args.host in ("0.0.0.0", "::", "") else args.host
        router = f"{scheme}://{host}:{args.port}"
        supervisor = Supervisor(
            procs, lambda i: _spawn_worker(args, roles[i], ports[i], secret_file, cpus[i], threads, router)
        ).start()
        return serve_pools(args, urls, read_secret(secret_file))
    except RuntimeError as exc:
        log.error("cannot start: %s", exc)
        return 2
    finally:
        if supervisor is not None:
            supervisor.stop()
        stop_processes(procs)
        if args.secret_file is None:
            Path(secret_file).unlink(missing_ok=True)


def serve_pools(
    args: argparse.Namespace, worker_urls: list[str], secret: bytes,
    on_app: Callable[[FastAPI, PoolClient], None] | None = None,
) -> int:
    """The frontend over running workers of the deployment whose calls `secret` signs. `on_app` may add to
    the app before it serves (the Ray launcher adds its pools' lifecycle and /admin/scale)."""
    from splitserve.model.loader import load_tokenizer
    from splitserve.runtime.frontend.app import create_app, http_server

    try:
        tokenizer, name = load_tokenizer(args.model)
    except (FileNotFoundError, ValueError) as exc:
        log.error("cannot start: %s", exc)
        return 2
    engine = PoolClient(tokenizer, args.served_model_name or name, secret, _pool_config(args))
    app = create_app(engine, served_model_name=args.served_model_name, max_body_bytes=_max_body(args))
    attach_pool(app, engine, worker_urls)
    if on_app is not None:
        on_app(app, engine)
    _guard(app, args, Verifier(secret))
    server = http_server(app, args.host, args.port, args.log_level, ssl_keyfile=args.ssl_keyfile,
                         ssl_certfile=args.ssl_certfile)
    freeze_startup_heap()
    server.run()  # until SIGINT or SIGTERM
    return 0


def _guard(app: FastAPI, args: argparse.Namespace, verifier: Verifier | None) -> None:
    """Who may call what on the public port: API keys (if any) for /v1/*; the operator token for /debug/*;
    the operator token or the deployment's signature (a worker joining or draining itself) for /admin/*."""
    admin = (read_secret(args.admin_token_file).decode(),) if args.admin_token_file else ()
    keys = tuple(args.api_key or ()) + ((os.environ["SPLITSERVE_API_KEY"],) if os.environ.get("SPLITSERVE_API_KEY") else ())
    if not admin:
        log.info("no --admin-token-file: /debug/* is closed, and only this deployment's workers may call /admin/*")
    rules = [Rule("/debug/", tokens=admin), Rule("/admin/", signed=verifier is not None, tokens=admin)]
    if keys:
        rules.append(Rule("/v1/", tokens=keys))
    app.add_middleware(Guard, rules=rules, verifier=verifier)


def _max_body(args: argparse.Namespace) -> int:
    if args.max_body_mb <= 0:
        raise SystemExit(f"--max-body-mb must be > 0, got {args.max_body_mb}")
    return int(args.max_body_mb * 1024 * 1024)


def read_secret(path: str) -> bytes:
    """A secret or token from its file (surrounding whitespace dropped); refused when missing or empty."""
    try:
        value = Path(path).read_bytes().strip()
    except OSError as exc:
        raise SystemExit(f"cannot read {path}: {exc.strerror}") from None
    if not value:
        raise SystemExit(f"{path} is empty: a secret or token file must hold the value")
    return value


def _pool_config(args: argparse.Namespace) -> PoolConfig:
    """The frontend's routing and transfer-failure settings, from `serve`'s flags (runtime/config.py)."""
    return PoolConfig(
        policy=args.router_policy,
        conditional=not args.no_conditional,
        overlap_weight=args.overlap_weight,
        link_gbps=args.link_gbps,
        on_transfer_failure=args.on_transfer_failure,
        deadline_base_s=args.transfer_deadline,
        deadline_per_token_s=args.transfer_deadline_per_token,
    )


class WorkerUrl(BaseModel):
    url: str


def attach_pool(app: FastAPI, engine: PoolClient, worker_urls: list[str]) -> None:
    """Register the workers and poll their stats while the app runs (on the server's own event loop)."""
    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(a: FastAPI) -> AsyncIterator[object]:
        for url in worker_urls:
            await engine.add_worker(url)
        poller = asyncio.get_running_loop().create_task(engine.run_background())
        try:
            async with inner(a) as state:
                yield state
        finally:
            poller.cancel()
            await engine.close()

    app.router.lifespan_context = lifespan

    @app.post("/admin/workers")
    async def register(body: WorkerUrl) -> JSONResponse:
        """A worker joins the running deployment (after the same checks as at startup)."""
        try:
            w = await engine.add_worker(body.url)
        except WorkerError as exc:
            return JSONResponse({"error": str(exc)}, status_code=409)
        return JSONResponse({"status": "registered", "role": w.info.role})

    @app.post("/admin/workers/drain")
    async def drain(body: WorkerUrl) -> JSONResponse:
        """Stop routing to a worker, wait for its requests to finish, then remove it."""
        clean = await engine.drain_worker(body.url)
        return JSONResponse({"status": "drained" if clean else "removed with requests in flight"})

    @app.get("/debug/workers")
    async def workers() -> list[dict]:
        return [
            {"url": w.url, "role": role, "pid": w.info.pid, "in_flight": w.in_flight, "generation": w.info.generation}
            for role, pool in engine.pools.items() for w in pool
        ]

    @app.get("/debug/requests")
    async def recent_requests(limit: int = 100) -> list[dict]:
        """Phase records (queue, prefill, transfer, wait-for-KV, decode) of recent requests."""
        return engine.phases.recent(limit)


def _spawn_worker(
    args: argparse.Namespace, role: str, port: int, secret_file: str, cpu: int | None, threads: int,
    router: str | None = None,
) -> subprocess.Popen:
    """One worker process; with `router`, it registers itself there (a restart after it died)."""
    cmd = worker_command(role, args.host, port, secret_file, worker_argv(args, threads))
    if cpu is not None:
        cmd += ["--cpu", str(cpu)]
    if router is not None:
        cmd += ["--router", router]
    log.info("starting %s worker on port %d%s", role, port, f" (cpu {cpu})" if cpu is not None else "")
    return subprocess.Popen(cmd, preexec_fn=dies_with_parent())


def _secret_file(path: str | None) -> str:
    """The per-deployment secret that authenticates KV transfer connections: given, or made now."""
    if path is not None:
        if not Path(path).is_file():
            raise SystemExit(f"--secret-file {path}: no such file")
        return path
    fd, tmp = tempfile.mkstemp(prefix="splitserve-secret-")
    os.write(fd, secrets.token_hex(32).encode())
    os.close(fd)
    os.chmod(tmp, 0o600)
    return tmp


def run_worker(args: argparse.Namespace) -> int:
    """`splitserve worker`: one engine in one role, behind its internal HTTP API."""
    from splitserve.runtime.worker.app import Worker, create_worker_app
    from splitserve.runtime.worker.server import WorkerServer

    setup_logging(args.log_level)
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    if not args.secret_file:
        log.error("a worker needs --secret-file with the deployment's secret (it signs control-plane calls and authenticates KV transfers)")
        return 2
    secret = read_secret(args.secret_file)
    try:
        worker = Worker(
            args.role, build_engine(args, args.role), secret, host=args.host, transport=args.transfer,
            pipelined=args.layer_pipelining,
        )
    except (OSError, ValueError) as exc:  # a missing model, an unwritable step log
        log.error("cannot start: %s", exc)
        return 2
    if args.role != "colocated":
        from splitserve.transfer.available import transports_line

        log.info("%s", transports_line(args.transfer, args.device))
    worker.start(engine_thread=False)  # the engine runs on this thread: serve_beside_engine
    url = args.advertise or f"http://{args.host}:{args.port}"
    # No access log: a worker's callers are the frontend's polls and calls, not people (those show in the
    # frontend's own log).
    config = uvicorn.Config(create_worker_app(worker), host=args.host, port=args.port, log_level=args.log_level,
                            access_log=False)
    server = WorkerServer(config, url, args.router, idle=worker.idle, secret=secret)
    try:
        serve_beside_engine(server, worker.async_engine)
    finally:
        worker.close()
    # Not started: uvicorn could not bind (it said why) and ended its thread.
    return 2 if server.registration_error or not server.started else 0
