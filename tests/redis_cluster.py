"""Redis Clusters for the tests, on free loopback ports.

:class:`RedisClusterServers` starts ``masters`` redis-server processes in cluster mode (plus
``replicas`` per master), joins them with ``redis-cli --cluster create`` and waits for
``cluster_state:ok`` on every node. :func:`shared_cluster` starts one 3-master cluster per test
process (so one per pytest-xdist worker) on first use (the ``redis-cluster`` backend of
``tests/backends.py`` calls it); the session fixture ``redis_cluster_session`` in
``conftest.py`` stops it at the end of the session (and ``atexit`` does if the session never
gets there). The failover test starts its own cluster with replicas, so promoting one disturbs
nobody else.

Every wait is bounded; a process that outlives ``stop`` is killed.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from .ports import free_port

__all__ = ["RedisClusterServers", "require_cluster_binaries", "shared_cluster"]


def require_cluster_binaries() -> None:
    """Skip (locally) or fail (CI) if redis-server or redis-cli is missing."""
    missing = [b for b in ("redis-server", "redis-cli") if shutil.which(b) is None]
    if missing:
        message = f"Redis Cluster tests need {' and '.join(missing)} on PATH"
        if os.environ.get("CI"):
            pytest.fail(message + "; CI requires every backend server", pytrace=False)
        pytest.skip(message)


def _die_with_parent() -> None:
    # Linux: the servers get SIGTERM when the test process dies, so none is left behind.
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _free_ports(count: int) -> list[int]:
    # A cluster node also listens on port + 10000 (the cluster bus): both must be free.
    ports: list[int] = []
    while len(ports) < count:
        ports.append(free_port(offset=10000, exclude=frozenset(ports)))
    return ports


def _cli(port: int, *args: str, timeout: float = 10.0) -> str:
    return subprocess.run(
        ["redis-cli", "-h", "127.0.0.1", "-p", str(port), *args],
        capture_output=True, text=True, timeout=timeout, check=False,
    ).stdout  # fmt: skip


class RedisClusterServers:
    """A throw-away Redis Cluster: no persistence, config files in a temporary directory."""

    def __init__(self, masters: int = 3, replicas: int = 0) -> None:
        self.masters = masters
        self.replicas = replicas
        self.ports = _free_ports(masters * (1 + replicas))
        self.dir = Path(tempfile.mkdtemp(prefix="rr-cluster-"))
        self.processes: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}/0?cluster=1"

    def start(self, timeout: float = 30.0) -> None:
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise

    def _start(self, timeout: float) -> None:
        for port in self.ports:
            log = open(self.dir / f"redis-{port}.log", "wb")  # noqa: SIM115
            self.processes[port] = subprocess.Popen(
                ["redis-server", "--cluster-enabled", "yes", "--port", str(port),
                 "--bind", "127.0.0.1",
                 "--cluster-config-file", str(self.dir / f"nodes-{port}.conf"),
                 "--dir", str(self.dir), "--save", "", "--appendonly", "no",
                 "--daemonize", "no", "--cluster-node-timeout", "2000",
                 "--loglevel", "warning"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent,
            )  # fmt: skip
            log.close()
        deadline = time.monotonic() + timeout
        for port in self.ports:
            while _cli(port, "PING").strip() != "PONG":
                self._check_alive(deadline, f"redis-server on port {port} did not answer")
                time.sleep(0.05)
        create = subprocess.run(
            ["redis-cli", "--cluster", "create",
             *[f"127.0.0.1:{p}" for p in self.ports],
             "--cluster-replicas", str(self.replicas), "--cluster-yes"],
            capture_output=True, text=True, timeout=timeout, check=False,
        )  # fmt: skip
        if create.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {create.stdout[-2000:]}")
        for port in self.ports:
            while "cluster_state:ok" not in _cli(port, "CLUSTER", "INFO"):
                self._check_alive(deadline, f"cluster not ok on port {port}")
                time.sleep(0.05)
        if self.replicas:
            # Every replica must have finished its first sync before a failover can be asked.
            for port in self.ports:
                while True:
                    info = _cli(port, "INFO", "replication")
                    if "role:master" in info or "master_link_status:up" in info:
                        break
                    self._check_alive(deadline, f"replica on port {port} did not sync")
                    time.sleep(0.05)

    def _check_alive(self, deadline: float, what: str) -> None:
        for port, proc in self.processes.items():
            if proc.poll() is not None:
                raise RuntimeError(f"redis-server on port {port} exited ({proc.returncode})")
        if time.monotonic() > deadline:
            raise RuntimeError(what)

    def master_ports(self) -> list[int]:
        """Ports of the nodes that are masters now (they change with a failover)."""
        return [p for p in self.ports if "role:master" in _cli(p, "INFO", "replication")]

    def stop(self) -> None:
        processes, self.processes = self.processes, {}
        for proc in processes.values():
            proc.terminate()
        for proc in processes.values():
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        shutil.rmtree(self.dir, ignore_errors=True)


_shared: RedisClusterServers | None = None
_failed: str | None = None


def shared_cluster() -> RedisClusterServers:
    """The process-wide 3-master cluster, started on first call. Raises RuntimeError if it
    cannot start (the caller skips or fails with the reason)."""
    global _shared, _failed
    if _failed is not None:
        raise RuntimeError(_failed)
    if _shared is None:
        for attempt in range(3):
            servers = RedisClusterServers(3)
            try:
                servers.start()
                break
            except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                # A port taken between the probe and a node's bind (tests/ports.py) fails one
                # attempt; new ports are drawn for the next.
                if attempt == 2:
                    _failed = f"could not start a Redis Cluster: {exc}"
                    raise RuntimeError(_failed) from exc
        atexit.register(servers.stop)
        _shared = servers
    return _shared


def stop_shared_cluster() -> None:
    global _shared
    if _shared is not None:
        _shared.stop()
        _shared = None
