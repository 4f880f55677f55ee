"""Shared fixtures: the backend parameter, a cluster factory, hypothesis profiles.

``ROOMROUTER_BACKENDS=memory,redis pytest`` limits the backends; by default every registered
backend runs. Tests run on asyncio through anyio's pytest plugin (async fixtures are set up and
torn down in the test's own task, which routers — task groups — require).

**Parallel runs.** ``scripts/test.sh`` (CI, the README) runs the suite in two passes:
``pytest -n N -m "not serial"`` (pytest-xdist: N worker processes at once), then
``pytest -m serial`` (one process, nothing else running). So a new test must hold while other
tests run beside it:

* Servers the tests start themselves are per process, so per xdist worker: the shared Tansu
  (``tests/kafka_server.py``) and the shared Redis Cluster (``tests/redis_cluster.py``) are
  started on first use in each worker, on random free ports (``tests/ports.py``); a fault test
  starts a server of its own (``PrivateRedis``, ``TansuServer``, ``RedisClusterServers``; a new
  one takes its port from ``tests.ports.free_port()``).
* On the shared servers (Redis 6379, RabbitMQ, PostgreSQL, MariaDB, NATS) a test touches only
  what it named: a ``unique_namespace()``, a unique table prefix, its own connections; files
  go under ``tmp_path``.
* A test that disturbs a shared server for everyone (FLUSHALL, DEBUG, SHUTDOWN, CONFIG SET or
  ``CLIENT KILL TYPE ...`` on 6379, ``rabbitmqctl close_all_connections``, restarting a
  service) or that must not share the CPU (a load run whose figures or deadlines assume an
  idle host) is marked ``@pytest.mark.serial``: it runs in the second pass, alone. Better
  still, it uses a server of its own (``private_redis``) and stays in the first pass. Under
  an xdist worker a serial test is skipped (and fails under CI), so it can never run beside
  others by mistake.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import HealthCheck, Phase, settings

from roomrouter import RoomRouter

from .backends import BACKENDS, Backend

if TYPE_CHECKING:
    from .redis_cluster import RedisClusterServers
    from .test_redis import PrivateRedis

# CI: bounded, and no shrinking (a failure fails fast; rerun locally to get it shrunk).
settings.register_profile(
    "ci",
    max_examples=25,
    stateful_step_count=30,
    deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "thorough",
    max_examples=60,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(
    os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "thorough")
)

#: Router options for tests: no linger, fast heartbeats so fault tests finish quickly.
TEST_ROUTER_OPTIONS: dict[str, Any] = {
    "linger": 0.0,
    "heartbeat_interval": 0.2,
    "node_ttl": 1.5,
}


def selected_backends() -> list[str]:
    wanted = os.environ.get("ROOMROUTER_BACKENDS")
    if not wanted:
        return list(BACKENDS)
    names = [n.strip() for n in wanted.split(",") if n.strip()]
    unknown = set(names) - set(BACKENDS)
    if unknown:
        raise pytest.UsageError(f"unknown backends in ROOMROUTER_BACKENDS: {sorted(unknown)}")
    return names


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "rabbitmq_cluster: runs on the 3-node RabbitMQ cluster of tests/rabbitmq_cluster.py "
        "(also serial); `-m rabbitmq_cluster` runs them apart",
    )


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Serial tests never run in an xdist worker (see the module docstring)."""
    if item.get_closest_marker("serial") is not None and os.environ.get("PYTEST_XDIST_WORKER"):
        reason = "a serial test runs alone: `pytest -m serial` (scripts/test.sh does), no -n"
        if os.environ.get("CI"):
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def unique_namespace() -> str:
    return "t" + uuid.uuid4().hex[:12]


@asynccontextmanager
async def open_backend(name: str) -> AsyncIterator[Backend]:
    """The backend ``name`` under a namespace of its own: skipped (failed in CI) if its server
    is not there, cleaned up after."""
    instance = BACKENDS[name](unique_namespace())
    instance.available()
    try:
        yield instance
    finally:
        await instance.cleanup()


@pytest.fixture(params=selected_backends())
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    async with open_backend(request.param) as instance:
        yield instance


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    """A redis-server of the test's own on a free loopback port, to restart, kill or flush
    (tests/test_redis.py's PrivateRedis). A missing binary skips locally and fails in CI."""
    import shutil

    from .backends import require_tcp
    from .test_redis import PrivateRedis

    if shutil.which("redis-server") is None:
        require_tcp("127.0.0.1", 1, "redis-server binary")
    server = PrivateRedis()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session", autouse=True)
def redis_cluster_session() -> Iterator[None]:
    """Stops the shared Redis Cluster (tests/redis_cluster.py) at the end of the session, if a
    test started it; costs nothing otherwise."""
    from . import redis_cluster

    try:
        yield
    finally:
        redis_cluster.stop_shared_cluster()


@pytest.fixture
def redis_cluster() -> RedisClusterServers:
    """The shared 3-master Redis Cluster, started on first use; a missing binary or a cluster
    that cannot start skips locally and fails in CI."""
    from .backends import BACKENDS
    from .redis_cluster import shared_cluster

    BACKENDS["redis-cluster"]("probe").available()
    return shared_cluster()


ClusterFactory = Callable[..., Awaitable[list[RoomRouter]]]


@pytest.fixture
async def cluster(backend: Backend) -> AsyncIterator[ClusterFactory]:
    """``await cluster(3, **router_options)`` starts three nodes of one namespace; each has its
    own broker instance (own connections). They are closed after the test."""
    async with AsyncExitStack() as stack:

        async def start(count: int = 3, **options: Any) -> list[RoomRouter]:
            opts = {**TEST_ROUTER_OPTIONS, **backend.router_options, **options}
            routers = []
            for _ in range(count):
                router = RoomRouter(backend.broker(), namespace=backend.namespace, **opts)
                routers.append(await stack.enter_async_context(router))
            return routers

        yield start
