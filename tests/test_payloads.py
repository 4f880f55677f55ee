"""Payloads are bytes-like only (issue 19 case 8): an int, a list or a str is a TypeError
before any copy, and the size is checked before the payload is copied."""

from __future__ import annotations

import array
import tracemalloc

import pytest

from roomrouter import PayloadTooLarge, RoomRouter
from roomrouter.brokers.memory import MemoryBroker

from .conftest import unique_namespace
from .helpers import receive_n

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("payload", [5, [104, 105], 10**12, "hi", None, 1.5, (1, 2), {1: 2}])
async def test_anything_but_bytes_like_is_a_type_error(payload: object) -> None:
    async with RoomRouter(MemoryBroker(unique_namespace()), linger=0) as router:
        member = router.member("m")
        await member.join("r")
        with pytest.raises(TypeError, match="bytes, bytearray or memoryview"):
            await router.publish("r", payload)  # type: ignore[arg-type]
        assert member.pending() == 0 and router.stats()["published"] == 0


async def test_bytes_like_payloads_arrive_as_bytes() -> None:
    async with RoomRouter(MemoryBroker(unique_namespace()), linger=0) as router:
        member = router.member("m")
        await member.join("r")
        ints = array.array("i", [1, 2, 3])
        await router.publish("r", b"hi")
        await router.publish("r", bytearray(b"hi"))
        await router.publish("r", memoryview(b"xhix")[1:3])
        await router.publish("r", memoryview(ints))  # 12 bytes, not 3 elements
        got = [e.payload for e in await receive_n(member, 4)]
        assert got == [b"hi", b"hi", b"hi", ints.tobytes()]
        assert all(type(p) is bytes for p in got)


async def test_size_counts_bytes_of_a_memoryview() -> None:
    async with RoomRouter(MemoryBroker(unique_namespace()), linger=0, max_payload=10) as router:
        with pytest.raises(PayloadTooLarge, match="12 bytes"):
            await router.publish("r", memoryview(array.array("i", [1, 2, 3])))


async def test_size_is_checked_before_the_payload_is_copied() -> None:
    big = bytearray(32 << 20)
    async with RoomRouter(
        MemoryBroker(unique_namespace()), linger=0, max_payload=1 << 20
    ) as router:
        tracemalloc.start()
        try:
            for payload in (big, memoryview(big)):
                with pytest.raises(PayloadTooLarge):
                    await router.publish("r", payload)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 1 << 20, f"{peak} bytes allocated: the payload was copied"
