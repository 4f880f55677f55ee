"""The contract suite: docs/architecture.md guarantees 1-5 and 9, for every backend, with three
nodes that each have their own broker connections."""

from __future__ import annotations

import anyio
import pytest

from roomrouter import (
    InvalidRoomName,
    MemberClosed,
    PayloadTooLarge,
    RoomRouter,
)

from .backends import Backend
from .conftest import ClusterFactory
from .helpers import drain, eventually, receive_n

pytestmark = pytest.mark.anyio


async def test_every_node_sees_the_others(cluster: ClusterFactory) -> None:
    routers = await cluster(3)
    ids = {r.node_id for r in routers}
    assert len(ids) == 3
    for router in routers:
        await eventually(lambda r=router: _assert_eq(r.live_nodes(), ids - {r.node_id}))


# -- guarantee 2: join happens-before publish => delivered ----------------------------------


async def test_join_then_publish_from_other_node_is_delivered(cluster: ClusterFactory) -> None:
    a, b, c = await cluster(3)
    members = [a.member("m-a"), b.member("m-b")]
    # Many rooms, each published to the instant the join returns, from another node: no sleep,
    # so only the join barrier can make this pass.
    for i in range(40):
        room = f"fresh-{i}"
        joiner = members[i % 2]
        await joiner.join(room)
        publisher = c if i % 3 else (b if joiner is members[0] else a)
        sent = await publisher.publish(room, f"msg {i}".encode())
        [got] = await receive_n(joiner, 1, timeout=5)
        assert got.id == sent.id and got.payload == f"msg {i}".encode()


async def test_node_started_after_join_knows_the_host(cluster: ClusterFactory) -> None:
    [a] = await cluster(1)
    member = a.member("early")
    await member.join("lobby")
    [late] = await cluster(1)  # a node that starts later must learn the host while starting
    sent = await late.publish("lobby", b"from the newcomer")
    [got] = await receive_n(member, 1)
    assert got.id == sent.id


# -- guarantee 1: no leak, no duplicate -------------------------------------------------------


async def test_no_leak_and_no_duplicate(cluster: ClusterFactory) -> None:
    a, b, c = await cluster(3)
    in_r = [a.member("a1"), a.member("a2"), b.member("b1")]
    for m in in_r:
        await m.join("R")
    outsider_a = a.member("a-out")
    outsider_c = c.member("c-out")
    await outsider_a.join("S")
    await outsider_c.join("S")
    before_c = c.stats()["broker_received"]

    sent = [await pub.publish("R", f"{i}".encode()) for i, pub in enumerate([a, b, c] * 10)]
    for m in in_r:
        got = await receive_n(m, len(sent))
        assert sorted(e.id for e in got) == sorted(e.id for e in sent)
        assert await drain(m) == []  # nothing twice
    assert await drain(outsider_a) == [] and await drain(outsider_c) == []
    # Dynamic subscription: c hosts no member of R, so the broker delivered it nothing of R
    # (its own publishes are not echoed back either, nobody else hosting... a and b do).
    assert c.stats()["broker_received"] == before_c
    assert c.stats()["dropped_not_hosted"] == 0


async def test_left_member_receives_nothing_more(cluster: ClusterFactory) -> None:
    a, b, _ = await cluster(3)
    stay, go = b.member("stay"), b.member("go")
    await stay.join("R")
    await go.join("R")
    await a.publish("R", b"one")
    await receive_n(go, 1)
    await go.leave("R")
    await a.publish("R", b"two")
    assert [e.payload for e in await receive_n(stay, 2)] == [b"one", b"two"]
    assert await drain(go) == []


async def test_exclude_skips_the_sender(cluster: ClusterFactory) -> None:
    a, b, _ = await cluster(3)
    sender, other, remote = a.member("sender"), a.member("other"), b.member("remote")
    for m in (sender, other, remote):
        await m.join("R")
    await a.publish("R", b"x", exclude=sender)
    await receive_n(other, 1)
    await receive_n(remote, 1)
    assert await drain(sender) == []


# -- guarantee 3: order -------------------------------------------------------------------------


async def test_per_publisher_order_under_concurrency(cluster: ClusterFactory) -> None:
    a, b, c = await cluster(3)
    receivers = [a.member("ra"), b.member("rb"), c.member("rc")]
    for m in receivers:
        await m.join("ordered")
    sent: list[str] = []

    async def publish(i: int) -> None:
        envelope = await b.publish("ordered", i.to_bytes(4, "big"))
        sent.append(envelope.id)

    async with anyio.create_task_group() as tg:
        for i in range(300):
            tg.start_soon(publish, i)
    expected = sorted(sent)  # ids of one node increase in publish-call order
    for m in receivers:
        got = await receive_n(m, 300)
        assert [e.id for e in got] == expected
        payloads = [int.from_bytes(e.payload, "big") for e in got]
        assert payloads == sorted(payloads)


async def test_ids_are_unique_and_increasing_per_node(cluster: ClusterFactory) -> None:
    [a] = await cluster(1)
    ids = [(await a.publish("any", b"")).id for _ in range(2000)]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)


# -- guarantee 4: dynamic subscription is exact --------------------------------------------------


async def test_subscriptions_match_local_rooms(backend: Backend, cluster: ClusterFactory) -> None:
    a, b, c = await cluster(3)
    ma, mb, mc = a.member("ma"), b.member("mb"), c.member("mc")
    for room in ("x", "y", "z"):
        await ma.join(room)
    await mb.join("y")
    await mc.join("only-c")
    await backend.check_subscriptions([a, b, c])
    assert a.subscribed_rooms == {"x", "y", "z"} and b.subscribed_rooms == {"y"}

    await ma.leave("x")
    await mb.close()
    await mc.join("x")

    def settled() -> None:
        for r in (a, b, c):
            assert r.subscribed_rooms == r.local_rooms

    await eventually(settled)
    await backend.check_subscriptions([a, b, c])
    assert b.subscribed_rooms == frozenset()


async def test_join_and_leave_many_rooms_batches(backend: Backend, cluster: ClusterFactory) -> None:
    a, b, _ = await cluster(3)
    member = a.member("busy")
    rooms = [f"room-{i}" for i in range(300)]
    async with anyio.create_task_group() as tg:
        for room in rooms:
            tg.start_soon(member.join, room)
    assert a.subscribed_rooms == set(rooms)
    # Batched: far fewer subscribe commands than rooms.
    assert a.stats()["subscribe_batches"] < 60
    await backend.check_subscriptions([a, b])
    for room in rooms[:150]:
        await member.leave(room)
    await eventually(lambda: _assert_eq(a.subscribed_rooms, set(rooms[150:])))
    await backend.check_subscriptions([a, b])


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


# -- guarantee 5: bypass is exact ----------------------------------------------------------------


async def test_bypass_makes_zero_broker_publishes(cluster: ClusterFactory) -> None:
    a, b, c = await cluster(3)
    local1, local2 = a.member("l1"), a.member("l2")
    await local1.join("local-only")
    await local2.join("local-only")
    before = [r.stats() for r in (a, b, c)]
    for i in range(50):
        await a.publish("local-only", f"{i}".encode())
    await a.publish("nobody-anywhere", b"void")
    assert len(await receive_n(local1, 50)) == 50
    assert len(await receive_n(local2, 50)) == 50
    after = [r.stats() for r in (a, b, c)]
    assert after[0]["broker_publishes"] == before[0]["broker_publishes"]
    assert after[0]["bypassed_publishes"] == before[0]["bypassed_publishes"] + 51
    for old, new in zip(before, after, strict=True):
        assert new["broker_received"] == old["broker_received"]

    # Once another node hosts the room, the broker is used (and only then).
    remote = b.member("remote")
    await remote.join("local-only")
    await a.publish("local-only", b"now remote too")
    assert a.stats()["broker_publishes"] == before[0]["broker_publishes"] + 1
    [got] = await receive_n(remote, 1)
    assert got.payload == b"now remote too"
    # The publisher's own frame is not delivered twice to its local members.
    assert [e.payload for e in await drain(local1)] == [b"now remote too"]

    await remote.leave("local-only")
    await eventually(lambda: _assert_eq(a.remote_hosts("local-only"), frozenset()))
    publishes = a.stats()["broker_publishes"]
    await a.publish("local-only", b"local again")
    assert a.stats()["broker_publishes"] == publishes


# -- room lifecycle -------------------------------------------------------------------------------


async def test_room_lifecycle_cluster_wide(cluster: ClusterFactory) -> None:
    a, b, c = await cluster(3)
    m1, m2 = a.member("m1"), b.member("m2")
    await m1.join("lecture")
    await m2.join("lecture")
    for r in (a, b, c):
        await eventually(lambda r=r: _assert_in("lecture", r))
    await m1.leave("lecture")
    assert "lecture" in await c.rooms()  # m2 still there
    await m2.close()
    for r in (a, b, c):
        await eventually(lambda r=r: _assert_not_in("lecture", r))


# -- guarantee 9: bad input -----------------------------------------------------------------------


async def test_invalid_room_names_are_refused(cluster: ClusterFactory) -> None:
    [a] = await cluster(1, max_room_length=64)
    member = a.member("m")
    for bad in ("", "x" * 65, "tab\there", "nul\x00", "bell\x07", "\ud800", 42, None):
        with pytest.raises(InvalidRoomName):
            await member.join(bad)  # type: ignore[arg-type]
        with pytest.raises(InvalidRoomName):
            await a.publish(bad, b"x")  # type: ignore[arg-type]
    assert a.subscribed_rooms == frozenset() and member.rooms == frozenset()


async def test_payload_too_large_is_refused_and_nothing_else_lost(cluster: ClusterFactory) -> None:
    a, b = await cluster(2, max_payload=1000)
    member = b.member("m")
    await member.join("R")
    await a.publish("R", b"a" * 1000)
    with pytest.raises(PayloadTooLarge):
        await a.publish("R", b"a" * 1001)
    await a.publish("R", b"after")
    assert [len(e.payload) for e in await receive_n(member, 2)] == [1000, 5]


async def test_broker_syntax_in_room_names_is_literal(cluster: ClusterFactory) -> None:
    a, b, c = await cluster(3)
    names = ["*", "a*", "ab", "a?", "[a]", "a", "a.b", "a.*.c", "#", "a b", "ü-räum 日本", "r:x"]
    members = {}
    for i, name in enumerate(names):
        node = (a, b)[i % 2]
        members[name] = node.member(f"m{i}")
        await members[name].join(name)
    for name in names:
        await c.publish(name, name.encode())
    for name, member in members.items():
        [got] = await receive_n(member, 1)
        assert got.payload == name.encode(), name
    await anyio.sleep(0.2)  # anything leaking through a pattern would have arrived by now
    for name, member in members.items():
        assert member.receive_nowait() is None, name


async def test_garbage_frames_are_counted_and_dropped(cluster: ClusterFactory) -> None:
    a, b = await cluster(2)
    member = b.member("m")
    await member.join("R")
    await a.publish("R", b"before")
    for junk in (b"", b"\xff\xfe garbage", b"\x93\x01\x02\x03", b"\xc1"):
        await a.broker.publish("R", junk)  # straight onto the data plane
    await a.broker.publish_control(b"\xc1 not a control frame")
    await a.publish("R", b"after")
    assert [e.payload for e in await receive_n(member, 2)] == [b"before", b"after"]
    await eventually(lambda: _assert_eq(b.stats()["dropped_decode"], 4))
    assert b.stats()["dropped_control_decode"] >= 1
    assert b.stats()["task_restarts"] == 0


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


async def _assert_in(room: str, router: RoomRouter) -> None:
    assert room in await router.rooms()


async def _assert_not_in(room: str, router: RoomRouter) -> None:
    assert room not in await router.rooms()
