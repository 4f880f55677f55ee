"""Presence: who is in a room cluster-wide, with join/leave events, dying with its node; the
store chosen apart from the broker (RabbitMQ between nodes, Redis for room state). And room
affinity (``preferred_node``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import anyio
import pytest

from roomrouter import ConfigurationError, RoomRouter
from roomrouter.presence import PresenceEvent

from .backends import BACKENDS, Backend
from .conftest import TEST_ROUTER_OPTIONS, unique_namespace
from .helpers import eventually, watch_presence_into

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
REDIS = "redis://127.0.0.1:6379/0"

#: (broker backend, presence store): memory alone; Redis for both; RabbitMQ + Redis presence.
SETUPS = ["memory", "redis", "rabbitmq+redis"]


class Setup:
    def __init__(self, name: str, backend: Backend, stack: AsyncExitStack) -> None:
        self.name = name
        self.backend = backend
        self.stack = stack
        self.presence_url = "memory://" + backend.namespace if name == "memory" else REDIS

    async def node(self, **options: Any) -> RoomRouter:
        opts = {**TEST_ROUTER_OPTIONS, **self.backend.router_options, **options}
        broker = self.backend.broker()
        presence: Any = True if self.name == "memory" else self.presence_url
        router = RoomRouter(broker, namespace=self.backend.namespace, presence=presence, **opts)
        return await self.stack.enter_async_context(router)


@pytest.fixture(params=SETUPS)
async def setup(request: pytest.FixtureRequest) -> AsyncIterator[Setup]:
    name: str = request.param
    backend = BACKENDS[name.split("+")[0]](unique_namespace())
    backend.available()
    if name != "memory":
        BACKENDS["redis"](backend.namespace).available()
    try:
        async with AsyncExitStack() as stack:
            yield Setup(name, backend, stack)
    finally:
        await backend.cleanup()
        if name == "rabbitmq+redis":
            await BACKENDS["redis"](backend.namespace).cleanup()


def _assert(condition: object) -> None:
    assert condition


async def _room_keys(namespace: str, room: str) -> int:
    from redis.asyncio import Redis

    client = Redis(host="127.0.0.1", port=6379)
    try:
        return int(await client.exists(f"rr:{{{namespace}}}:p:{room}"))
    finally:
        await client.aclose()


async def test_presence_lists_members_of_every_node(setup: Setup) -> None:
    a, b = await setup.node(), await setup.node()
    alice = a.member("alice", info={"name": "Alice"})
    bob = b.member("bob", info={"name": "Bob"})
    await alice.join("lecture")
    # Read your writes: the joining node sees its own member at once.
    assert [e.member for e in await a.presence("lecture")] == ["alice"]
    await bob.join("lecture")
    entries = await b.presence("lecture")
    assert [(e.member, e.node, e.info) for e in entries] == [
        ("alice", a.node_id, {"name": "Alice"}),
        ("bob", b.node_id, {"name": "Bob"}),
    ]

    async def both_seen_from_a() -> None:
        assert {e.member for e in await a.presence("lecture")} == {"alice", "bob"}

    await eventually(both_seen_from_a)
    await bob.leave("lecture")
    await eventually(lambda: _check_members(a, "lecture", {"alice"}))
    await alice.close()
    await eventually(lambda: _check_members(b, "lecture", set()))
    if setup.name != "memory":  # room lifecycle: the room's Redis state went with its last member
        assert await _room_keys(setup.backend.namespace, "lecture") == 0


async def _check_members(router: RoomRouter, room: str, want: set[str]) -> None:
    assert {e.member for e in await router.presence(room)} == want


async def test_presence_events_from_other_nodes(setup: Setup) -> None:
    a, b = await setup.node(), await setup.node()
    events: list[PresenceEvent] = []
    ready = anyio.Event()

    async with anyio.create_task_group() as tg:
        tg.start_soon(watch_presence_into, a, "room", events, ready)
        await ready.wait()
        member = b.member("m1", info={"name": "One"})
        await member.join("room")
        await member.leave("room")
        other = b.member("m2")
        await other.join("elsewhere")  # another room: no event here
        await eventually(lambda: _assert(len(events) >= 2))
        await anyio.sleep(0.1)
        tg.cancel_scope.cancel()
    assert [(e.kind, e.room, e.entry.member, e.entry.node) for e in events] == [
        ("join", "room", "m1", b.node_id),
        ("leave", "room", "m1", b.node_id),
    ]
    assert events[0].entry.info == {"name": "One"}


async def test_concurrent_joins_and_leaves_leave_presence_consistent(setup: Setup) -> None:
    a, b = await setup.node(), await setup.node()
    members = [r.member(f"m{i}") for i, r in enumerate([a, b] * 4)]
    async with anyio.create_task_group() as tg:
        for i, m in enumerate(members):
            tg.start_soon(m.join, "busy")
            if i % 2:
                tg.start_soon(m.leave, "busy")  # races its own join
    want = {m.id for m in members if "busy" in m.rooms}
    await eventually(lambda: _check_members(a, "busy", want))
    await eventually(lambda: _check_members(b, "busy", want))


async def test_presence_is_off_unless_asked_for() -> None:
    backend = BACKENDS["memory"](unique_namespace())
    async with RoomRouter(backend.broker(), namespace=backend.namespace) as router:
        with pytest.raises(ConfigurationError, match="presence is off"):
            await router.presence("room")
    with pytest.raises(ConfigurationError, match="presence=True"):
        RoomRouter.from_url("amqp://guest:guest@127.0.0.1/", presence=True)


@pytest.mark.serial  # times the expiry against the TTL with 0.8 s of slack: an idle host
@pytest.mark.parametrize("broker_name", ["redis", "rabbitmq"])
async def test_killed_node_vanishes_from_presence_within_its_ttl(broker_name: str) -> None:
    backend = BACKENDS[broker_name](unique_namespace())
    backend.available()
    BACKENDS["redis"](backend.namespace).available()
    opts = {**TEST_ROUTER_OPTIONS, **backend.router_options}
    try:
        async with RoomRouter(
            backend.broker(), namespace=backend.namespace, presence=REDIS, **opts
        ) as watcher:
            child = subprocess.Popen(
                [sys.executable, "-m", "tests.node_process", backend.process_url(),
                 backend.namespace, "doomed", "--presence", REDIS, "--lifetime", "60"],
                cwd=ROOT, stdout=subprocess.PIPE, text=True,
                env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
            )  # fmt: skip
            try:
                assert child.stdout is not None
                with anyio.fail_after(20):
                    node_id = (await anyio.to_thread.run_sync(child.stdout.readline)).strip()
                assert node_id, "child node did not start"

                async def child_present() -> None:
                    entries = await watcher.presence("doomed")
                    assert [(e.member, e.node, e.info) for e in entries] == [
                        ("in-child", node_id, {"name": "child"})
                    ]

                await eventually(child_present, timeout=5)
                events: list[PresenceEvent] = []
                async with watcher.watch_presence("doomed") as stream:
                    child.send_signal(signal.SIGKILL)
                    killed = anyio.current_time()
                    await eventually(lambda: _check_members(watcher, "doomed", set()), timeout=5)
                    gone_after = anyio.current_time() - killed
                    with anyio.move_on_after(2):
                        async for event in stream:
                            events.append(event)
                            break
                assert gone_after <= 1.5 + 0.2 + 0.8, gone_after  # TTL + tick + load slack
                assert [(e.kind, e.entry.member) for e in events] == [("leave", "in-child")]
                assert await _room_keys(backend.namespace, "doomed") == 0
            finally:
                child.kill()
                child.wait(timeout=10)
                if child.stdout is not None:
                    child.stdout.close()
    finally:
        await backend.cleanup()
        await BACKENDS["redis"](backend.namespace).cleanup()


async def test_node_presumed_dead_writes_its_entries_again() -> None:
    """A node whose liveness key expired (it stalled past its TTL) and whose entries another
    node removed meanwhile puts them back once it refreshes."""
    from redis.asyncio import Redis

    backend = BACKENDS["redis"](unique_namespace())
    backend.available()
    opts = {**TEST_ROUTER_OPTIONS}
    try:
        async with RoomRouter(
            backend.broker(), namespace=backend.namespace, presence=REDIS, **opts
        ) as router:
            member = router.member("m")
            await member.join("room")
            await _check_members(router, "room", {"m"})
            client = Redis(host="127.0.0.1", port=6379)
            prefix = f"rr:{{{backend.namespace}}}:"
            try:  # what other nodes do to a node they found dead
                await client.delete(prefix + "pn:" + router.node_id, prefix + "p:room")
            finally:
                await client.aclose()
            await eventually(lambda: _check_members(router, "room", {"m"}), timeout=5)
    finally:
        await backend.cleanup()


async def test_preferred_node_agrees_across_nodes_and_moves_little() -> None:
    backend = BACKENDS["memory"](unique_namespace())
    opts = {**TEST_ROUTER_OPTIONS}
    async with AsyncExitStack() as stack:
        routers = [
            await stack.enter_async_context(
                RoomRouter(backend.broker(), namespace=backend.namespace, **opts)
            )
            for _ in range(4)
        ]
        ids = {r.node_id for r in routers}
        for r in routers:
            await eventually(lambda r=r: _assert(r.live_nodes() | {r.node_id} == ids))
        rooms = [f"lecture-{i}" for i in range(400)]
        choice = {room: routers[0].preferred_node(room) for room in rooms}
        for r in routers[1:]:
            assert {room: r.preferred_node(room) for room in rooms} == choice
        counts = {node: list(choice.values()).count(node) for node in ids}
        assert min(counts.values()) >= 60, counts  # 100 each on average
        leaving = routers[3]
        await leaving.aclose()
        await eventually(lambda: _assert(leaving.node_id not in routers[0].live_nodes()))
        after = {room: routers[0].preferred_node(room) for room in rooms}
        moved = {room for room in rooms if after[room] != choice[room]}
        assert moved == {room for room in rooms if choice[room] == leaving.node_id}
