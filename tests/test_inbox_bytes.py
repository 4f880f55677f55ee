"""Inboxes bounded in bytes as well as in count (``max_inbox_bytes``), issue 19 case 7: one
member that never reads must not hold every big payload published to its room."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import anyio
import anyio.lowlevel
import pytest

from roomrouter import ConfigurationError, MemberClosed, RoomRouter
from roomrouter.brokers.memory import MemoryBroker

from .conftest import unique_namespace
from .helpers import receive_n

pytestmark = pytest.mark.anyio

MB = 1 << 20


async def test_a_member_that_never_reads_holds_at_most_max_inbox_bytes() -> None:
    async with RoomRouter(
        MemoryBroker(unique_namespace()), linger=0, max_inbox_bytes=4 * MB
    ) as router:
        slow, fast = router.member("slow"), router.member("fast")
        await slow.join("big")
        await fast.join("big")
        got: list[bytes] = []

        async def read_fast() -> None:
            for envelope in await receive_n(fast, 40, timeout=10):
                got.append(envelope.payload)

        async with anyio.create_task_group() as tg:
            tg.start_soon(read_fast)
            for i in range(40):
                # A fresh 1 MB object each time: what the slow member keeps alive is real.
                await router.publish("big", bytes([i]) * MB)
                assert slow.pending_bytes() <= 4 * MB
                await anyio.lowlevel.checkpoint()  # the fast one reads as it comes
        # The fast member in the same room lost nothing, in order.
        assert got == [bytes([i]) * MB for i in range(40)]
        # The slow one kept the newest that fit; each envelope dropped is counted once.
        assert slow.pending() == 4 and slow.pending_bytes() == 4 * MB
        assert router.stats()["dropped_overflow"] == 36
        kept = [(await slow.receive()).payload for _ in range(4)]
        assert kept == [bytes([i]) * MB for i in range(36, 40)]
        assert slow.pending_bytes() == 0


async def test_bytes_are_released_by_every_way_of_reading() -> None:
    async with RoomRouter(MemoryBroker(unique_namespace()), linger=0) as router:
        member = router.member("m")
        await member.join("r")
        for size in (10, 20, 30, 40, 50):
            await router.publish("r", b"x" * size)
        assert member.pending_bytes() == 150
        assert (await member.receive()).payload == b"x" * 10
        assert member.pending_bytes() == 140
        nowait = member.receive_nowait()
        assert nowait is not None and member.pending_bytes() == 120
        assert len(await member.receive_batch(1)) == 1 and member.pending_bytes() == 90
        async for envelope in member:
            assert envelope.payload == b"x" * 40
            break
        assert member.pending_bytes() == 50
        assert len(await member.receive_batch()) == 1 and member.pending_bytes() == 0


async def test_byte_overflow_with_disconnect_closes_the_member() -> None:
    async with RoomRouter(
        MemoryBroker(unique_namespace()),
        linger=0,
        overflow="disconnect",
        max_payload=MB,
        max_inbox_bytes=3 * MB,
    ) as router:
        slow = router.member("slow")
        await slow.join("big")
        for i in range(4):  # the fourth does not fit: closed, the first three still handed
            await router.publish("big", bytes([i]) * MB)
        assert slow.closed and slow.close_reason == "overflow"
        assert router.stats()["members_disconnected"] == 1
        assert [(await slow.receive()).payload[0] for _ in range(3)] == [0, 1, 2]
        with pytest.raises(MemberClosed):
            await slow.receive()


async def test_max_inbox_bytes_is_checked_and_has_a_default() -> None:
    with pytest.raises(ConfigurationError):
        RoomRouter(MemoryBroker(unique_namespace()), max_payload=MB, max_inbox_bytes=MB - 1)
    with pytest.raises(ConfigurationError):
        RoomRouter(MemoryBroker(unique_namespace()), max_inbox_bytes=0)
    router = RoomRouter(MemoryBroker(unique_namespace()))
    assert router.max_payload <= router.max_inbox_bytes <= 16 * MB
    # A bigger max_payload raises the default with it: one message must always fit.
    assert RoomRouter(MemoryBroker(unique_namespace()), max_payload=64 * MB).max_inbox_bytes >= (
        64 * MB
    )


async def test_a_member_can_have_its_own_byte_bound() -> None:
    async with RoomRouter(MemoryBroker(unique_namespace()), linger=0) as router:
        member = router.member("m", max_inbox_bytes=100)
        await member.join("r")
        for _ in range(5):
            await router.publish("r", b"y" * 40)
        assert member.pending() == 2 and member.pending_bytes() == 80
        with pytest.raises(ConfigurationError):
            router.member("n", max_inbox_bytes=0)


_RSS_SCRIPT = textwrap.dedent(
    """
    import resource, sys
    import anyio
    from roomrouter import RoomRouter
    from roomrouter.brokers.memory import MemoryBroker

    MB = 1 << 20

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()

    async def main() -> None:
        async with RoomRouter(MemoryBroker("rss"), linger=0, max_inbox_bytes=8 * MB) as router:
            member = router.member("never-reads")
            await member.join("big")
            before = rss()
            for i in range(300):
                await router.publish("big", bytes([i % 256]) * MB)
            after = rss()
            print(member.pending(), member.pending_bytes(), (after - before) // MB)

    anyio.run(main)
    """
)


def test_rss_stays_bounded_when_a_member_never_reads() -> None:
    """300 x 1 MB to a member that never reads: the process does not keep 300 MB alive."""
    out = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    pending, pending_bytes, growth_mb = map(int, out.stdout.split())
    assert pending == 8 and pending_bytes == 8 * MB
    assert growth_mb < 60, f"RSS grew by {growth_mb} MB"
