"""A three-node RabbitMQ cluster for the tests, on free loopback ports.

:class:`RabbitMQCluster` starts ``size`` rabbitmq-server processes beside the system's
RabbitMQ (which it never touches): node names ``rr{i}x{tag}@localhost`` (a random tag, so two
test runs on one host never meet), AMQP, distribution and management ports from
``tests/ports.py``, one Erlang cookie in a temporary ``HOME`` (the servers' and the
``rabbitmqctl`` calls'), and their own config, mnesia, log and pid files in a temporary
directory. Node 1 boots first; nodes 2 and 3 boot with classic peer discovery naming node 1,
so they join its cluster on their first boot (no ``stop_app``/``join_cluster``/``start_app``
round). The start is bounded (90 s); :meth:`kill` SIGKILLs a node, :meth:`restart` boots it
again from its data (it rejoins the cluster by itself).

:func:`shared_cluster` starts one per test process on first use; the session fixture
``rabbitmq_cluster_session`` in ``conftest.py`` stops it at the end of the session (and
``atexit`` does if the session never gets there; ``PR_SET_PDEATHSIG`` if the test process
dies). The tests using it are marked ``rabbitmq_cluster`` and ``serial``: three more Erlang
VMs, and fault tests that kill nodes, do not share the machine with the parallel pass.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from .ports import free_port

__all__ = ["RabbitMQCluster", "require_rabbitmq_server", "shared_cluster"]

#: The rabbitmq scripts themselves: Debian's /usr/sbin wrappers switch to the rabbitmq user,
#: which resets HOME (and so the cookie).
_BIN = Path(os.environ.get("RABBITMQ_BIN", "/usr/lib/rabbitmq/bin"))
START_TIMEOUT = 90.0


def require_rabbitmq_server() -> None:
    """Skip (locally) or fail (CI) if the RabbitMQ server scripts are missing."""
    missing = [s for s in ("rabbitmq-server", "rabbitmqctl") if not (_BIN / s).exists()]
    if missing or shutil.which("erl") is None:
        message = f"RabbitMQ cluster tests need {', '.join(missing) or 'erl'} in {_BIN}"
        if os.environ.get("CI"):
            pytest.fail(message + "; CI requires every backend server", pytrace=False)
        pytest.skip(message)


def _die_with_parent() -> None:
    # Linux: the servers get SIGTERM when the test process dies, so none is left behind.
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Node:
    """One RabbitMQ node of the cluster."""

    def __init__(self, index: int, tag: str, base: Path, taken: set[int]) -> None:
        self.index = index
        self.name = f"rr{index + 1}x{tag}@localhost"
        ports = []
        for offset in (None, 10000, None):  # amqp, distribution (+ the CLI's at +10000), http
            port = free_port(offset=offset, exclude=frozenset(taken))
            taken.update((port, port + 10000) if offset else (port,))
            ports.append(port)
        self.amqp_port, self.dist_port, self.http_port = ports
        self.dir = base / f"node{index + 1}"
        self.dir.mkdir()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.amqp_port}"

    @property
    def management_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def log_tail(self, lines: int = 15) -> str:
        texts = []
        for path in [*sorted(self.dir.glob("log/*.log")), self.dir / "stdout"]:
            if path.exists():
                texts += path.read_text(errors="replace").splitlines()[-lines:]
        return "\n".join(texts[-lines:])


class RabbitMQCluster:
    """A throw-away RabbitMQ cluster (see the module docstring)."""

    def __init__(self, size: int = 3) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="rr-rabbit-"))
        self.tag = uuid.uuid4().hex[:6]
        cookie = self.dir / ".erlang.cookie"
        cookie.write_text(uuid.uuid4().hex.upper())
        cookie.chmod(0o400)
        taken: set[int] = set()
        self.nodes = [Node(i, self.tag, self.dir, taken) for i in range(size)]
        #: Seconds the last :meth:`start` took (the fixture's start time).
        self.start_seconds = 0.0

    # -- URLs -----------------------------------------------------------------------------------

    def url(self, first: int = 0, **query: object) -> str:
        """An ``amqp://`` URL naming every node, node ``first`` first (a router built from it
        connects there), with that node's management API."""
        order = self.nodes[first:] + self.nodes[:first]
        # Statistics are collected every second (the config below); stats_interval is a bound
        # of their age, given slack for a loaded machine.
        options = {"management_url": order[0].management_url, "stats_interval": 2, **query}
        tail = "&".join(f"{k}={v}" for k, v in options.items())
        return f"amqp://guest:guest@{','.join(n.address for n in order)}/?{tail}"

    # -- processes ------------------------------------------------------------------------------

    def _env(self, node: Node) -> dict[str, str]:
        return {
            **os.environ,
            "HOME": str(self.dir),  # the cookie
            "RABBITMQ_CONF_ENV_FILE": str(self.dir / "no-env.conf"),  # not /etc/rabbitmq's
            "RABBITMQ_NODENAME": node.name,
            "RABBITMQ_DIST_PORT": str(node.dist_port),
            "RABBITMQ_CONFIG_FILE": str(node.dir / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(node.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(node.dir / "log"),
            "RABBITMQ_PID_FILE": str(node.dir / "pid"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            # No busy-waiting schedulers: the machine is shared.
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1} "
            "+sbwt none +sbwtdcpu none +sbwtdio none",
            "RUNNING_UNDER_SYSTEMD": "true",  # exec erl: the Popen is the VM (signals, pid)
        }

    def _write_config(self) -> None:
        (self.dir / "enabled_plugins").write_text("[rabbitmq_management].\n")
        seed = self.nodes[0].name
        for node in self.nodes:
            lines = [
                f"listeners.tcp.1 = 127.0.0.1:{node.amqp_port}",
                "management.tcp.ip = 127.0.0.1",
                f"management.tcp.port = {node.http_port}",
                "collect_statistics_interval = 1000",
                "cluster_formation.peer_discovery_backend = classic_config",
                f"cluster_formation.classic_config.nodes.1 = {seed}",
                "log.file.level = warning",
            ]
            (node.dir / "rabbitmq.conf").write_text("\n".join(lines) + "\n")

    def _spawn(self, node: Node) -> None:
        def popen() -> subprocess.Popen[bytes]:
            with open(node.dir / "stdout", "ab") as out:
                return subprocess.Popen(
                    [str(_BIN / "rabbitmq-server")],
                    env=self._env(node), stdout=out, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent, cwd=self.dir,
                )  # fmt: skip

        # PR_SET_PDEATHSIG fires when the *thread* that forked dies: a node restarted from a
        # worker thread (anyio.to_thread) would get SIGTERM once that thread is reaped. The
        # spawner thread lives as long as the process.
        node.process = (
            popen()
            if threading.current_thread() is threading.main_thread()
            else (_spawner().submit(popen).result())
        )

    def ctl(self, node: Node, *args: str, timeout: float = 30.0, tool: str = "rabbitmqctl") -> str:
        """Run ``rabbitmqctl`` (or ``tool``) against ``node``; its output (raises on failure)."""
        done = subprocess.run(
            [str(_BIN / tool), "-n", node.name, *args],
            env=self._env(node), capture_output=True, text=True, timeout=timeout, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"{tool} {' '.join(args)} on {node.name}: {done.stderr.strip()}")
        return done.stdout

    def _await(self, nodes: list[Node], deadline: float) -> None:
        for node in nodes:
            while True:
                if node.process is None or node.process.poll() is not None:
                    raise RuntimeError(f"{node.name} exited while starting:\n{node.log_tail()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError(f"{node.name} did not start in time:\n{node.log_tail()}")
                try:
                    self.ctl(node, "await_startup", "--timeout", str(max(1, int(left))),
                             timeout=left + 5)  # fmt: skip
                    break
                except (RuntimeError, subprocess.TimeoutExpired):
                    time.sleep(0.2)  # the VM is not up enough for the CLI to attach yet

    def start(self, timeout: float = START_TIMEOUT) -> None:
        began = time.monotonic()
        deadline = began + timeout
        try:
            self._write_config()
            self._spawn(self.nodes[0])
            self._await(self.nodes[:1], deadline)
            for node in self.nodes[1:]:
                self._spawn(node)
            self._await(self.nodes[1:], deadline)
            running = self.running_nodes()
            if sorted(running) != sorted(n.name for n in self.nodes):
                raise RuntimeError(f"the nodes did not form one cluster: running {running}")
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - began

    def running_nodes(self, via: Node | None = None) -> list[str]:
        """The cluster's running nodes, as ``via`` (default: the first live one) sees them."""
        import json

        node = via or next(n for n in self.nodes if self.alive(n))
        status = json.loads(self.ctl(node, "cluster_status", "--formatter", "json"))
        return list(status.get("running_nodes", []))

    def alive(self, node: Node) -> bool:
        return node.process is not None and node.process.poll() is None

    def kill(self, node: Node) -> None:
        """SIGKILL ``node``'s VM (no goodbye to its peers or clients)."""
        if node.process is not None:
            node.process.send_signal(signal.SIGKILL)
            node.process.wait(timeout=10)

    def restart(self, node: Node, timeout: float = START_TIMEOUT) -> None:
        """Boot a killed ``node`` again from its data; returns once it runs in the cluster."""
        if self.alive(node):
            return
        self._spawn(node)
        self._await([node], time.monotonic() + timeout)

    def quorum_leader(self, queue: str) -> Node:
        """The node that leads quorum queue ``queue`` now (``rabbitmq-queues quorum_status``
        names it as the member whose raft state is ``leader``)."""
        import json

        via = next(n for n in self.nodes if self.alive(n))
        rows = json.loads(
            self.ctl(via, "quorum_status", queue, "--formatter", "json", tool="rabbitmq-queues")
        )
        for row in rows:
            if str(row.get("Raft State", "")).lower() == "leader":
                return next(n for n in self.nodes if n.name == row.get("Node Name"))
        raise RuntimeError(f"no leader of {queue!r} in {rows}")

    def stop(self) -> None:
        nodes = [n for n in self.nodes if n.process is not None]
        for node in nodes:
            if self.alive(node):
                node.process.terminate()  # type: ignore[union-attr]
        for node in nodes:
            assert node.process is not None
            try:
                node.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                node.process.kill()
                node.process.wait(timeout=5)
            node.process = None
        shutil.rmtree(self.dir, ignore_errors=True)


_spawn_pool: ThreadPoolExecutor | None = None


def _spawner() -> ThreadPoolExecutor:
    global _spawn_pool
    if _spawn_pool is None:
        _spawn_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rabbit-spawner")
    return _spawn_pool


_shared: RabbitMQCluster | None = None
_failed: str | None = None


def shared_cluster() -> RabbitMQCluster:
    """The process-wide 3-node cluster, started on first call. Raises RuntimeError if it
    cannot start (the caller skips or fails with the reason)."""
    global _shared, _failed
    if _failed is not None:
        raise RuntimeError(_failed)
    if _shared is None:
        deadline = time.monotonic() + START_TIMEOUT  # both attempts together
        for attempt in range(2):
            cluster = RabbitMQCluster(3)
            try:
                cluster.start(timeout=max(deadline - time.monotonic(), 10.0))
                break
            except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                # A port taken between the probe and a node's bind (tests/ports.py) fails one
                # attempt; new ports are drawn for the next.
                if attempt == 1:
                    _failed = f"could not start a 3-node RabbitMQ cluster: {exc}"
                    raise RuntimeError(_failed) from exc
        atexit.register(cluster.stop)
        _shared = cluster
        print(f"\nRabbitMQ cluster started in {cluster.start_seconds:.1f} s", file=sys.stderr)
    return _shared


def stop_shared_cluster() -> None:
    global _shared
    if _shared is not None:
        _shared.stop()
        _shared = None
