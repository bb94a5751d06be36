"""A Ray cluster of several simulated nodes on this machine, made with Ray's own `cluster_utils`.

Every node is a real raylet with its own resources and worker processes; all of them listen on
127.0.0.1. Removing a node kills its raylet and everything running on it, as a lost machine would.
"""

from __future__ import annotations

import os
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

REPO = Path(__file__).resolve().parents[2]
# Ray's own switch that makes every node report 127.0.0.1 (else it picks the first interface's address):
# the tests talk to loopback only. Inherited by raylets, actors and the `serve --ray` driver.
ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PYTHONPATH": str(REPO)}
# Small, for a 2-core machine: no dashboard, the smallest object store Ray accepts (KV never uses it).
NODE_ARGS = {"node_ip_address": "127.0.0.1", "object_store_memory": 80 * 1024**2}
# Ray declares a silent node dead after 3 missed health checks, 1 s apart (default: 5, 3 s apart), so
# that the next deployment is not placed on a node the last test killed.
HEALTH_CHECKS = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}


class SimCluster:
    def __init__(self) -> None:
        self._saved_env = {k: os.environ.get(k) for k in ENV}
        os.environ.update(ENV)
        # The head runs the driver and no workers: each pool goes where its custom resource is.
        self.cluster = Cluster(
            initialize_head=True,
            head_node_args={**NODE_ARGS, "num_cpus": 0, "include_dashboard": False, "_system_config": HEALTH_CHECKS},
        )
        self.address = self.cluster.address
        self.named: dict[str, ray._private.node.Node] = {}

    def add_node(self, name: str | None = None, cpus: int = 1, **resources: float) -> "ray._private.node.Node":
        node = self.cluster.add_node(**NODE_ARGS, num_cpus=cpus, resources=resources)
        if name is not None:
            self.named[name] = node
        return node

    def remove_node(self, node: "ray._private.node.Node") -> None:
        """Kill the node's raylet and every process on it at once, as a lost machine goes."""
        self.cluster.remove_node(node, allow_graceful=False)

    def settle(self) -> None:
        """Wait until Ray's view of the live nodes is the cluster's: removed ones declared dead."""
        self.cluster.wait_for_nodes(timeout=30)

    def node_of(self, pid: int) -> "ray._private.node.Node | None":
        """The simulated node whose raylet is an ancestor of process `pid`."""
        raylets = {n.all_processes["raylet"][0].process.pid: n for n in self.cluster.list_all_nodes()}
        while pid > 1:
            if pid in raylets:
                return raylets[pid]
            pid = _parent(pid)
        return None

    def shutdown(self) -> None:
        self.cluster.shutdown()
        for k, v in self._saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def running(pid: int) -> bool:
    """The process exists and has not exited (a zombie waiting to be reaped has)."""
    try:
        return _stat(pid)[0] != "Z"
    except FileNotFoundError:
        return False


def _parent(pid: int) -> int:
    try:
        return int(_stat(pid)[1])
    except FileNotFoundError:
        return 0


def _stat(pid: int) -> list[str]:
    """/proc/PID/stat from the state field on (the command before it may hold spaces and parentheses)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
