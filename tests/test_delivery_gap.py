"""A lost data connection is a gap, never silent (issue 19 case 7).

After the broker restores its data connection, members of the rooms the node hosts recover
what was published meanwhile from the room's recent cache (persisted messages: exactly once,
in order), and are told with :class:`DeliveryGap` where the cache cannot prove that nothing
else was missed (live-only traffic, no cache, a cache that no longer reaches back)."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Awaitable

import anyio
import pytest
from redis.asyncio import Redis

from roomrouter import Broker, DeliveryGap, Envelope, Member, RoomRouter, RoomRouterError
from roomrouter.brokers._base import BrokerContext
from roomrouter.brokers.memory import MemoryBroker
from roomrouter.brokers.redis import RedisBroker

from .backends import Backend, require_tcp
from .conftest import TEST_ROUTER_OPTIONS, unique_namespace
from .faulty import ControlFault
from .helpers import eventually

pytestmark = pytest.mark.anyio


class DataOutage(ControlFault):
    """A broker whose data connection can be 'down': data frames are lost until
    :meth:`restore`, which then tells the router it reconnected, as a real backend does."""

    def __init__(self, inner: Broker) -> None:
        super().__init__(inner)
        self.down = False
        self.lost = 0

    async def start(self, context: BrokerContext) -> None:
        def on_data(room: str, frame: bytes) -> None:
            if self.down:
                self.lost += 1
            else:
                context.on_data(room, frame)

        def on_direct(frame: bytes) -> None:
            if self.down:
                self.lost += 1
            else:
                context.on_direct(frame)

        await super().start(dataclasses.replace(context, on_data=on_data, on_direct=on_direct))

    def restore(self) -> None:
        self.down = False
        self.fake_reconnect()


async def _collect(member: Member, settle: float = 0.3) -> tuple[list[Envelope], list[str]]:
    """What arrives until nothing came for ``settle`` seconds, and the rooms of the gaps."""
    got: list[Envelope] = []
    gaps: list[str] = []
    while True:
        with anyio.move_on_after(settle) as scope:
            try:
                got.append(await member.receive())
            except DeliveryGap as gap:
                assert gap.member_id == member.id
                gaps.append(gap.room)
        if scope.cancelled_caught:
            return got, gaps


def _assert(condition: bool) -> None:
    assert condition


async def test_persisted_messages_missed_in_an_outage_are_recovered_once_in_order(
    backend: Backend,
) -> None:
    """On every backend with a recent cache: its order is the order frames would have come in."""
    if not backend.supports_storage:
        pytest.skip(f"{backend.name} has no recent cache")
    opts = {**TEST_ROUTER_OPTIONS, **backend.router_options, "namespace": backend.namespace}
    outage = DataOutage(backend.broker())
    async with (
        RoomRouter(backend.broker(), **opts) as a,  # type: ignore[arg-type]
        RoomRouter(outage, **opts) as b,  # type: ignore[arg-type]
    ):
        saved, chat, both = b.member("saved"), b.member("chat"), b.member("both")
        await saved.join("saved")
        await chat.join("chat")
        await both.join("saved")
        await both.join("chat")
        await eventually(lambda: _assert(a.remote_hosts("chat") == {b.node_id}))
        await eventually(lambda: _assert(a.remote_hosts("saved") == {b.node_id}))
        sent: list[Envelope] = []
        for i in range(3):
            sent.append(await a.publish("saved", b"before %d" % i, persist=True))
            await a.publish("chat", b"before %d" % i)
        await eventually(lambda: _assert(saved.pending() == 3 and chat.pending() == 3), timeout=10)
        outage.down = True
        for i in range(10):
            sent.append(await a.publish("saved", b"during %d" % i, persist=True))
            await a.publish("chat", b"during %d" % i)
        await anyio.sleep(0.5)  # frames in flight reach the outage, not the members
        assert outage.lost == 20
        outage.restore()
        await eventually(lambda: _assert(saved.pending() == 13), timeout=10)  # recovered
        for i in range(3):
            sent.append(await a.publish("saved", b"after %d" % i, persist=True))
            await a.publish("chat", b"after %d" % i)
        got, gaps = await _collect(saved)
        assert [e.id for e in got] == [e.id for e in sent] and gaps == []
        got, gaps = await _collect(chat)
        assert gaps == ["chat"], "live-only messages were lost: the member must be told"
        assert [e.payload for e in got] == [b"before %d" % i for i in range(3)] + [
            b"after %d" % i for i in range(3)
        ]
        got, gaps = await _collect(both)
        assert gaps == ["chat"]
        assert [e.id for e in got if e.room == "saved"] == [e.id for e in sent]
        stats = b.stats()
        assert stats["recovered_after_reconnect"] == 20  # 10 missed, to two members
        assert stats["delivery_gaps"] == 1
        assert stats["dropped_duplicate"] == 0  # the later ones were not in the cache read


async def test_a_reconnect_that_lost_nothing_delivers_nothing_twice() -> None:
    ns = unique_namespace()
    outage = DataOutage(MemoryBroker(ns))
    async with (
        RoomRouter(MemoryBroker(ns), **TEST_ROUTER_OPTIONS) as a,
        RoomRouter(outage, **TEST_ROUTER_OPTIONS) as b,
    ):
        member = b.member("m")
        await member.join("saved")
        await eventually(lambda: _assert(a.remote_hosts("saved") == {b.node_id}))
        sent = [await a.publish("saved", b"%d" % i, persist=True) for i in range(5)]
        await eventually(lambda: _assert(member.pending() == 5))
        outage.restore()
        async with anyio.create_task_group() as tg:  # publishes racing the cache read
            for i in range(5, 10):
                tg.start_soon(_append, sent, a.publish("saved", b"%d" % i, persist=True))
        got, gaps = await _collect(member)
        assert gaps == []
        assert sorted(e.id for e in got) == sorted(e.id for e in sent)
        assert len(got) == 10


async def _append(into: list[Envelope], publish: Awaitable[Envelope]) -> None:
    into.append(await publish)


async def test_a_room_that_had_no_message_yet_is_told() -> None:
    """Nothing delivered before the outage: the node cannot tell which cached messages it
    missed, so it says so instead of guessing."""
    ns = unique_namespace()
    outage = DataOutage(MemoryBroker(ns))
    async with (
        RoomRouter(MemoryBroker(ns), **TEST_ROUTER_OPTIONS) as a,
        RoomRouter(outage, **TEST_ROUTER_OPTIONS) as b,
    ):
        member = b.member("m")
        await member.join("fresh")
        await eventually(lambda: _assert(a.remote_hosts("fresh") == {b.node_id}))
        outage.down = True
        await a.publish("fresh", b"lost", persist=True)
        outage.restore()
        with anyio.fail_after(5):
            with pytest.raises(DeliveryGap) as info:
                await member.receive()
        assert info.value.room == "fresh" and isinstance(info.value, RoomRouterError)
        # Raised once; the member goes on.
        await a.publish("fresh", b"next", persist=True)
        with anyio.fail_after(5):
            assert (await member.receive()).payload == b"next"


async def test_the_gap_comes_in_stream_order_and_batches_stop_at_it() -> None:
    ns = unique_namespace()
    outage = DataOutage(MemoryBroker(ns))
    async with (
        RoomRouter(MemoryBroker(ns), **TEST_ROUTER_OPTIONS) as a,
        RoomRouter(outage, **TEST_ROUTER_OPTIONS) as b,
    ):
        member = b.member("m")
        await member.join("chat")
        await eventually(lambda: _assert(a.remote_hosts("chat") == {b.node_id}))
        await a.publish("chat", b"1")
        await a.publish("chat", b"2")
        await eventually(lambda: _assert(member.pending() == 2))
        outage.down = True
        await a.publish("chat", b"lost")
        outage.restore()
        await a.publish("chat", b"3")
        await eventually(lambda: _assert(member.pending() == 4))  # the gap counts as queued
        assert [e.payload for e in await member.receive_batch()] == [b"1", b"2"]
        with pytest.raises(DeliveryGap):
            await member.receive_batch()
        with anyio.fail_after(5):
            assert [e.payload for e in await member.receive_batch()] == [b"3"]
        # A gap survives a full inbox with drop_oldest: it is never the one dropped.
        outage.down = True
        await a.publish("chat", b"lost again")
        outage.restore()
        for i in range(b.inbox_size + 5):
            await a.publish("chat", b"x%d" % i)
        await eventually(lambda: _assert(b.stats()["dropped_overflow"] >= 5))
        with pytest.raises(DeliveryGap):
            member.receive_nowait()


# -- Redis: the subscriber connection killed by the server -------------------------------------


@pytest.fixture
async def redis() -> AsyncIterator[Redis]:
    require_tcp("127.0.0.1", 6379, "Redis")
    client = Redis(host="127.0.0.1", port=6379)
    try:
        yield client
    finally:
        await client.aclose()


def _router(namespace: str) -> RoomRouter:
    broker = RedisBroker(host="127.0.0.1", port=6379, max_backoff=0.5, operation_timeout=2)
    return RoomRouter(broker, namespace=namespace, **TEST_ROUTER_OPTIONS)


async def _kill(redis: Redis, name: str) -> int:
    """CLIENT KILL of one pub/sub connection by its name, as Redis does to a subscriber over
    its ``client-output-buffer-limit pubsub``."""
    killed = 0
    for client in await redis.client_list(_type="pubsub"):
        if client.get("name") == name:
            await redis.execute_command("CLIENT", "KILL", "ID", client["id"])
            killed += 1
    return killed


async def test_a_subscriber_killed_by_redis_loses_nothing_silently(redis: Redis) -> None:
    ns = unique_namespace()
    async with _router(ns) as a, _router(ns) as b:
        saved, chat = b.member("saved"), b.member("chat")
        await saved.join("saved")
        await chat.join("chat")
        await eventually(lambda: _assert(a.remote_hosts("saved") == {b.node_id}))
        await eventually(lambda: _assert(a.remote_hosts("chat") == {b.node_id}))
        sent: list[Envelope] = []
        for i in range(5):
            sent.append(await a.publish("saved", b"before %d" % i, persist=True))
            await a.publish("chat", b"before %d" % i)
        await eventually(lambda: _assert(saved.pending() == 5 and chat.pending() == 5))
        assert isinstance(b.broker, RedisBroker)
        assert await _kill(redis, b.broker.client_name("sub")) == 1
        live: list[Envelope] = []
        async with anyio.create_task_group() as tg:  # a burst while b reconnects
            for i in range(40):
                tg.start_soon(_append, sent, a.publish("saved", b"during %d" % i, persist=True))
                tg.start_soon(_append, live, a.publish("chat", b"during %d" % i))
        await eventually(lambda: _assert(b.stats()["reconnects"] == 1), timeout=5)
        for i in range(5):
            sent.append(await a.publish("saved", b"after %d" % i, persist=True))
            await a.publish("chat", b"after %d" % i)
        got, gaps = await _collect(saved, settle=0.5)
        assert gaps == []
        assert [e.id for e in got] == sorted(e.id for e in sent)  # all, once, in order
        got, gaps = await _collect(chat, settle=0.5)
        assert gaps == ["chat"], f"{50 - len(got)} live messages lost and nobody was told"


async def test_a_position_the_cache_no_longer_holds_is_told_and_the_rest_recovered() -> None:
    ns = unique_namespace()
    outage = DataOutage(MemoryBroker(ns, recent_size=5))
    async with (
        RoomRouter(MemoryBroker(ns, recent_size=5), **TEST_ROUTER_OPTIONS) as a,
        RoomRouter(outage, **TEST_ROUTER_OPTIONS) as b,
    ):
        member = b.member("m")
        await member.join("saved")
        await eventually(lambda: _assert(a.remote_hosts("saved") == {b.node_id}))
        first = await a.publish("saved", b"seen", persist=True)
        await eventually(lambda: _assert(member.pending() == 1))
        outage.down = True
        missed = [await a.publish("saved", b"%d" % i, persist=True) for i in range(8)]
        outage.restore()  # the cache (5 entries) no longer holds `first`
        got, gaps = await _collect(member)
        assert gaps == ["saved"]
        assert [e.id for e in got] == [first.id] + [e.id for e in missed[-5:]]
