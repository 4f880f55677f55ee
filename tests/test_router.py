"""Router behaviour that does not depend on the backend (runs on the memory broker)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import anyio
import pytest

import roomrouter
from roomrouter import (
    ConfigurationError,
    DuplicateMember,
    MemberClosed,
    MissingDependency,
    RoomRouter,
    RoomRouterError,
    RouterNotRunning,
)
from roomrouter._urls import broker_from_url
from roomrouter.brokers.memory import MemoryBroker, MemoryHub

from .conftest import unique_namespace
from .helpers import receive_n

pytestmark = pytest.mark.anyio


@pytest.fixture
async def router() -> AsyncIterator[RoomRouter]:
    async with RoomRouter(MemoryBroker(unique_namespace()), linger=0, inbox_size=3) as r:
        yield r


async def test_drop_oldest_keeps_the_newest(router: RoomRouter) -> None:
    slow = router.member("slow")
    await slow.join("R")
    for i in range(10):
        await router.publish("R", bytes([i]))
    got = await receive_n(slow, 3)
    assert [e.payload for e in got] == [b"\x07", b"\x08", b"\x09"]
    assert router.stats()["dropped_overflow"] == 7


async def test_disconnect_policy_closes_the_slow_member_only() -> None:
    async with RoomRouter(
        MemoryBroker(unique_namespace()), linger=0, inbox_size=2, overflow="disconnect"
    ) as r:
        slow, fast = r.member("slow"), r.member("fast")
        await slow.join("R")
        await fast.join("R")
        for i in range(3):
            await r.publish("R", bytes([i]))
            await fast.receive()
        assert slow.closed and slow.close_reason == "overflow"
        assert not fast.closed and fast.rooms == {"R"}
        assert [e.payload for e in await receive_n(slow, 2)] == [b"\x00", b"\x01"]
        with pytest.raises(MemberClosed) as info:
            await slow.receive()
        assert info.value.reason == "overflow"
        assert r.stats()["members_disconnected"] == 1


async def test_async_iteration_ends_when_closed(router: RoomRouter) -> None:
    member = router.member("m")
    await member.join("R")
    await router.publish("R", b"1")
    await router.publish("R", b"2")
    got: list[bytes] = []
    async with anyio.create_task_group() as tg:

        async def consume() -> None:
            async for env in member:
                got.append(env.payload)

        tg.start_soon(consume)
        await anyio.sleep(0.05)
        await member.close()
    assert got == [b"1", b"2"]


async def test_member_ids_are_unique(router: RoomRouter) -> None:
    router.member("alice")
    with pytest.raises(DuplicateMember):
        router.member("alice")
    assert router.member().id != router.member().id


async def test_use_outside_the_context_is_an_error() -> None:
    r = RoomRouter(MemoryBroker(unique_namespace()))
    with pytest.raises(RouterNotRunning):
        r.member("x")
    with pytest.raises(RouterNotRunning):
        await r.publish("R", b"x")
    async with r:
        member = r.member("x")
    with pytest.raises(RouterNotRunning):
        await r.publish("R", b"x")
    with pytest.raises(MemberClosed):
        await member.join("R")


async def test_join_cancelled_midway_leaves_no_subscription() -> None:
    hub = MemoryHub(unique_namespace())

    class SlowBroker(MemoryBroker):
        async def subscribe(self, rooms: object) -> None:
            await anyio.sleep(0.2)
            await super().subscribe(rooms)  # type: ignore[arg-type]

    async with RoomRouter(SlowBroker(hub), linger=0) as r:
        member = r.member("m")
        with anyio.move_on_after(0.05):
            await member.join("R")
        assert member.rooms == frozenset()
        await anyio.sleep(0.4)
        assert r.subscribed_rooms == frozenset()
        assert hub.subscriptions(r.namespace, r.node_id) == frozenset()


async def test_failed_subscribe_rolls_the_join_back() -> None:
    class FailingBroker(MemoryBroker):
        async def subscribe(self, rooms: object) -> None:
            raise roomrouter.BrokerUnavailable("no")

    async with RoomRouter(FailingBroker(unique_namespace()), linger=0) as r:
        member = r.member("m")
        with pytest.raises(roomrouter.BrokerUnavailable):
            await member.join("R")
        assert member.rooms == frozenset() and r.local_rooms == frozenset()
        assert r.stats()["subscribe_failures"] == 1


@pytest.mark.parametrize(
    "options",
    [
        {"overflow": "block"},
        {"inbox_size": 0},
        {"namespace": ""},
        {"heartbeat_interval": 5, "node_ttl": 1},
    ],
)
def test_bad_options_are_configuration_errors(options: dict[str, object]) -> None:
    with pytest.raises(ConfigurationError):
        RoomRouter(MemoryBroker(), **options)  # type: ignore[arg-type]


def test_urls() -> None:
    assert isinstance(broker_from_url("memory://"), MemoryBroker)
    assert broker_from_url("memory://isolated").hub.name == "isolated"  # type: ignore[attr-defined]
    with pytest.raises(ConfigurationError, match="unknown broker URL scheme"):
        broker_from_url("mqtt://127.0.0.1")
    with pytest.raises(ConfigurationError):
        RoomRouter(object())  # type: ignore[arg-type]


def test_missing_extra_names_the_pip_command() -> None:
    err = MissingDependency("kafka", "aiokafka")
    assert 'pip install "roomrouter[kafka]"' in str(err)
    assert isinstance(err, ConfigurationError) and isinstance(err, RoomRouterError)


def test_exports_match___all__() -> None:
    public = {n for n in dir(roomrouter) if not n.startswith("_")}
    modules = {"brokers", "cli", "integrations", "presence", "storage", "testing", "urls"}
    assert sorted(roomrouter.__all__) == roomrouter.__all__
    assert set(roomrouter.__all__) == public - modules
    for name in roomrouter.__all__:
        obj = getattr(roomrouter, name)
        if isinstance(obj, type):
            assert obj.__module__.startswith("roomrouter"), name


def test_every_error_is_a_roomrouter_error() -> None:
    for name in roomrouter.__all__:
        obj = getattr(roomrouter, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, RoomRouterError), name


def test_version_is_pep440() -> None:
    assert re.fullmatch(r"\d+\.\d+\.\d+(\.dev\d+)?", roomrouter.__version__)
