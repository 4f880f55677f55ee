"""roomrouter's own brokers through the shipped conformance suite
(:class:`roomrouter.testing.BrokerContract`): every built-in backend, built from its URL through
the entry-point registry, with three nodes that each have their own broker connections. A
backend whose server is not reachable is skipped with the reason (failed under ``CI``), and
``ROOMROUTER_BACKENDS`` limits the backends, as for the rest of the suite (tests/backends.py).

Below the suite: router behaviour the suite leaves to the router's own tests, still run on
every backend (the ``cluster`` fixture of tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import anyio
import pytest

from roomrouter import Broker, MemberClosed, RoomRouter
from roomrouter.testing import BrokerContract

from .backends import (
    Backend,
    KafkaBackend,
    MemoryBackend,
    NatsBackend,
    RabbitMQBackend,
    RedisBackend,
    RedisClusterBackend,
    ShardedRedisBackend,
)
from .conftest import ClusterFactory, selected_backends
from .helpers import drain, eventually, receive_n

pytestmark = pytest.mark.anyio


class _Builtin(BrokerContract):
    """The suite on one of tests/backends.py's backends, by URL."""

    backend: ClassVar[type[Backend]]

    def available(self) -> None:
        if self.backend.name not in selected_backends():
            pytest.skip(f"{self.backend.name} is not in ROOMROUTER_BACKENDS")
        self.backend("probe").available()

    @property
    def router_options(self) -> dict[str, Any]:  # type: ignore[override]
        return dict(self.backend.router_options)

    @property
    def broker_url(self) -> str:  # type: ignore[override]
        return self.backend("probe").process_url()

    async def cleanup(self, namespace: str) -> None:
        await self.backend(namespace).cleanup()

    async def check_subscriptions(self, routers: Sequence[RoomRouter]) -> None:
        # The backend's own reading of the server (Redis: NUMSUB and per-client counts), on
        # top of what the broker reports.
        await super().check_subscriptions(routers)
        await self.backend("probe").check_subscriptions(routers)


class TestMemoryContract(_Builtin):
    backend = MemoryBackend

    @property
    def broker_url(self) -> str:  # type: ignore[override]
        return "memory://contract"


class TestRedisContract(_Builtin):
    backend = RedisBackend

    async def break_connection(self, broker: Broker) -> None:
        await _kill_redis_clients(broker)


class TestShardedRedisContract(_Builtin):
    backend = ShardedRedisBackend

    async def break_connection(self, broker: Broker) -> None:
        await _kill_redis_clients(broker)


class TestRedisClusterContract(_Builtin):
    backend = RedisClusterBackend

    async def break_connection(self, broker: Broker) -> None:
        from roomrouter.brokers.redis_cluster import RedisClusterBroker

        from .redis_cluster import shared_cluster

        assert isinstance(broker, RedisClusterBroker)
        names = {broker.client_name("sub"), broker.client_name("pub")}
        killed = 0
        for port in shared_cluster().ports:
            killed += await _kill_clients(port, names)
        assert killed >= 1, f"no connection named {names}"


class TestRabbitMQContract(_Builtin):
    backend = RabbitMQBackend

    async def break_connection(self, broker: Broker) -> None:
        """Close the broker's own connections from the server (management API), by the
        names the broker gives them."""
        from urllib.parse import quote

        from roomrouter.brokers.rabbitmq import RabbitMQBroker

        assert isinstance(broker, RabbitMQBroker)
        names = {broker.connection_name("sub"), broker.connection_name("pub")}
        closed: set[str] = set()  # user-provided names of the connections closed so far

        async def close() -> None:
            # The management API lists a new connection only once its stats were emitted:
            # one of the two may be missing from a listing, so wait until both were closed.
            listing = await broker.management_request(
                "/api/connections?columns=name,user_provided_name"
            )
            for conn in listing:
                name = conn.get("user_provided_name")
                if name in names and name not in closed:
                    path = "/api/connections/" + quote(conn["name"], safe="")
                    await broker.management_request(path, method="DELETE")
                    closed.add(name)
            assert closed == names, f"closed {sorted(closed)} of {sorted(names)} so far"

        await eventually(close, timeout=10)


class TestKafkaContract(_Builtin):
    backend = KafkaBackend


class TestNatsContract(_Builtin):
    backend = NatsBackend

    async def break_connection(self, broker: Broker) -> None:
        """Close the socket under nats-py (NATS 2.9 cannot kick a client of an ordinary
        account): nats-py sees the connection fail as on a network error and reconnects."""
        from roomrouter.brokers.nats import NatsBroker

        assert isinstance(broker, NatsBroker) and broker._nc is not None
        broker._nc._transport.close()  # type: ignore[union-attr]


async def _kill_redis_clients(broker: Broker) -> None:
    """CLIENT KILL of the broker's own connections (by their names), nobody else's."""
    from roomrouter.brokers.redis import RedisBroker

    assert isinstance(broker, RedisBroker)
    names = {broker.client_name("sub"), broker.client_name("pub")}
    assert await _kill_clients(6379, names) >= 1, f"no connection named {names}"


async def _kill_clients(port: int, names: set[str]) -> int:
    from redis.asyncio import Redis

    client = Redis(host="127.0.0.1", port=port)
    try:
        killed = 0
        for info in await client.client_list():
            if info.get("name") in names:
                await client.execute_command("CLIENT", "KILL", "ID", info["id"])
                killed += 1
        return killed
    finally:
        await client.aclose()


# -- router behaviour on every backend (beside the suite) -----------------------------------------


async def test_exclude_skips_the_sender(cluster: ClusterFactory) -> None:
    a, b, _ = await cluster(3)
    sender, other, remote = a.member("sender"), a.member("other"), b.member("remote")
    for m in (sender, other, remote):
        await m.join("R")
    await a.publish("R", b"x", exclude=sender)
    await receive_n(other, 1)
    await receive_n(remote, 1)
    assert await drain(sender) == []


async def test_ids_are_unique_and_increasing_per_node(cluster: ClusterFactory) -> None:
    [a] = await cluster(1)
    ids = [(await a.publish("any", b"")).id for _ in range(2000)]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)


async def test_linger_keeps_the_subscription_and_rejoin_cancels_it(
    cluster: ClusterFactory,
) -> None:
    [a] = await cluster(1, linger=0.4)
    member = a.member("m")
    await member.join("lingering")
    await member.leave("lingering")
    assert "lingering" in a.subscribed_rooms  # lingers
    await anyio.sleep(0.1)
    await member.join("lingering")  # back within the linger: no new subscription needed
    batches = a.stats()["subscribe_batches"]
    await anyio.sleep(0.6)
    assert "lingering" in a.subscribed_rooms  # the expired linger was re-checked, not applied
    assert a.stats()["subscribe_batches"] == batches
    await member.leave("lingering")
    await eventually(lambda: _assert_eq(a.subscribed_rooms, frozenset()), timeout=3)


async def test_closed_member_and_closed_router(cluster: ClusterFactory) -> None:
    [a] = await cluster(1)
    member = a.member("m")
    await member.join("R")
    await a.publish("R", b"queued")
    await member.close()
    assert (await member.receive()).payload == b"queued"  # what was queued is still readable
    with pytest.raises(MemberClosed):
        await member.receive()
    with pytest.raises(MemberClosed):
        await member.join("R")
    await eventually(lambda: _assert_eq(a.subscribed_rooms, frozenset()))
    again = a.member("m")  # the id is free again
    assert again is not member


def _assert_eq(actual: object, expected: object) -> None:
    assert actual == expected, f"{actual!r} != {expected!r}"
