"""Member wake-ups and receive_batch(): what a big room's fan-out relies on.

A member's waiting task is woken by a bare future on asyncio (one per waiting task); these
tests hold the contract around it: every waiter woken by a delivery or a close, cancelling one
waiter leaves the others waiting, a cancelled wait leaves nothing stale behind, and the batch
API hands the same stream as ``receive()`` with the inbox bound and its policies intact.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import pytest

from roomrouter import Envelope, Member, MemberClosed, RoomRouter
from roomrouter.brokers.memory import MemoryBroker

from .conftest import ClusterFactory, unique_namespace

pytestmark = pytest.mark.anyio


@pytest.fixture
async def router() -> AsyncIterator[RoomRouter]:
    async with RoomRouter(MemoryBroker(unique_namespace()), linger=0, inbox_size=4) as r:
        yield r


async def _waiting(member: Member) -> None:
    """Let tasks started before this call reach their wait."""
    for _ in range(5):
        await anyio.lowlevel.checkpoint()


async def test_receive_batch_takes_what_is_queued_in_order(router: RoomRouter) -> None:
    m = router.member("m")
    await m.join("R")
    for i in range(4):
        await router.publish("R", bytes([i]))
    assert [e.payload for e in await m.receive_batch(max_items=3)] == [b"\0", b"\1", b"\2"]
    assert [e.payload for e in await m.receive_batch()] == [b"\3"]
    assert m.pending() == 0
    with pytest.raises(ValueError, match="max_items"):
        await m.receive_batch(max_items=0)


async def test_receive_batch_waits_for_the_first_envelope(router: RoomRouter) -> None:
    m = router.member("m")
    await m.join("R")
    got: list[list[Envelope]] = []

    async def take() -> None:
        got.append(await m.receive_batch())

    async with anyio.create_task_group() as tg:
        tg.start_soon(take)
        await _waiting(m)
        assert not got
        await router.publish("R", b"a")
        await router.publish("R", b"b")  # no checkpoint between: both in one batch
    assert [[e.payload for e in batch] for batch in got] == [[b"a", b"b"]]


async def test_receive_batch_keeps_the_inbox_bound(router: RoomRouter) -> None:
    m = router.member("m")
    await m.join("R")
    for i in range(10):
        await router.publish("R", bytes([i]))
    assert [e.payload for e in await m.receive_batch()] == [bytes([i]) for i in range(6, 10)]
    assert router.stats()["dropped_overflow"] == 6


async def test_overflow_disconnect_wakes_the_waiter_then_closes() -> None:
    async with RoomRouter(
        MemoryBroker(unique_namespace()), linger=0, inbox_size=2, overflow="disconnect"
    ) as r:
        m = r.member("m")
        await m.join("R")
        got: list[bytes] = []
        outcome: list[str] = []

        async def take() -> None:
            try:
                while True:
                    got.extend(e.payload for e in await m.receive_batch())
            except MemberClosed as exc:
                outcome.append(exc.reason)

        async with anyio.create_task_group() as tg:
            tg.start_soon(take)
            await _waiting(m)
            for i in range(3):  # the third overflows: closed, the first two still handed
                await r.publish("R", bytes([i]))
        assert got == [b"\0", b"\1"]
        assert outcome == ["overflow"]


async def test_close_wakes_every_waiting_receiver(router: RoomRouter) -> None:
    m = router.member("m")
    await m.join("R")
    ended: list[str] = []

    async def by_receive() -> None:
        with pytest.raises(MemberClosed):
            await m.receive()
        ended.append("receive")

    async def by_batch() -> None:
        with pytest.raises(MemberClosed):
            await m.receive_batch()
        ended.append("batch")

    async def by_iteration() -> None:
        async for _ in m:
            raise AssertionError("nothing was published")
        ended.append("iteration")

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for waiter in (by_receive, by_batch, by_iteration):
                tg.start_soon(waiter)
            await _waiting(m)
            assert not ended
            await m.close()
    assert sorted(ended) == ["batch", "iteration", "receive"]


async def test_closed_member_hands_what_was_queued_first(router: RoomRouter) -> None:
    m = router.member("m")
    await m.join("R")
    await router.publish("R", b"a")
    await m.close()
    assert [e.payload for e in await m.receive_batch()] == [b"a"]
    with pytest.raises(MemberClosed):
        await m.receive_batch()
    assert [e async for e in m] == []


async def test_cancelling_one_waiter_leaves_the_other_waiting(router: RoomRouter) -> None:
    m = router.member("m")
    await m.join("R")
    got: list[bytes] = []

    async def keeps_waiting() -> None:
        got.append((await m.receive()).payload)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(keeps_waiting)
            with anyio.move_on_after(0.05) as scope:
                await m.receive()  # this waiter is cancelled
            assert scope.cancelled_caught
            await router.publish("R", b"x")
    assert got == [b"x"]


async def test_a_cancelled_wait_leaves_nothing_stale(router: RoomRouter) -> None:
    m = router.member("m")
    await m.join("R")
    for _ in range(3):
        with anyio.move_on_after(0.01):
            await m.receive()
        with anyio.move_on_after(0.01):
            await m.receive_batch()
    assert not m._waiters  # every cancelled waiter took itself out
    await router.publish("R", b"after")
    with anyio.fail_after(5):
        assert (await m.receive()).payload == b"after"


async def test_cross_node_fanout_while_members_drain(cluster: ClusterFactory) -> None:
    """Many members on two nodes drain (half by ``async for``, half by ``receive_batch``)
    while concurrent publishers on one node send: every member gets every envelope once,
    each publisher's in publish order."""
    a, b = await cluster(2, inbox_size=2048)
    publishers, per_publisher, per_node = 8, 40, 60
    members = [node.member(f"{name}{i}") for node, name in ((a, "a"), (b, "b"))
               for i in range(per_node)]  # fmt: skip
    for member in members:
        await member.join("big")
    expected = publishers * per_publisher
    seen: dict[str, list[bytes]] = {m.id: [] for m in members}

    async def drain(member: Member, batched: bool) -> None:
        mine = seen[member.id]
        while len(mine) < expected:
            if batched:
                mine.extend(e.payload for e in await member.receive_batch())
            else:
                mine.append((await member.receive()).payload)

    async def publish(p: int) -> None:
        for k in range(per_publisher):
            await a.publish("big", b"%d:%d" % (p, k))
            if k % 7 == 0:
                await anyio.lowlevel.checkpoint()

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            for i, member in enumerate(members):
                tg.start_soon(drain, member, i % 2 == 1)
            async with anyio.create_task_group() as pubs:
                for p in range(publishers):
                    pubs.start_soon(publish, p)
    for member_id, payloads in seen.items():
        assert len(payloads) == expected, member_id
        for p in range(publishers):
            mine = [x for x in payloads if x.startswith(b"%d:" % p)]
            assert mine == [b"%d:%d" % (p, k) for k in range(per_publisher)], member_id
    assert b.stats()["dropped_overflow"] == 0
    assert b.stats()["remote_deliveries"] == expected * per_node


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_waiters_on_trio(anyio_backend: str) -> None:
    """Off asyncio a waiter is an anyio.Event: woken by deliveries and by close, and a
    cancelled one removed (trio is in the dev extra)."""
    async with RoomRouter(MemoryBroker(unique_namespace()), linger=0) as r:
        m = r.member("m")
        await m.join("R")
        got: list[bytes] = []

        async def take() -> None:
            async for e in m:
                got.append(e.payload)

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(take)
                with anyio.move_on_after(0.01):
                    await m.receive_batch()  # a second waiter, cancelled
                for i in range(3):
                    await r.publish("R", bytes([i]))
                    await anyio.sleep(0.01)
                await m.close()
        assert got == [b"\0", b"\1", b"\2"]
        assert not m._waiters
