"""Operations in flight at once, as users make them: two joins of one room on one node, a join
and a leave of the same room racing, publishes while a join waits; and a peer that reconnects
during a join barrier, churn of new rooms, tight join/leave loops.

Node A's incoming control frames are delayed (``ControlFault``), so a join on node B really
waits for A's acknowledgement: every test below then checks that nothing B's members were
promised is lost to A's local bypass in that window.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any

import anyio
import pytest

from roomrouter import Broker, RoomRouter
from roomrouter._cluster import Heartbeat, Host

from .backends import Backend
from .conftest import TEST_ROUTER_OPTIONS
from .faulty import ControlFault
from .helpers import eventually, receive_n

pytestmark = pytest.mark.anyio

#: How late node A hears control frames: long enough that B's join barrier is still open
#: while the test acts, short enough to keep the tests quick.
DELAY = 0.4


class Nodes:
    def __init__(self, backend: Backend, stack: AsyncExitStack) -> None:
        self.backend = backend
        self.stack = stack

    async def start(self, broker: Broker | None = None, **options: Any) -> RoomRouter:
        opts = {**TEST_ROUTER_OPTIONS, **self.backend.router_options, **options}
        router = RoomRouter(
            broker or self.backend.broker(), namespace=self.backend.namespace, **opts
        )
        return await self.stack.enter_async_context(router)

    async def slow_and_fast(self, **options: Any) -> tuple[RoomRouter, RoomRouter]:
        """Node A hears control frames DELAY late; node B is normal. Both see each other."""
        a = await self.start(ControlFault(self.backend.broker(), delay=DELAY), **options)
        b = await self.start(**options)
        await eventually(lambda: _assert(a.node_id in b.live_nodes()), timeout=5)
        await eventually(lambda: _assert(b.node_id in a.live_nodes()), timeout=5)
        return a, b


@pytest.fixture
async def nodes(backend: Backend) -> AsyncIterator[Nodes]:
    async with AsyncExitStack() as stack:
        yield Nodes(backend, stack)


def _assert(condition: object) -> None:
    assert condition


async def _wait_broker_subscribed(router: RoomRouter, room: str) -> None:
    await eventually(lambda: _assert(room in router.subscribed_rooms), timeout=5, interval=0.001)


# -- bug 1: the second local joiner of a room must wait for the first join's barrier -------------


async def test_second_local_joiner_waits_for_the_barrier(nodes: Nodes) -> None:
    a, b = await nodes.slow_and_fast(barrier_timeout=10)
    first, second = b.member("first"), b.member("second")
    async with anyio.create_task_group() as tg:
        tg.start_soon(first.join, "lecture")
        await _wait_broker_subscribed(b, "lecture")  # the first join is now in its barrier
        await second.join("lecture")
        # `second` joined before this publish: it must get it, whatever A's view lags.
        sent = await a.publish("lecture", b"after the second join")
        [got] = await receive_n(second, 1, timeout=5)
        assert got.id == sent.id


# -- bug 2: one member joining twice at once; join, leave, join racing ---------------------------


async def test_concurrent_double_join_returns_when_the_room_is_ready(nodes: Nodes) -> None:
    a, b = await nodes.slow_and_fast(barrier_timeout=10)
    member = b.member("twice")
    async with anyio.create_task_group() as tg:
        tg.start_soon(member.join, "lobby")
        await anyio.lowlevel.checkpoint()
        await member.join("lobby")  # the client sent "join" twice
        assert member.rooms == {"lobby"}
        sent = await a.publish("lobby", b"x")
        [got] = await receive_n(member, 1, timeout=5)
        assert got.id == sent.id


async def test_join_leave_join_racing_leaks_no_reference(nodes: Nodes) -> None:
    _a, b = await nodes.slow_and_fast(barrier_timeout=10)
    member = b.member("flappy")
    async with anyio.create_task_group() as tg:
        tg.start_soon(member.join, "room")
        await anyio.lowlevel.checkpoint()
        await member.leave("room")  # while the first join is on the wire
        await member.join("room")
    assert member.rooms == {"room"}
    assert b.local_rooms == {"room"}
    await member.leave("room")
    assert member.rooms == frozenset()
    await eventually(lambda: _assert(b.subscribed_rooms == frozenset()), timeout=5)
    await nodes.backend.check_subscriptions([b])


async def test_leave_during_a_pending_join_is_final(nodes: Nodes) -> None:
    a, b = await nodes.slow_and_fast(barrier_timeout=10)
    member, other = b.member("leaver"), b.member("other")
    async with anyio.create_task_group() as tg:
        tg.start_soon(member.join, "room")
        await anyio.lowlevel.checkpoint()
        await member.leave("room")
    assert member.rooms == frozenset()
    await other.join("room")
    await a.publish("room", b"not for the leaver")
    await receive_n(other, 1, timeout=5)
    assert member.receive_nowait() is None
    await other.leave("room")
    await eventually(lambda: _assert(b.subscribed_rooms == frozenset()), timeout=5)


async def test_close_during_a_pending_join_leaks_nothing(nodes: Nodes) -> None:
    _a, b = await nodes.slow_and_fast(barrier_timeout=10)
    member = b.member("closer")
    results: list[BaseException | None] = []

    async def join() -> None:
        try:
            await member.join("room")
            results.append(None)
        except Exception as exc:
            results.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(join)
        await anyio.lowlevel.checkpoint()
        await member.close()
    assert len(results) == 1
    assert b.local_rooms == frozenset()
    await eventually(lambda: _assert(b.subscribed_rooms == frozenset()), timeout=5)


async def test_many_concurrent_joins_and_leaves_end_consistent(nodes: Nodes) -> None:
    """A burst of joins and leaves of a few rooms by a few members, all in flight at once: the
    end state is the last operation of each (member, room), and the subscriptions match it."""
    a, b = await nodes.slow_and_fast(barrier_timeout=10)
    members = [b.member(f"m{i}") for i in range(4)]
    rooms = ["r0", "r1", "r2"]
    async with anyio.create_task_group() as tg:
        for round_ in range(3):
            for i, m in enumerate(members):
                for j, room in enumerate(rooms):
                    if (i + j + round_) % 3 == 0:
                        tg.start_soon(m.leave, room)
                    else:
                        tg.start_soon(m.join, room)
            await anyio.sleep(0.01)
    # The last round decided: leave where (i + j + 2) % 3 == 0, join elsewhere.
    for i, m in enumerate(members):
        want = {room for j, room in enumerate(rooms) if (i + j + 2) % 3 != 0}
        assert m.rooms == want, (m, m.rooms, want)
    for room in rooms:
        sent = await a.publish(room, room.encode())
        for m in members:
            if room in m.rooms:
                [got] = await receive_n(m, 1, timeout=5)
                assert got.id == sent.id
    for m in members:
        await m.close()
    await eventually(lambda: _assert(b.subscribed_rooms == frozenset()), timeout=5)
    await nodes.backend.check_subscriptions([b])


# -- a peer's Hello during a barrier releases it (item 5) --------------------------------------


async def test_peer_reconnecting_during_a_barrier_does_not_stall_the_join(nodes: Nodes) -> None:
    faulty = ControlFault(nodes.backend.broker())
    a = await nodes.start(faulty, barrier_timeout=8)
    b = await nodes.start(barrier_timeout=8)
    await eventually(lambda: _assert(a.node_id in b.live_nodes() and b.node_id in a.live_nodes()))
    faulty.drop_next[Host] = 1  # A loses B's announcement, as over a dropped connection ...
    member = b.member("joiner")
    started = anyio.current_time()
    async with anyio.create_task_group() as tg:
        tg.start_soon(member.join, "room")
        await eventually(lambda: _assert(faulty.dropped), timeout=5, interval=0.005)
        faulty.fake_reconnect()  # ... and says Hello after reconnecting
    took = anyio.current_time() - started
    assert took < 3.0, f"the join waited {took:.1f}s for a peer that had reconnected"
    assert a.remote_hosts("room") == {b.node_id}
    sent = await a.publish("room", b"x")
    [got] = await receive_n(member, 1, timeout=5)
    assert got.id == sent.id


# -- a node presumed dead that speaks again with a delta is asked for its whole state (item 3) --


async def test_node_first_heard_again_through_a_delta_is_synced(nodes: Nodes) -> None:
    faulty = ControlFault(nodes.backend.broker())
    a = await nodes.start(faulty)
    b = await nodes.start()
    await eventually(lambda: _assert(b.node_id in a.live_nodes()), timeout=5)
    member = b.member("m")
    await member.join("kept")
    await member.join("left")
    assert a.remote_hosts("kept") == {b.node_id}
    faulty.blackout = True  # A hears nothing of B past B's TTL (B stalled, as A sees it)
    await eventually(lambda: _assert(b.node_id not in a.live_nodes()), timeout=5)
    assert a.remote_hosts("kept") == frozenset()
    faulty.drop_all = {Heartbeat}
    faulty.blackout = False
    await member.leave("left")  # B's first frame A hears again: the Unhost of "left"
    await eventually(lambda: _assert(b.node_id in a.live_nodes()), timeout=5)
    faulty.drop_all = set()
    await eventually(lambda: _assert(a.remote_hosts("kept") == {b.node_id}), timeout=5)
    assert a.remote_hosts("left") == frozenset()
    sent = await a.publish("kept", b"x")
    [got] = await receive_n(member, 1, timeout=5)
    assert got.id == sent.id


# -- churn of new rooms: linger expiry keeps up (item 5) ---------------------------------------


async def test_linger_expiry_keeps_up_under_new_room_churn(nodes: Nodes) -> None:
    linger = 0.3
    router = await nodes.start(linger=linger)
    # More joiners than one subscribe batch takes, so new rooms are always queued (as under
    # heavy churn with the default batch of 1000): expiry must still get its turns.
    router._subs._max_batch = 8
    released: dict[str, float] = {}
    counter = 0

    async def churn(worker: int, until: float) -> None:
        nonlocal counter
        member = router.member(f"w{worker}")
        while anyio.current_time() < until:
            counter += 1
            room = f"c{worker}-{counter}"
            await member.join(room)
            await member.leave(room)
            released[room] = anyio.current_time()

    until = anyio.current_time() + 2.0
    async with anyio.create_task_group() as tg:
        for worker in range(20):
            tg.start_soon(churn, worker, until)
    now = anyio.current_time()
    # No room may still be subscribed long after its linger ran out, even though joins never
    # stopped while it lingered: expiry must not starve behind the subscribe queue.
    stale = [r for r in router.subscribed_rooms if released.get(r, now) < now - linger - 1.5]
    assert not stale, f"{len(stale)} of {len(released)} rooms still subscribed past their linger"
    await eventually(lambda: _assert(router.subscribed_rooms == frozenset()), timeout=linger + 5)
    await nodes.backend.check_subscriptions([router])


async def test_join_and_leave_of_a_hosted_room_yield_to_the_event_loop(nodes: Nodes) -> None:
    router = await nodes.start()
    anchor, looper = router.member("anchor"), router.member("looper")
    await anchor.join("hot")
    ticks = 0
    done = False

    async def ticker() -> None:
        nonlocal ticks
        while not done:
            ticks += 1
            await anyio.lowlevel.checkpoint()

    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        await anyio.lowlevel.checkpoint()
        before = ticks
        for _ in range(200):
            await looper.join("hot")
            await looper.leave("hot")
        during = ticks - before
        done = True
    assert during >= 200, f"other tasks ran {during} times during 400 joins/leaves"
