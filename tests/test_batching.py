"""Delivery batching (issue 23): a room's envelopes reach a waiting member in one wake-up,
with order, exactness and the overflow policies as without it.

The wake-up count is observed through what a woken member finds in its inbox: woken per
envelope, it finds nothing more queued; woken per batch, it finds the rest of the batch. The
latency bound is a benchmark figure (benchmarks/fanout.py), not a timed test: the delays here
are either far longer than the test (a timer that must not be what wakes) or irrelevant.
"""

from __future__ import annotations

import asyncio
import random

import anyio
import anyio.lowlevel
import pytest

from roomrouter import ConfigurationError, Envelope, Member, MemberClosed, RoomRouter
from roomrouter.brokers.memory import MemoryBroker

from .conftest import ClusterFactory, unique_namespace

pytestmark = pytest.mark.anyio

LONG = 30.0  # a delay no test waits for: what wakes a member there is not the timer


def _router(**options: object) -> RoomRouter:
    return RoomRouter(MemoryBroker(unique_namespace()), linger=0, **options)  # type: ignore[arg-type]


async def _first_wake(member: Member, publish: object, count: int) -> int:
    """Publish ``count`` envelopes with a yield after each while ``member`` waits; how many
    were queued when it first woke (including the one it took)."""
    seen: list[int] = []

    async def wait() -> None:
        await member.receive()
        seen.append(member.pending() + 1)

    async with anyio.create_task_group() as tg:
        tg.start_soon(wait)
        await anyio.lowlevel.checkpoint()  # it waits
        for i in range(count):
            await publish(i)  # type: ignore[operator]
            for _ in range(3):
                await anyio.lowlevel.checkpoint()  # a woken member runs now
    return seen[0]


@pytest.mark.parametrize("delay, expected", [(0.0, 1), (0.2, 10)])
async def test_a_waiting_member_is_woken_once_per_batch(delay: float, expected: int) -> None:
    async with _router(delivery_batch_delay=delay) as router:
        member = router.member("m")
        await member.join("room")

        async def publish(i: int) -> None:
            await router.publish("room", b"%d" % i)

        with anyio.fail_after(5):
            assert await _first_wake(member, publish, 10) == expected


async def test_the_maximum_batch_wakes_before_the_delay() -> None:
    async with _router(delivery_batch_delay=LONG, delivery_batch_max=4) as router:
        member = router.member("m")
        await member.join("room")

        async def publish(i: int) -> None:
            await router.publish("room", b"%d" % i)

        with anyio.fail_after(5):
            assert await _first_wake(member, publish, 10) == 4


async def test_a_room_can_have_its_own_delay() -> None:
    async with _router(delivery_batch_delay=LONG) as router:
        router.set_batch_delay("live", 0)
        member = router.member("m")
        await member.join("live")

        async def publish(i: int) -> None:
            await router.publish("live", b"%d" % i)

        with anyio.fail_after(5):
            assert await _first_wake(member, publish, 3) == 1
        router.set_batch_delay("live", None)  # the router's again: the timer is not reached
        await member.receive_batch()
        with pytest.raises(TimeoutError):
            with anyio.fail_after(0.3):
                assert await _first_wake(member, publish, 3) == 0


@pytest.mark.parametrize(
    "options",
    [
        {"delivery_batch_delay": -0.001},
        {"delivery_batch_delay": 61},
        {"delivery_batch_delay": "1"},
        {"delivery_batch_max": 0},
        {"delivery_batch_max": 2.5},
    ],
)
def test_bad_batching_options_are_refused(options: dict[str, object]) -> None:
    with pytest.raises(ConfigurationError, match="delivery_batch"):
        _router(**options)


async def test_receive_async_for_and_receive_batch_see_the_same_sequence() -> None:
    async with _router(delivery_batch_delay=0.005, delivery_batch_max=7) as router:
        members = [router.member(f"m{i}") for i in range(3)]
        for member in members:
            await member.join("room")
        total = 300
        got: list[list[str]] = [[], [], []]

        async def by_receive() -> None:
            while len(got[0]) < total:
                got[0].append((await members[0].receive()).id)

        async def by_async_for() -> None:
            async for envelope in members[1]:
                got[1].append(envelope.id)
                if len(got[1]) == total:
                    break

        async def by_batch() -> None:
            while len(got[2]) < total:
                got[2].extend(e.id for e in await members[2].receive_batch(max_items=5))

        async def publisher(p: int) -> None:
            for i in range(total // 3):
                await router.publish("room", b"%d:%d" % (p, i))
                if random.random() < 0.3:
                    await anyio.sleep(0.001)

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                for reader in (by_receive, by_async_for, by_batch):
                    tg.start_soon(reader)
                for p in range(3):
                    tg.start_soon(publisher, p)
        assert got[0] == got[1] == got[2]
        assert len(set(got[0])) == total


async def test_order_and_exactness_across_nodes_with_concurrent_publishers_and_joins(
    cluster: ClusterFactory,
) -> None:
    """Members of two nodes join while three publishers (on both nodes) publish: each member
    gets every envelope published after its join returned, none twice, per publisher in order,
    and nothing published before it joined the room (or to another room)."""
    a, b = await cluster(2, delivery_batch_delay=0.004, delivery_batch_max=16)
    per_publisher = 60
    clock = 0  # ticks at each publish's start
    joined_at: dict[str, int] = {}  # member id -> clock when its join returned
    sent: list[tuple[int, Envelope]] = []  # (clock at the publish's start, envelope)
    members: list[Member] = []

    async def joiner(router: RoomRouter, name: str, pause: float) -> None:
        await anyio.sleep(pause)
        member = router.member(name)
        members.append(member)
        await member.join("room")
        joined_at[name] = clock

    async def publisher(router: RoomRouter, p: int) -> None:
        nonlocal clock
        for i in range(per_publisher):
            clock += 1
            started = clock
            sent.append((started, await router.publish("room", b"%d:%d" % (p, i))))
            await anyio.sleep(0.001 * random.random())
        await router.publish("other", b"not for them")

    early = [a.member("early-a"), b.member("early-b")]
    for member in early:
        await member.join("room")
        joined_at[member.id] = 0
    members.extend(early)
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for i, router in enumerate((a, b, a)):
                tg.start_soon(publisher, router, i)
            for i in range(6):
                tg.start_soon(joiner, (a, b)[i % 2], f"late{i}", 0.01 * i)
    by_id = {e.id: e for _, e in sent}
    for member in members:
        must = {e.id for started, e in sent if started > joined_at[member.id]}
        got: list[Envelope] = []
        with anyio.fail_after(10):
            while not must <= {e.id for e in got}:
                got.append(await member.receive())
        await anyio.sleep(0.05)
        while (envelope := member.receive_nowait()) is not None:
            got.append(envelope)
        ids = [e.id for e in got]
        assert len(ids) == len(set(ids)), member.id
        assert set(ids) <= set(by_id), member.id  # nothing of "other"
        for p in range(3):
            seq = [e.payload for e in got if e.payload.startswith(b"%d:" % p)]
            assert seq == sorted(seq, key=lambda x: int(x.split(b":")[1])), member.id


async def test_a_member_that_leaves_mid_batch_wakes_with_what_was_queued() -> None:
    async with _router(delivery_batch_delay=LONG) as router:
        member = router.member("m")
        await member.join("room")
        got: list[bytes] = []

        async def read() -> None:
            got.append((await member.receive()).payload)
            while (envelope := member.receive_nowait()) is not None:
                got.append(envelope.payload)

        with anyio.fail_after(5):  # far below LONG: the timer is not what wakes it
            async with anyio.create_task_group() as tg:
                tg.start_soon(read)
                await anyio.lowlevel.checkpoint()
                for i in range(3):
                    await router.publish("room", b"%d" % i)
                await member.leave("room")
                await router.publish("room", b"after")
        assert got == [b"0", b"1", b"2"]
        assert member.pending() == 0


async def test_a_member_closed_mid_batch_returns_what_was_queued_then_closed() -> None:
    async with _router(delivery_batch_delay=LONG) as router:
        member, other = router.member("m"), router.member("other")
        await member.join("room")
        await other.join("room")
        got: list[bytes] = []

        async def read() -> None:
            async for envelope in member:
                got.append(envelope.payload)

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(read)
                await anyio.lowlevel.checkpoint()
                for i in range(3):
                    await router.publish("room", b"%d" % i)
                await member.close()
        assert got == [b"0", b"1", b"2"]
        with pytest.raises(MemberClosed):
            await member.receive()
        assert other.pending() == 3  # the others' batch is intact


@pytest.mark.parametrize("delay", [0.0, LONG])
async def test_drop_oldest_is_counted_per_envelope(delay: float) -> None:
    async with _router(delivery_batch_delay=delay, inbox_size=4) as router:
        idle, waiting = router.member("idle"), router.member("waiting")
        await idle.join("room")
        await waiting.join("room")
        got: list[bytes] = []

        async def read() -> None:  # reads one, then stops reading
            got.append((await waiting.receive()).payload)

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(read)
                await anyio.lowlevel.checkpoint()
                for i in range(10):
                    await router.publish("room", b"%d" % i)
                router.flush_batches()  # what a delay of LONG still holds
        # idle: 6 dropped, the newest 4 kept; waiting: whatever it read plus what it kept plus
        # what was dropped is the whole stream, each envelope counted once.
        kept = [e.payload for e in await idle.receive_batch()]
        assert kept == [b"6", b"7", b"8", b"9"]
        rest = [e.payload for e in await waiting.receive_batch()]
        dropped_waiting = 10 - len(got) - len(rest)
        assert router.stats()["dropped_overflow"] == 6 + dropped_waiting
        assert got + rest == sorted(got + rest, key=int)
        assert rest[-1] == b"9"


@pytest.mark.parametrize("delay", [0.0, LONG])
async def test_disconnect_closes_on_the_envelope_that_overflows(delay: float) -> None:
    async with _router(delivery_batch_delay=delay, inbox_size=4, overflow="disconnect") as router:
        member = router.member("m")
        await member.join("room")
        for i in range(4):
            await router.publish("room", b"%d" % i)
        assert not member.closed
        await router.publish("room", b"4")
        router.flush_batches("room")  # what a delay of LONG still holds
        assert member.close_reason == "overflow"
        assert router.stats()["members_disconnected"] == 1
        assert [e.payload for e in await member.receive_batch()] == [b"0", b"1", b"2", b"3"]


async def test_a_full_inbox_wakes_its_waiting_member_before_the_delay() -> None:
    async with _router(delivery_batch_delay=LONG, inbox_size=8) as router:
        member = router.member("m")
        await member.join("room")

        async def publish(i: int) -> None:
            await router.publish("room", b"%d" % i)

        with anyio.fail_after(5):
            assert await _first_wake(member, publish, 8) == 8
        assert router.stats()["dropped_overflow"] == 0


@pytest.mark.parametrize("delay, wait", [(0.2, 0.199), (0.005, 0.004), (0.0015, 0.00075)])
async def test_a_batch_timer_is_set_short_of_the_delay(delay: float, wait: float) -> None:
    # The loop's timers fire up to a millisecond late (epoll waits in whole ms, rounded up):
    # the timer is set that much earlier, so the delay bounds the wait (docs/batching.md).
    loop = asyncio.get_running_loop()
    waits: list[float] = []
    call_later = loop.call_later

    def recording(seconds: float, *args: object) -> asyncio.TimerHandle:
        waits.append(seconds)
        return call_later(seconds, *args)  # type: ignore[arg-type]

    async with _router(delivery_batch_delay=delay) as router:
        member = router.member("m")
        await member.join("room")
        loop.call_later = recording  # type: ignore[method-assign]
        try:
            await router.publish("room", b"a")
            await router.publish("room", b"b")  # the same batch: no second timer
        finally:
            del loop.call_later  # the class's again
        assert waits == [pytest.approx(wait)]
        with anyio.fail_after(5):
            assert [(await member.receive()).payload for _ in range(2)] == [b"a", b"b"]
