"""Loopback ports for the servers the tests start themselves (Tansu, Redis Cluster nodes).

A port is drawn at random from 12000-21999, below Linux's ephemeral range (32768-60999), and
kept only if it can be bound. Asking the kernel for a free one (``bind(("127.0.0.1", 0))``)
returns an *ephemeral* port: between the probe and the server's own bind, any client
connection of any process (the suite opens thousands) can take it as its local port, and the
server then fails to start. Under pytest-xdist several workers, and other test runs on the same
host, start servers at once: each process draws from its own random sequence, so two of them
picking the same port at the same moment is unlikely, and a port that is in use fails the
bind probe. ``offset`` asks for a second port at ``port + offset`` that must be free too (a
Redis Cluster node's bus port is its port + 10000, up to 31999: below the ephemeral range
and never another node's port).
"""

from __future__ import annotations

import os
import random
import socket
import time

__all__ = ["free_port"]

_LOW, _HIGH = 12000, 21999
_random = random.Random(os.getpid() ^ time.monotonic_ns())


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(*, offset: int | None = None, exclude: frozenset[int] = frozenset()) -> int:
    """A loopback port nobody listens on now (and ``port + offset`` too, if given)."""
    for _ in range(1000):
        port = _random.randint(_LOW, _HIGH)
        if port in exclude or (offset is not None and port + offset in exclude):
            continue
        if _bindable(port) and (offset is None or _bindable(port + offset)):
            return port
    raise RuntimeError(f"no free loopback port in {_LOW}-{_HIGH}")
