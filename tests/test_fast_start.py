"""A node's start is exact without a fixed window (issue 20, point 1; docs/architecture.md,
"The cluster view", rule 2).

python-socketio starts its client manager on the first connection, and that connection waits
for the start: with a 2 s discovery window (RabbitMQ, Kafka) a default
``socketio.AsyncClient().connect()``, which waits 1 s, failed on a freshly started node. These
tests use the router's *default* timings (not the tests' short heartbeats and windows).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import anyio
import pytest
import socketio

from roomrouter import RoomRouter
from roomrouter.integrations.socketio import RoomRouterManager

from .backends import BACKENDS, Backend, require_tcp
from .conftest import open_backend, selected_backends, unique_namespace
from .test_socketio import broker_url, serve

pytestmark = pytest.mark.anyio

FRESH_BACKENDS = [
    name for name in ("memory", "redis", "rabbitmq", "kafka") if name in selected_backends()
]


@pytest.fixture(params=FRESH_BACKENDS)
async def fresh_backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    async with open_backend(request.param) as instance:
        yield instance


async def test_a_default_client_connects_to_a_fresh_node_without_a_startup_hook(
    fresh_backend: Backend,
) -> None:
    # No on_startup=manager.start, no router options: the manager starts on the first
    # connection, which must not outwait the client's default 1 s connect wait.
    manager = RoomRouterManager(broker_url(fresh_backend), namespace=fresh_backend.namespace)
    async with serve(manager) as node:
        client = socketio.AsyncClient(reconnection=False)
        try:
            await client.connect(node.url)
            assert client.connected
            assert client.get_sid("/") is not None
        finally:
            await client.disconnect()


@pytest.mark.parametrize("name", ["rabbitmq", "kafka"])
async def test_joining_three_live_nodes_is_well_under_the_old_window(name: str) -> None:
    """The start of a node with 3 live peers waited the whole 2 s discovery window on
    RabbitMQ and Kafka; it now waits for the 3 answers (RabbitMQ: it counted 3 nodes; Kafka:
    the first answer of a started node names the other two). Figures: docs/architecture.md."""
    if name not in selected_backends():
        pytest.skip(f"{name} not selected")
    backend = BACKENDS[name](unique_namespace())
    backend.available()
    try:
        async with AsyncExitStack() as stack:
            # Default timings: heartbeat 1 s, so the old window was 2 s.
            peers = [RoomRouter(backend.broker(), namespace=backend.namespace) for _ in range(3)]
            for peer in peers:
                await stack.enter_async_context(peer)
            async with anyio.create_task_group() as tg:
                for peer in peers:
                    tg.start_soon(peer.member().join, f"room-{peer.node_id}")
            took = []
            for _ in range(3):
                # Each stays: one that left would still be named in the peers' live lists
                # until silent for the suspect interval, and a Kafka start waits for it.
                router = RoomRouter(backend.broker(), namespace=backend.namespace)
                started = time.perf_counter()
                await stack.enter_async_context(router)
                took.append(time.perf_counter() - started)
                # It learned every peer's room before its start returned.
                for peer in peers:
                    assert router.remote_hosts(f"room-{peer.node_id}") == {peer.node_id}
                assert router.stats()["discovery_timeouts"] == 0
            print(f"start with 3 live peers on {name}: {[round(t, 3) for t in took]} s")
            assert statistics.median(took) < 1.0, took
    finally:
        await backend.cleanup()


@pytest.mark.parametrize("name", ["rabbitmq", "kafka"])
async def test_nodes_starting_at_once_each_start_without_waiting_a_window(name: str) -> None:
    """Concurrent starts: a node counted must hear the Hello (RabbitMQ counts before it), and
    a node starting at the same time whose Hello this one heard counts as answered. Either
    mistake makes a start wait for an answer that never comes (the TTL, or the window)."""
    if name not in selected_backends():
        pytest.skip(f"{name} not selected")
    backend = BACKENDS[name](unique_namespace())
    backend.available()
    took: dict[str, float] = {}
    try:
        async with AsyncExitStack() as stack:
            routers = [RoomRouter(backend.broker(), namespace=backend.namespace) for _ in range(4)]

            async def start(router: RoomRouter) -> None:
                started = time.perf_counter()
                await stack.enter_async_context(router)
                took[router.node_id] = time.perf_counter() - started

            async with anyio.create_task_group() as tg:
                for router in routers:
                    tg.start_soon(start, router)
            print(f"4 concurrent starts on {name}: {sorted(round(t, 3) for t in took.values())} s")
            for router in routers:
                assert router.stats()["discovery_timeouts"] == 0
            assert max(took.values()) < 1.5, took
    finally:
        await backend.cleanup()


async def test_a_consumer_of_the_nodes_queue_that_is_no_node_does_not_slow_starts() -> None:
    """RabbitMQ counts the consumers of ``rr.{ns}.nodes``; one that is no node never answers,
    and the start ends once every node the answers name has answered (as with a Redis
    monitor, tests/test_discovery.py)."""
    if "rabbitmq" not in selected_backends():
        pytest.skip("RabbitMQ not selected")
    import aiormq

    from roomrouter.brokers.rabbitmq import amqp_name

    backend = BACKENDS["rabbitmq"](unique_namespace())
    backend.available()
    try:
        async with RoomRouter(backend.broker(), namespace=backend.namespace) as first:
            stranger = await aiormq.connect("amqp://guest:guest@127.0.0.1:5672/")
            try:
                channel = await stranger.channel()

                async def ignore(message: object) -> None:
                    pass

                nodes_queue = amqp_name(backend.namespace, "nodes")
                await channel.basic_consume(nodes_queue, ignore, no_ack=True)
                declared = await channel.queue_declare(nodes_queue, passive=True)
                assert declared.consumer_count == 2  # the first node and the stranger
                started = time.perf_counter()
                async with RoomRouter(backend.broker(), namespace=backend.namespace) as second:
                    took = time.perf_counter() - started
                    assert took < 1.0, f"the start waited {took:.2f}s for a consumer"
                    assert second.stats()["discovery_timeouts"] == 0
                    assert first.node_id in second.live_nodes()
            finally:
                await stranger.close()
    finally:
        await backend.cleanup()


def test_the_start_benchmark_runs() -> None:
    """benchmarks/start.py, tiny (Redis, once): it starts 3 peer processes and checks that
    the timed node knew their rooms when its start returned."""
    require_tcp("127.0.0.1", 6379, "Redis")
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "start.py"
    done = subprocess.run(
        [sys.executable, str(script), "--backends", "redis", "--repeats", "1"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = [line.split() for line in done.stdout.splitlines()[1:]]
    assert [row[:2] for row in rows] == [["redis", "empty"], ["redis", "emptied"], ["redis", "3"]]
