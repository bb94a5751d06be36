"""The Ray actor that runs one splitserve worker process on its node and answers for it.

The worker is the ordinary `splitserve worker` command, unchanged: it binds to the node's address (so
its KV receiver endpoint is one other nodes can reach), joins through the router and, on SIGTERM, drains
through it before exiting. Ray only places, supervises and reports on it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess

import ray

from splitserve.runtime.config import worker_command
from splitserve.runtime.process import dies_with_parent, free_port


class WorkerActor:
    def __init__(self, role: str, router_url: str, secret: bytes, worker_argv: list[str]) -> None:
        ip = ray.util.get_node_ip_address()
        port = free_port(ip)
        self._url = f"http://{ip}:{port}"
        # The secret reaches the child through a pipe, so it never lies in a file on a node.
        read_end, write_end = os.pipe()
        os.write(write_end, secret)
        os.close(write_end)
        cmd = worker_command(
            role, ip, port, f"/dev/fd/{read_end}", ["--advertise", self._url, "--router", router_url, *worker_argv]
        )
        # Its own session: a Ctrl-C at the driver's terminal must not reach it past the driver, which
        # stops workers in order (a local Ray instance shares that terminal). SIGKILL when the actor dies,
        # not the launcher's SIGTERM: when Ray has lost the actor, the router has already dropped the
        # worker, so a drain would wait on a router that no longer knows it; it must just go.
        self._proc = subprocess.Popen(
            cmd, pass_fds=(read_end,), preexec_fn=dies_with_parent(signal.SIGKILL), start_new_session=True
        )
        os.close(read_end)

    def url(self) -> str:
        """Where the router reaches the worker; answered once Ray has placed this actor."""
        return self._url

    async def run(self) -> int:
        """Returns the worker's exit code once it exits: the driver holds this call open to learn of it."""
        while self._proc.poll() is None:
            await asyncio.sleep(0.2)
        return self._proc.returncode

    async def stop(self, grace_s: float) -> int:
        """SIGTERM (the worker drains through the router, then exits); SIGKILL after grace_s."""
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
        for _ in range(max(1, int(grace_s / 0.1))):
            if self._proc.poll() is not None:
                return self._proc.returncode
            await asyncio.sleep(0.1)
        self._proc.kill()
        return await self.run()

