"""What travels on the wire, on every backend: frames forged by a raw client of the broker, names
that must stay apart between namespaces, and caller-chosen message ids."""

from __future__ import annotations

import hashlib
import re
import time
from contextlib import AsyncExitStack

import anyio
import pytest

from roomrouter import Envelope, RoomRouter
from roomrouter._envelope import IdGenerator, encode_envelope

from .backends import Backend
from .conftest import TEST_ROUTER_OPTIONS, ClusterFactory
from .helpers import drain, eventually, receive_n

pytestmark = pytest.mark.anyio

LONG_ROOM = "L" * 300  # RabbitMQ hashes routing keys of rooms this long


def _forged(room: str, payload: bytes, origin: str = "forger") -> bytes:
    return encode_envelope(
        Envelope(id=IdGenerator().next(), room=room, origin=origin, ts=time.time(), payload=payload)
    )


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
    await backend.inject(b, "r1", _forged("victim", b"forged on r1"))
    await backend.inject(b, LONG_ROOM, _forged("victim", b"forged on the long room"))
    await backend.inject(b, "r1", _forged(LONG_ROOM, b"forged for the long room"))
    # Garbage from a raw client is a counted drop too, and nothing good is lost around it.
    for junk in (b"", b"\xff\xfe garbage", b"\xc1"):
        await backend.inject(b, "r1", junk)
    # A well-formed envelope of the right room from a raw client is delivered (the check is
    # the room, not the publisher).
    await backend.inject(b, "r1", _forged("r1", b"honest raw"))
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
