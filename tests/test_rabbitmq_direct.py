"""RabbitMQ direct publishing: a publish names the room's remote hosts (routing key + BCC) and
reaches exactly their queues, so no node reads its own publishes back, whatever the number of
hosts (docs/architecture.md, "Direct publishing"; guarantees 1-4 and 9)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

import aiormq
import anyio
import pytest
from pamqp import commands

from roomrouter import Envelope, RoomRouter
from roomrouter.brokers.rabbitmq import RabbitMQBroker, routing_key
from roomrouter.brokers.rabbitmq._names import addressed_key, room_words
from roomrouter.brokers.rabbitmq._wire import bcc_properties, publish_frames

from .backends import RabbitMQBackend
from .conftest import TEST_ROUTER_OPTIONS, unique_namespace
from .helpers import drain, eventually, forged_envelope, receive_n

pytestmark = pytest.mark.anyio

AMQP = "amqp://guest:guest@127.0.0.1:5672/"
NodeFactory = Callable[..., Awaitable[list[RoomRouter]]]
# What a node counts as read from RabbitMQ but not for its members.
IRRELEVANT = ("dropped_echo", "dropped_not_hosted", "dropped_room_mismatch", "dropped_decode")


@pytest.fixture
async def rabbit() -> AsyncIterator[RabbitMQBackend]:
    backend = RabbitMQBackend(unique_namespace())
    backend.available()
    try:
        yield backend
    finally:
        await backend.cleanup()


@pytest.fixture
async def nodes(rabbit: RabbitMQBackend) -> AsyncIterator[NodeFactory]:
    async with AsyncExitStack() as stack:

        async def start(count: int = 3, **options: Any) -> list[RoomRouter]:
            opts = {**TEST_ROUTER_OPTIONS, **rabbit.router_options, **options}
            return [
                await stack.enter_async_context(
                    RoomRouter(RabbitMQBroker.from_url(AMQP), namespace=rabbit.namespace, **opts)
                )
                for _ in range(count)
            ]

        yield start


def _eq(actual: object, expected: object) -> None:
    assert actual == expected, (actual, expected)


def _filtered(router: RoomRouter) -> int:
    broker = router.broker
    assert isinstance(broker, RabbitMQBroker)
    return broker.filtered


async def _raw_publish(
    exchange: str, key: str, body: bytes, headers: dict[str, Any] | None = None
) -> None:
    """A raw AMQP client's publish, as a foreign or forging publisher would send it."""
    connection = await aiormq.connect(AMQP)
    try:
        channel = await connection.channel()
        await channel.basic_publish(
            body,
            exchange=exchange,
            routing_key=key,
            properties=commands.Basic.Properties(headers=headers),
        )
    finally:
        await connection.close()


# -- names and wire ---------------------------------------------------------------------------


def test_addressed_keys_fit_amqp_and_start_with_a_room_word() -> None:
    for room, node in (
        ("R", "n1"),
        ("é" * 60, "node-" + "x" * 120),  # plain room word, long node: hashed form
        ("r" * 400, "n"),  # the room's routing key is its hash already
        ("ä" * 500, "ü" * 100),
    ):
        key = addressed_key(room, node)
        assert len(key.encode()) <= 255 and key.isascii()
        first, dot, second = key.partition(".")
        assert dot and "." not in second and first in room_words(room)
        assert addressed_key(room, node) != addressed_key(room, node + "2")
    assert addressed_key("R", "n1") == f"{routing_key('R')}.{routing_key('n1')}"


def test_bcc_properties_match_pamqp() -> None:
    import pamqp.frame
    from pamqp.header import ContentHeader

    body, key = b"x" * 10, addressed_key("room", "n1")
    bcc = [addressed_key("room", "n2"), addressed_key("room", "n3")]
    properties = commands.Basic.Properties(headers={"BCC": bcc})
    expected = b"".join(
        pamqp.frame.marshal(frame, 3)
        for frame in (
            commands.Basic.Publish(exchange="x", routing_key=key),
            ContentHeader(0, len(body), properties),
        )
    )
    wire = publish_frames(
        3,
        b"x",
        key.encode(),
        body,
        4088,
        bcc_properties([k.encode() for k in bcc]),
        persistent=False,
    )
    assert wire.startswith(expected)


# -- no echo, nothing irrelevant ---------------------------------------------------------------


@pytest.mark.parametrize("remote", [1, 2, 3])
async def test_no_echo_with_any_number_of_remote_hosts(nodes: NodeFactory, remote: int) -> None:
    """A publisher hosting R and ``remote`` other hosts, plus a bystander hosting another
    room: every host reads exactly the other nodes' publishes, in order, and nothing else;
    the publisher reads nothing back; the bystander reads nothing at all."""
    routers = await nodes(remote + 2)
    pub, hosts, bystander = routers[0], routers[1:-1], routers[-1]
    members = [r.member("m") for r in routers[:-1]]
    for member in members:
        await member.join("R")
    await bystander.member("other").join("S")
    for router in routers:
        others = {r.node_id for r in routers[:-1]} - {router.node_id}
        if router is not bystander:
            await eventually(lambda router=router, o=others: _eq(router.remote_hosts("R"), o))
    before = {r.node_id: r.stats() for r in routers}
    count = 60

    async def publish(router: RoomRouter, lane: int) -> None:
        for i in range(count):
            await router.publish("R", b"%d %d" % (lane, i), persist=i % 4 == 0)

    async with anyio.create_task_group() as tg:
        for lane in range(3):  # concurrent publishes, several in flight on one channel
            tg.start_soon(publish, pub, lane)
        tg.start_soon(publish, hosts[0], 9)
    expected = [b"%d %d" % (lane, i) for lane in range(3) for i in range(count)]
    for member in members[1:]:
        got = await receive_n(member, 4 * count)  # hosts[0]'s own publishes are local
        from_pub = [e.payload for e in got if e.origin == pub.node_id]
        for lane in range(3):
            lane_of = [p for p in from_pub if p.startswith(b"%d " % lane)]
            assert lane_of == [b"%d %d" % (lane, i) for i in range(count)]
        assert sorted(from_pub) == sorted(expected)
        assert await drain(member) == []
    mine = await receive_n(members[0], 4 * count)  # local ones and hosts[0]'s
    assert [e.payload for e in mine if e.origin == hosts[0].node_id] == [
        b"9 %d" % i for i in range(count)
    ]
    # A node whose loop ran late past its lease resynchronises, and until then publishes every
    # room on its room key (docs/architecture.md, rule 5): the room's hosts, itself included,
    # then read those frames and drop the foreign copies. Exact counts hold without that.
    resynced = any(r.stats()["resyncs"] > before[r.node_id]["resyncs"] for r in routers)
    for router in routers:
        old, new = before[router.node_id], router.stats()
        read = new["broker_received"] - old["broker_received"]
        if router is pub:
            want = count  # hosts[0]'s publishes only: no echo
        elif router is bystander:
            want = 0
        elif router is hosts[0]:
            want = 3 * count
        else:
            want = 4 * count
        if resynced:
            assert read >= want, (router, read, want)
        else:
            _eq(read, want)
        for name in IRRELEVANT:
            _eq((router.node_id, name, new[name] - old[name]), (router.node_id, name, 0))
        assert _filtered(router) == 0
    stats = pub.stats()
    # One confirmed publish per message, addressed to all the hosts at once.
    _eq(stats["broker_publishes"] - before[pub.node_id]["broker_publishes"], 3 * count)
    _eq(stats["direct_publishes"] - before[pub.node_id]["direct_publishes"], 3 * count)


async def test_persisted_addressed_publishes_are_stored_once_and_cached(
    nodes: NodeFactory, rabbit: RabbitMQBackend
) -> None:
    a, b, c = await nodes(3)
    members = [router.member("m") for router in (a, b, c)]
    for member in members:
        await member.join("R")
    await eventually(lambda: _eq(a.remote_hosts("R"), {b.node_id, c.node_id}))
    sent = [await a.publish("R", b"%d" % i, persist=True) for i in range(20)]
    connection = await aiormq.connect(AMQP)
    try:
        channel = await connection.channel()
        ok = await channel.queue_declare(f"rr.{rabbit.namespace}.store", passive=True)
        assert ok.message_count == 20  # BCC names the store once: one copy per frame
    finally:
        await connection.close()
    recent = await a.broker.recent("R")
    assert len(recent.frames) == 20
    for member in members[1:]:
        got = await receive_n(member, 20)
        assert [e.id for e in got] == [e.id for e in sent]


@pytest.mark.parametrize("options", [{"direct_max": 1}, {}], ids=["room-key", "addressed"])
async def test_order_while_hosts_come_and_go_both_ways(
    nodes: NodeFactory, options: dict[str, Any]
) -> None:
    """``direct_max=1``: the publisher switches between an addressed key (one remote host) and
    the room key (two) mid-stream; with the default it switches between one and two addressed
    keys. All of it arrives through the steady host's one queue, in publish order."""
    a, b, c = await nodes(3, **options)
    steady = b.member("steady")
    await steady.join("R")
    await a.member("local").join("R")
    await eventually(lambda: _eq(a.remote_hosts("R"), {b.node_id}))
    total, churned = 300, list[Envelope]()
    done = anyio.Event()

    async def publish() -> None:
        for i in range(total):
            await a.publish("R", b"%d" % i, persist=i % 7 == 0)
            if i % 10 == 0:
                await anyio.sleep(0.002)
        done.set()

    async def churn() -> None:
        member = c.member("churner")
        while not done.is_set():
            await member.join("R")
            await anyio.sleep(0.01)
            await member.leave("R")
            churned.extend(await drain(member, settle=0))
            await anyio.sleep(0.01)

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(churn)
            tg.start_soon(publish)
    got = await receive_n(steady, total, timeout=10)
    assert [e.payload for e in got] == [b"%d" % i for i in range(total)]
    assert await drain(steady) == []
    seen = [int(e.payload) for e in churned]
    assert seen == sorted(seen) and len(seen) == len(set(seen))
    stats = a.stats()
    if options:  # both the room key and addressed keys were used
        assert 0 < stats["direct_publishes"] < stats["broker_publishes"], stats
    else:
        assert stats["direct_publishes"] == stats["broker_publishes"], stats
    _eq(b.stats()["dropped_echo"], 0)
    if not options:
        _eq(a.stats()["dropped_echo"], 0)


async def test_a_joiner_during_publishes_gets_everything_after_its_join(
    nodes: NodeFactory,
) -> None:
    """Two old hosts, publishes addressed to them in flight, a third node's first join: every
    publish that starts after the join returned names it too."""
    a, b, c, d = await nodes(4)
    await b.member("old").join("R")
    await c.member("old").join("R")
    await eventually(lambda: _eq(a.remote_hosts("R"), {b.node_id, c.node_id}))
    counter, joined_at = 0, -1
    stop = anyio.Event()

    async def publish() -> None:
        nonlocal counter
        while not stop.is_set():
            # Counted when it starts: a publish that started before the join returned may
            # miss the new host (guarantee 2 covers only those that start after).
            counter += 1
            await a.publish("R", b"%d" % (counter - 1))
            await anyio.sleep(0.001)

    newcomer = d.member("new")
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(publish)
            await anyio.sleep(0.05)
            await newcomer.join("R")
            joined_at = counter
            await anyio.sleep(0.15)
            stop.set()
    got = [int(e.payload) for e in await drain(newcomer, settle=0.5)]
    assert [n for n in got if n >= joined_at] == list(range(joined_at, counter))
    assert got == sorted(got)
    _eq(a.stats()["dropped_echo"], 0)


# -- garbage and forgeries on the node queue -----------------------------------------------------


async def test_garbage_and_forged_addressed_frames(nodes: NodeFactory) -> None:
    a, b = await nodes(2)
    member = b.member("m")
    await member.join("R")
    await a.member("m").join("S")  # a hosts S, b does not
    broker = b.broker
    assert isinstance(broker, RabbitMQBroker)
    data_x = broker.data_exchange
    to_b = addressed_key("R", b.node_id)
    before, filtered = b.stats(), broker.filtered
    # Garbage by b's addressed key of R: read, counted, dropped.
    for junk in (b"", b"\xff\xfe garbage", b"\xc1"):
        await _raw_publish(data_x, to_b, junk)
    # A frame claiming another room than the key's: dropped (the room is the key's).
    await _raw_publish(data_x, to_b, forged_envelope("S", b"claims S"))
    # Forged origin: taken for an echo and dropped.
    await _raw_publish(data_x, to_b, forged_envelope("R", b"claims b", origin=b.node_id))
    # A forged BCC that reaches b's queue under a key of a room b does not host: filtered.
    await _raw_publish(
        data_x, addressed_key("S", a.node_id), forged_envelope("S", b"to S"), {"BCC": [to_b]}
    )
    # A forged CC header naming b on a key of nobody: RabbitMQ routes CC like BCC (and keeps
    # the header); the key's room word is R's, so it is an envelope of R like any other.
    await _raw_publish(
        data_x, addressed_key("R", "nobody"), forged_envelope("R", b"cc"), {"CC": [to_b]}
    )
    # Addressed to b for a room it does not host: RabbitMQ routes it nowhere.
    await _raw_publish(data_x, addressed_key("S", b.node_id), forged_envelope("S", b"never"))
    await eventually(lambda: _eq(a.remote_hosts("R"), {b.node_id}))
    await a.publish("R", b"real")
    got = [e.payload for e in await receive_n(member, 2)]
    assert got == [b"cc", b"real"]
    assert await drain(member) == []
    stats = b.stats()
    _eq(stats["dropped_decode"] - before["dropped_decode"], 3)
    _eq(stats["dropped_room_mismatch"] - before["dropped_room_mismatch"], 1)
    _eq(stats["dropped_echo"] - before["dropped_echo"], 1)
    _eq(broker.filtered - filtered, 1)
    _eq(stats["task_restarts"], 0)
    _eq(a.stats()["task_restarts"], 0)


async def test_a_node_that_left_is_not_reached_by_a_stale_address(nodes: NodeFactory) -> None:
    """Once b unbound R, a publish still addressed to b (a publisher that has not processed
    b's Unhost yet) is dropped by RabbitMQ: b's queue never gets it (guarantee 4)."""
    a, b = await nodes(2)
    member = b.member("m")
    await member.join("R")
    await a.member("m").join("R")
    await eventually(lambda: _eq(a.remote_hosts("R"), {b.node_id}))
    await member.leave("R")
    backend = RabbitMQBackend(a.namespace)
    await backend.check_subscriptions([b])  # b's bindings of R are gone
    broker = a.broker
    assert isinstance(broker, RabbitMQBroker)
    before = b.stats()["broker_received"]
    await broker.publish("R", forged_envelope("R", b"stale"), to=[b.node_id])
    await a.publish("S", b"x")  # nothing
    await anyio.sleep(0.2)
    _eq(b.stats()["broker_received"], before)
    _eq(_filtered(b), 0)
