"""Direct publishing (``direct_max``): a room with few remote hosts is published to those nodes'
own channels, so no node receives its own publishes back. On every backend: the guarantees
hold whichever way a frame went; on those without it, ``to`` is ignored and nothing changes."""

from __future__ import annotations

import anyio
import pytest

from roomrouter import Envelope, RoomRouter

from .backends import BACKENDS, Backend
from .conftest import TEST_ROUTER_OPTIONS, ClusterFactory, selected_backends, unique_namespace
from .helpers import drain, eventually, forged_envelope, receive_n

pytestmark = pytest.mark.anyio

DIRECT = [n for n in selected_backends() if BACKENDS[n].supports_direct]
# Backends whose node channel hands frames to ``on_direct`` (RabbitMQ's addressed frames come
# through ``on_data``: tests/test_rabbitmq_direct.py has its own forged-frame tests).
NODE_CHANNEL = [n for n in DIRECT if not getattr(BACKENDS[n], "direct_on_data", False)]


def _assert_eq(actual: object, expected: object) -> None:
    assert actual == expected, (actual, expected)


async def _hosted_by(router: RoomRouter, room: str, nodes: set[str]) -> None:
    await eventually(lambda: _assert_eq(router.remote_hosts(room), nodes))


async def test_a_two_node_room_gets_no_echo(backend: Backend, cluster: ClusterFactory) -> None:
    a, b = await cluster(2)
    ma, mb = a.member("ma"), b.member("mb")
    await ma.join("R")
    await mb.join("R")
    await _hosted_by(a, "R", {b.node_id})
    await _hosted_by(b, "R", {a.node_id})
    before = {r.node_id: r.stats() for r in (a, b)}
    count = 25

    async def publish(router: RoomRouter) -> None:
        for i in range(count):
            await router.publish("R", f"{router.node_id} {i}".encode(), persist=i % 5 == 0
                                 and router.broker.supports_storage)  # fmt: skip

    async with anyio.create_task_group() as tg:
        tg.start_soon(publish, a)
        tg.start_soon(publish, b)
    for member, router in ((ma, a), (mb, b)):
        got = await receive_n(member, 2 * count)
        for origin in (a.node_id, b.node_id):
            mine = [e.payload for e in got if e.origin == origin]
            assert mine == [f"{origin} {i}".encode() for i in range(count)], (router, origin)
        assert await drain(member) == []
    for router in (a, b):
        old, new = before[router.node_id], router.stats()
        sent = new["broker_publishes"] - old["broker_publishes"]
        assert sent == count
        received = new["broker_received"] - old["broker_received"]
        if backend.supports_direct:
            assert new["direct_publishes"] - old["direct_publishes"] == count
            # Nothing irrelevant: exactly the other node's publishes, all on the node channel.
            assert received == count
            direct = 0 if getattr(backend, "direct_on_data", False) else count
            assert new["direct_received"] - old["direct_received"] == direct
            assert new["dropped_echo"] == old["dropped_echo"]
        else:
            assert router.direct_max == 0
            assert new["direct_publishes"] == 0 and new["direct_received"] == 0


@pytest.mark.parametrize("backend", DIRECT, indirect=True)
async def test_direct_max_zero_uses_the_room_channel(
    backend: Backend, cluster: ClusterFactory
) -> None:
    a, b = await cluster(2, direct_max=0)
    await a.member("ma").join("R")
    mb = b.member("mb")
    await mb.join("R")
    await _hosted_by(a, "R", {b.node_id})
    for i in range(10):
        await a.publish("R", b"%d" % i)
    assert [e.payload for e in await receive_n(mb, 10)] == [b"%d" % i for i in range(10)]
    # The room channel echoes every publish back to its sender, which drops it (unless the
    # server suppresses echoes: NATS's no_echo connection).
    echoes = 0 if getattr(backend, "no_echo", False) else 10
    await eventually(lambda: _assert_eq(a.stats()["dropped_echo"], echoes))
    assert a.stats()["direct_publishes"] == 0 and b.stats()["direct_received"] == 0


async def test_order_holds_while_hosts_come_and_go(
    backend: Backend, cluster: ClusterFactory
) -> None:
    """One publisher, a steady remote member and a third node whose member joins and leaves
    over and over: the room's remote hosts go 1 -> 2 -> 1, so the publisher switches between
    the node channels and the room channel mid-stream. Every frame reaches the steady member
    once, in publish order; the churning member's frames are in order too."""
    a, b = await cluster(2)
    [c] = await cluster(1)
    steady = b.member("steady")
    await steady.join("R")
    await a.member("local").join("R")
    await _hosted_by(a, "R", {b.node_id})
    total = 300
    churned: list[Envelope] = []
    done = anyio.Event()

    async def publish() -> None:
        for i in range(total):
            await a.publish("R", b"%d" % i)
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
    if a.direct_max >= 2:  # RabbitMQ: every publish named its 1 or 2 hosts
        assert stats["direct_publishes"] == stats["broker_publishes"], stats
    elif backend.supports_direct:  # both ways were used
        assert 0 < stats["direct_publishes"] < stats["broker_publishes"], stats


async def test_a_joiner_gets_what_is_published_after_its_join(
    backend: Backend, cluster: ClusterFactory
) -> None:
    """Publishes in flight while a third node's first join waits at the barrier: whatever the
    publisher sends after the join returned reaches the new host, though the publisher chose
    the node channel of the single old host a moment before."""
    a, b, c = await cluster(3)
    await b.member("old").join("R")
    await _hosted_by(a, "R", {b.node_id})
    joined_at: list[int] = []
    counter = 0
    stop = anyio.Event()

    async def publish() -> None:
        nonlocal counter
        while not stop.is_set():
            # Counted when called: a publish called before the join returned (still awaiting
            # its broker when the join returns) may or may not reach the newcomer.
            n, counter = counter, counter + 1
            await a.publish("R", b"%d" % n)
            await anyio.sleep(0.001)

    newcomer = c.member("new")
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(publish)
            await anyio.sleep(0.05)
            await newcomer.join("R")
            joined_at.append(counter)
            await anyio.sleep(0.1)
            stop.set()
    got = [int(e.payload) for e in await drain(newcomer, settle=0.5)]
    expected = list(range(joined_at[0], counter))
    assert [n for n in got if n >= joined_at[0]] == expected
    assert got == sorted(got)


@pytest.mark.parametrize("backend", NODE_CHANNEL, indirect=True)
async def test_garbage_and_forged_frames_on_the_node_channel(
    backend: Backend, cluster: ClusterFactory
) -> None:
    a, b = await cluster(2)
    member = b.member("m")
    await member.join("R")
    before = b.stats()
    for junk in (b"", b"\xff\xfe garbage", b"\xc1", b"r:R\x00" + b"x" * 100):
        await backend.inject_direct(b, junk)
    await backend.inject_direct(b, forged_envelope("not-hosted", b"nobody here"))
    await backend.inject_direct(b, forged_envelope("R", b"claims to be b", origin=b.node_id))
    # The node channel is as trusted as the control channels (a writer of either can reach
    # the node): a well-formed envelope of a hosted room is delivered.
    await backend.inject_direct(b, forged_envelope("R", b"raw but well-formed"))
    await eventually(
        lambda: _assert_eq(b.stats()["direct_received"] - before["direct_received"], 7)
    )
    await a.publish("R", b"real")
    assert [e.payload for e in await receive_n(member, 2)] == [b"raw but well-formed", b"real"]
    assert await drain(member) == []
    stats = b.stats()
    assert stats["dropped_decode"] - before["dropped_decode"] == 4
    assert stats["dropped_not_hosted"] - before["dropped_not_hosted"] == 1
    assert stats["dropped_echo"] - before["dropped_echo"] == 1
    assert stats["task_restarts"] == 0


async def test_direct_max_is_checked() -> None:
    from roomrouter import ConfigurationError
    from roomrouter.brokers.memory import MemoryBroker

    for bad in (-1, 1.5, "2"):
        with pytest.raises(ConfigurationError, match="direct_max"):
            RoomRouter(MemoryBroker(), direct_max=bad)  # type: ignore[arg-type]


async def test_a_broker_without_direct_publishing_is_never_given_to() -> None:
    """A backend with ``supports_direct = False`` is only ever given ``to=None`` (the Broker
    ABC has the parameter, so there is no call without it any more), and works."""
    from collections.abc import Collection

    from roomrouter.brokers.memory import MemoryBroker

    given: list[Collection[str] | None] = []

    class OldBroker(MemoryBroker):
        supports_direct = False

        async def publish(
            self, room: str, frame: bytes, *, to: Collection[str] | None = None
        ) -> None:
            given.append(to)
            await super().publish(room, frame)

        async def publish_persistent(
            self, room: str, frame: bytes, *, live: bool, to: Collection[str] | None = None
        ) -> None:
            given.append(to)
            await super().publish_persistent(room, frame, live=live)

    hub = f"old-{unique_namespace()}"
    opts = {**TEST_ROUTER_OPTIONS, "direct_max": 5}
    async with (
        RoomRouter(OldBroker(hub), namespace="ns", **opts) as a,
        RoomRouter(OldBroker(hub), namespace="ns", **opts) as b,
    ):
        assert a.direct_max == 0
        member = b.member("m")
        await member.join("R")
        await _hosted_by(a, "R", {b.node_id})
        sent = [await a.publish("R", b"live"), await a.publish("R", b"kept", persist=True)]
        assert given == [None, None]
        assert [e.id for e in await receive_n(member, 2)] == [e.id for e in sent]
