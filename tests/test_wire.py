"""What travels on the wire, on every backend: frames forged by a raw client of the broker, names
that must stay apart between namespaces, and caller-chosen message ids."""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import anyio
import anyio.abc
import pytest

from roomrouter import (
    Broker,
    BrokerUnavailable,
    ConfigurationError,
    PublishOutcomeUnknown,
    RoomRouter,
)
from roomrouter._envelope import IdGenerator
from roomrouter.brokers._base import StorageConsumer
from roomrouter.brokers.memory import MemoryBroker
from roomrouter.storage import SQLiteSink, StorageWorker

from .backends import BACKENDS, Backend, RabbitMQBackend, RedisBackend
from .conftest import TEST_ROUTER_OPTIONS, ClusterFactory, selected_backends, unique_namespace
from .helpers import drain, eventually, forged_envelope, receive_n

pytestmark = pytest.mark.anyio

LONG_ROOM = "L" * 300  # RabbitMQ hashes routing keys of rooms this long


async def test_an_envelope_is_delivered_only_in_the_room_it_came_on(
    backend: Backend, cluster: ClusterFactory
) -> None:
    a, b = await cluster(2)
    victim, carrier, long_member = b.member("victim"), b.member("carrier"), b.member("long")
    await victim.join("victim")
    await carrier.join("r1")
    await long_member.join(LONG_ROOM)
    received = b.stats()["broker_received"]
    # Envelopes that name another room than the channel they are sent on: a forger with
    # publish rights on r1 (or on a room with a hashed key) must not reach the members of victim.
    await backend.inject(b, "r1", forged_envelope("victim", b"forged on r1"))
    await backend.inject(b, LONG_ROOM, forged_envelope("victim", b"forged on the long room"))
    await backend.inject(b, "r1", forged_envelope(LONG_ROOM, b"forged for the long room"))
    # Garbage from a raw client is a counted drop too, and nothing good is lost around it.
    for junk in (b"", b"\xff\xfe garbage", b"\xc1"):
        await backend.inject(b, "r1", junk)
    # A well-formed envelope of the right room from a raw client is delivered (the check is
    # the room, not the publisher).
    await backend.inject(b, "r1", forged_envelope("r1", b"honest raw"))
    await eventually(lambda: _assert_eq(b.stats()["broker_received"] - received, 7))
    for room in ("victim", "r1", LONG_ROOM):
        await a.publish(room, b"real " + room[:8].encode())
    assert [e.payload for e in await receive_n(victim, 1)] == [b"real victim"]
    assert [e.payload for e in await receive_n(carrier, 2)] == [b"honest raw", b"real r1"]
    assert [e.payload for e in await receive_n(long_member, 1)] == [b"real LLLLLLLL"]
    for member in (victim, carrier, long_member):
        assert await drain(member) == []
    stats = b.stats()
    assert (stats["dropped_room_mismatch"], stats["dropped_decode"]) == (3, 3)
    assert stats["task_restarts"] == 0


def _assert_eq(actual: object, expected: object) -> None:
    assert actual == expected, (actual, expected)


# -- names: every namespace has its own -------------------------------------------------------


def _old_kafka_name(namespace: str) -> str:
    """What the Kafka backend used to make of a namespace that is not a legal topic name."""
    digest = hashlib.sha256(namespace.encode()).hexdigest()[:12]
    return re.sub(r"[^A-Za-z0-9_-]", "-", namespace)[:120] + "-" + digest


async def test_namespaces_never_share_names(backend: Backend) -> None:
    """Namespaces built from another namespace plus a backend's separators (and node ids and
    rooms chosen to match) are as isolated as any two: each pair here shared a channel, queue
    or topic under the old naming."""
    base = backend.namespace
    nodes = [
        (base, "c"),  # Redis: its direct channel was the broadcast channel of base:d
        (base + ":d", "d1"),
        (base + ":r", "r1"),  # Redis: its broadcast channel was room "c" of base
        (base, "n.node.m"),  # RabbitMQ: its queue was the queue of node m of base.node.n
        (base + ".node.n", "m"),
        (base + ":x", "x1"),  # Kafka: its topics were those of the next namespace
        (_old_kafka_name(base + ":x"), "x2"),
        (base + "}{", "braces"),  # must not break a Redis hash tag
    ]
    backends = {ns: type(backend)(ns) for ns, _ in nodes if ns != base}
    async with AsyncExitStack() as stack:
        for other in backends.values():
            stack.push_async_callback(other.cleanup)
        routers: dict[str, RoomRouter] = {}
        for ns, node_id in nodes:
            source = backend if ns == base else backends[ns]
            router = RoomRouter(
                source.broker(), namespace=ns, node_id=node_id,
                **{**TEST_ROUTER_OPTIONS, **backend.router_options},  # type: ignore[arg-type]
            )  # fmt: skip
            routers[node_id] = await stack.enter_async_context(router)
        expected = {
            node_id: {other for ns2, other in nodes if ns2 == ns and other != node_id}
            for ns, node_id in nodes
        }
        await eventually(
            lambda: [_assert_eq(r.live_nodes(), expected[n]) for n, r in routers.items()]
        )
        await routers["c"].member("in-c").join("c")
        await anyio.sleep(5 * TEST_ROUTER_OPTIONS["heartbeat_interval"])  # heartbeats flow
        for node_id, router in routers.items():
            assert router.live_nodes() == expected[node_id], node_id
            stats = router.stats()
            assert stats["dropped_decode"] == stats["dropped_control_decode"] == 0, node_id
            assert stats["broker_received"] == 0, node_id  # nobody published data yet
        if backend.supports_storage:
            # Redis: room "store" of base was written into the storage stream of base:recent.
            await routers["c"].publish("store", b"kept", persist=True)
            broker = routers["c"].broker
            for ns, count in ((base + ":recent", 0), (base, 1)):
                async with broker.storage_consumer(ns, "probe") as consumer:
                    assert await consumer.pending() == count, ns


async def test_a_long_room_is_persisted_and_recent(cluster: ClusterFactory) -> None:
    # RabbitMQ names the recent queue of a room after its routing key, hashed for long rooms:
    # the name must still be one AMQP clients accept.
    a, b = await cluster(2)
    member = b.member("m")
    await member.join(LONG_ROOM)
    sent = await a.publish(LONG_ROOM, b"kept", persist=True)
    [got] = await receive_n(member, 1)
    assert got.id == sent.id
    assert [e.id for e in await b.history(LONG_ROOM)] == [sent.id]


# -- caller-chosen ids and ambiguous publishes ------------------------------------------------


async def test_a_retry_with_the_same_id_is_stored_once(
    backend: Backend, cluster: ClusterFactory, tmp_path: Path
) -> None:
    [a] = await cluster(1)
    first = await a.publish("R", b"once", persist=True)
    again = await a.publish("R", b"once", persist=True, id=first.id)
    other = await a.publish("R", b"other", persist=True)
    assert again.id == first.id and again.payload == first.payload
    sink_path = tmp_path / "retry.db"
    worker = StorageWorker(
        backend.broker().storage_consumer(backend.namespace, "w"), SQLiteSink(sink_path)
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        # A backend whose storage queue drops a repeated id (NATS: Nats-Msg-Id) holds 2.
        queued = 2 if getattr(backend, "dedupes_storage", False) else 3
        await eventually(lambda: _assert_eq(worker.stats.acked, queued), timeout=30)
        worker.stop()
    assert worker.stats.written == 2
    async with SQLiteSink(sink_path) as sink:
        assert [e.id for e in await sink.history("R", after="", limit=10)] == [first.id, other.id]
    assert [e.id for e in await a.history("R")] == [first.id, other.id]


async def test_a_given_id_must_look_like_a_router_id() -> None:
    async with RoomRouter(MemoryBroker(unique_namespace()), linger=0) as router:
        good = IdGenerator().next()
        assert (await router.publish("R", b"x", id=good)).id == good
        for bad in ("", "not-an-id", good.upper(), str(uuid.uuid4()), good + "0", 7):
            with pytest.raises(ConfigurationError):
                await router.publish("R", b"x", id=bad)  # type: ignore[arg-type]


class MutingProxy:
    """A TCP proxy to a real server that can stop passing the server's answers on (``mute``):
    what the client writes still reaches the server, which acts on it, but the client never
    hears back -- the answer is lost after the write, as on a connection that dies then."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.muted = False

    async def serve(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
        self.port = listener.listeners[0].extra(anyio.abc.SocketAttribute.local_port)
        async with listener:
            task_status.started()
            await listener.serve(self._handle)

    async def _handle(self, client: anyio.abc.SocketStream) -> None:
        async with (
            client,
            await anyio.connect_tcp("127.0.0.1", self.target_port) as server,
            anyio.create_task_group() as tg,
        ):
            tg.start_soon(self._pump, client, server, False, tg.cancel_scope)
            tg.start_soon(self._pump, server, client, True, tg.cancel_scope)

    async def _pump(
        self,
        source: anyio.abc.SocketStream,
        sink: anyio.abc.SocketStream,
        answers: bool,
        scope: anyio.CancelScope,
    ) -> None:
        try:
            async for chunk in source:
                if not (answers and self.muted):
                    await sink.send(chunk)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass
        scope.cancel()


def _proxied_broker(backend: Backend, port: int) -> Broker:
    if isinstance(backend, RabbitMQBackend):
        from roomrouter.brokers.rabbitmq import RabbitMQBroker

        return RabbitMQBroker(f"amqp://guest:guest@127.0.0.1:{port}/", operation_timeout=1.0)
    from roomrouter.brokers.redis import RedisBroker

    sharded = isinstance(backend, RedisBackend) and backend.sharded
    return RedisBroker(host="127.0.0.1", port=port, operation_timeout=1.0, sharded=sharded)


# The memory broker has no wire; Kafka clients follow the broker's advertised address past a
# proxy, so Kafka has its own test (test_kafka.py, a frozen broker).
PROXIED = [n for n in selected_backends() if n in ("redis", "redis-sharded", "rabbitmq")]


@pytest.fixture(params=PROXIED)
async def proxied(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    backend = BACKENDS[request.param](unique_namespace())
    backend.available()
    try:
        yield backend
    finally:
        await backend.cleanup()


async def test_a_lost_answer_is_an_unknown_outcome(proxied: Backend) -> None:
    """The frame reaches the broker, which delivers and stores it, but the acknowledgement is
    lost: the publish must not say it did not happen; a retry by id carries the same id."""
    backend = proxied
    proxy = MutingProxy(5672 if isinstance(backend, RabbitMQBackend) else 6379)
    options = {**TEST_ROUTER_OPTIONS, **backend.router_options}
    async with (
        RoomRouter(backend.broker(), namespace=backend.namespace, **options) as b,  # type: ignore[arg-type]
        anyio.create_task_group() as tg,
    ):
        await tg.start(proxy.serve)
        async with RoomRouter(
            _proxied_broker(backend, proxy.port), namespace=backend.namespace, **options
        ) as a:  # type: ignore[arg-type]
            member = b.member("m")
            await member.join("R")
            await eventually(lambda: _assert_eq(a.remote_hosts("R"), {b.node_id}))
            proxy.muted = True
            with pytest.raises(PublishOutcomeUnknown) as info:
                await a.publish("R", b"maybe", persist=True)
            envelope_id = info.value.envelope_id
            assert envelope_id is not None and envelope_id in str(info.value)
            # It did happen: delivered live, and in the storage queue.
            [got] = await receive_n(member, 1)
            assert got.id == envelope_id
            async with b.broker.storage_consumer(backend.namespace, "probe") as probe:
                await eventually(lambda: _assert_pending(probe, 1), timeout=20)
            proxy.muted = False
            with anyio.fail_after(15):
                while True:  # the publisher connection comes back through the proxy
                    try:
                        await a.publish("R", b"maybe", persist=True, id=envelope_id)
                        break
                    except BrokerUnavailable:
                        await anyio.sleep(0.1)
            [again] = await receive_n(member, 1)
            assert again.id == envelope_id  # the copy a member can drop by id
        tg.cancel_scope.cancel()


async def _assert_pending(consumer: StorageConsumer, count: int) -> None:
    assert await consumer.pending() == count
