"""Redis Cluster specifics (``?cluster=1``): traffic stays on its shard, one subscriber
connection per shard a node needs, a killed shard connection and a failover of a shard master
are survived, forged frames on a sharded room channel are dropped, presence works on a cluster.

The contract, stateful and persistence suites run on the cluster too (backend
``redis-cluster``). Clusters are started by ``tests/redis_cluster.py`` on loopback ports."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from typing import Any

import anyio
import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from roomrouter import (
    ConfigurationError,
    DeliveryGap,
    Envelope,
    HistoryUnavailable,
    Member,
    RoomRouter,
)
from roomrouter._envelope import encode_envelope
from roomrouter.brokers.redis import key_prefix
from roomrouter.brokers.redis_cluster import RedisClusterBroker, cluster_room_channel
from roomrouter.presence import PresenceEvent
from roomrouter.presence.redis import RedisPresence

from .conftest import TEST_ROUTER_OPTIONS, unique_namespace
from .helpers import eventually, receive_n, watch_presence_into
from .redis_cluster import RedisClusterServers, _cli, require_cluster_binaries

pytestmark = pytest.mark.anyio

BROKER_OPTIONS: dict[str, Any] = {"health_interval": 1.0, "max_backoff": 0.5}


class Nodes:
    """Routers of one namespace on one cluster, closed with the test."""

    def __init__(self, servers: RedisClusterServers, stack: AsyncExitStack) -> None:
        self.servers = servers
        self.stack = stack
        self.namespace = unique_namespace()

    async def start(self, count: int, **options: Any) -> list[RoomRouter]:
        routers = []
        for _ in range(count):
            broker = RedisClusterBroker(
                host="127.0.0.1", port=self.servers.ports[0], **BROKER_OPTIONS
            )
            router = RoomRouter(
                broker, namespace=self.namespace, **{**TEST_ROUTER_OPTIONS, **options}
            )
            routers.append(await self.stack.enter_async_context(router))
        return routers

    def node_client(self, node: str) -> Redis:
        host, _, port = node.rpartition(":")
        return Redis(host=host, port=int(port))


@pytest.fixture
async def nodes(redis_cluster: RedisClusterServers) -> AsyncIterator[Nodes]:
    async with AsyncExitStack() as stack:
        yield Nodes(redis_cluster, stack)


@pytest.fixture
def failover_cluster() -> Iterator[RedisClusterServers]:
    """A cluster of its own with one replica per master, to fail over."""
    from .backends import BACKENDS

    require_cluster_binaries()
    BACKENDS["redis-cluster"]("probe").available()
    servers = RedisClusterServers(3, replicas=1)
    servers.start()
    try:
        yield servers
    finally:
        servers.stop()


def _broker(router: RoomRouter) -> RedisClusterBroker:
    assert isinstance(router.broker, RedisClusterBroker)
    return router.broker


def _rooms_per_shard(router: RoomRouter, masters: list[str]) -> dict[str, str]:
    """One room name per shard master: master -> room."""
    found: dict[str, str] = {}
    for i in range(1000):
        room = f"room-{i}"
        found.setdefault(_broker(router).shard_of(room), room)
        if len(found) == len(masters):
            return found
    raise AssertionError("no room for every shard")


async def _sub_connections(client: Redis, name: str) -> list[dict[str, Any]]:
    return [c for c in await client.client_list(_type="pubsub") if c.get("name") == name]


async def _deliver_within(
    publisher: RoomRouter, member: Member, room: str, seconds: float
) -> float:
    """Publish to ``room`` until ``member`` gets one; returns how long that took."""
    start = anyio.current_time()
    with anyio.fail_after(seconds):
        while True:
            try:
                sent = await publisher.publish(room, b"probe")
            except Exception:  # the broker is still settling: try again
                await anyio.sleep(0.1)
                continue
            with anyio.move_on_after(0.3):
                while True:
                    try:
                        if (await member.receive()).id == sent.id:
                            return anyio.current_time() - start
                    except DeliveryGap:  # probes lost to the fault: said (docs/architecture.md)
                        pass


def _assert(condition: bool) -> None:
    assert condition


# -- traffic stays on its shard -------------------------------------------------------------------


async def test_traffic_stays_on_its_shard(nodes: Nodes) -> None:
    a, b, c = await nodes.start(3)
    masters = await _broker(a)._masters()
    assert len(masters) == 3
    rooms = _rooms_per_shard(a, masters)
    r1, r2, r3 = (rooms[m] for m in masters)
    await a.member("a1").join(r1)
    await a.member("a2").join(r2)
    mb = b.member("b1")
    await mb.join(r1)
    expected = {masters[0]: {r1: 2}, masters[1]: {r2: 1}, masters[2]: {}}
    cluster = RedisCluster(host="127.0.0.1", port=nodes.servers.ports[0])
    try:
        await cluster.initialize()
        control_owner = cluster.get_node_from_key(key_prefix(nodes.namespace) + b"c").name
    finally:
        await cluster.aclose()
    need = {a: {masters[0], masters[1], control_owner}, b: {masters[0], control_owner},
            c: {control_owner}}  # fmt: skip
    prefix = cluster_room_channel(nodes.namespace, "")[:-1]  # rr:<ns>:r:{
    for master in masters:
        client = nodes.node_client(master)
        try:
            # Asked on the shard node itself: only that shard's rooms, with their counts.
            channels = await client.execute_command("PUBSUB", "SHARDCHANNELS", prefix + b"*")
            assert sorted(channels) == sorted(
                cluster_room_channel(nodes.namespace, r) for r in expected[master]
            ), master
            if channels:
                flat = await client.execute_command("PUBSUB", "SHARDNUMSUB", *channels)
                counts = dict(zip(flat[::2], flat[1::2], strict=True))
                assert counts == {
                    cluster_room_channel(nodes.namespace, r): n for r, n in expected[master].items()
                }
            assert await _broker(a).server_channels(master) == expected[master]
            # One subscriber connection per shard a node needs, none elsewhere.
            for router, shards in need.items():
                conns = await _sub_connections(client, _broker(router).client_name("sub"))
                assert len(conns) == (1 if master in shards else 0), (router, master)
            for channel in channels:
                assert key_slot(channel) in _slots_of(nodes.servers, master)
        finally:
            await client.aclose()
    # The room on the third shard has no member: a publish to it reaches nobody.
    before = [r.stats()["broker_received"] for r in (a, b, c)]
    await c.publish(r3, b"void")
    await c.publish(r1, b"to a and b")
    [got] = await receive_n(mb, 1)
    assert got.payload == b"to a and b"
    after = [r.stats()["broker_received"] for r in (a, b, c)]
    assert after[2] == before[2]


def _slots_of(servers: RedisClusterServers, master: str) -> set[int]:
    port = int(master.rpartition(":")[2])
    slots: set[int] = set()
    for line in _cli(port, "CLUSTER", "NODES").splitlines():
        fields = line.split()
        if "myself" in fields[2]:
            for part in fields[8:]:
                lo, _, hi = part.partition("-")
                slots.update(range(int(lo), int(hi or lo) + 1))
    return slots


# -- faults ---------------------------------------------------------------------------------------


async def test_client_kill_of_one_shard_subscriber_is_survived(nodes: Nodes) -> None:
    a, b = await nodes.start(2)
    masters = await _broker(a)._masters()
    rooms = _rooms_per_shard(a, masters)
    member = a.member("m")
    for room in rooms.values():
        await member.join(room)
    victim = masters[1]
    client = nodes.node_client(victim)
    try:
        [conn] = await _sub_connections(client, _broker(a).client_name("sub"))
        await client.execute_command("CLIENT", "KILL", "ID", conn["id"])
        took = await _deliver_within(b, member, rooms[victim], 5)
        # Back to one connection on that shard, holding the rooms it held.
        await eventually(lambda: _assert(a.stats()["reconnects"] >= 1), timeout=5)
        assert len(await _sub_connections(client, _broker(a).client_name("sub"))) == 1
    finally:
        await client.aclose()
    assert await _broker(a).server_subscription_count() == len(rooms)
    # Guarantee 2 for joins after the kill: on the shard that was hit, publish at once.
    fresh = [r for r in (f"after-{i}" for i in range(200)) if _broker(a).shard_of(r) == victim]
    for room in fresh[:10]:
        joiner = a.member(f"j-{room}")
        await joiner.join(room)
        sent = await b.publish(room, b"right after the join")
        [got] = await receive_n(joiner, 1)
        assert got.id == sent.id
    for room in rooms.values():  # the other shards went on too
        sent = await b.publish(room, b"everywhere")
        while (got := await receive_n(member, 1))[0].id != sent.id:
            pass
    assert a.stats()["task_restarts"] == 0
    assert took < 5


async def test_manual_failover_of_a_shard_master_is_survived(
    failover_cluster: RedisClusterServers,
) -> None:
    async with AsyncExitStack() as stack:
        nodes = Nodes(failover_cluster, stack)
        a, b = await nodes.start(2)
        masters = await _broker(a)._masters()
        rooms = _rooms_per_shard(a, masters)
        member = a.member("m")
        for room in rooms.values():
            await member.join(room)
        old = masters[0]
        replica = _replica_of(failover_cluster, old)
        assert "OK" in _cli(replica, "CLUSTER", "FAILOVER")
        deadline = time.monotonic() + 15
        while "role:master" not in _cli(replica, "INFO", "replication"):
            assert time.monotonic() < deadline, "the replica was not promoted"
            await anyio.sleep(0.05)
        took = await _deliver_within(b, member, rooms[old], 5)
        new = f"127.0.0.1:{replica}"
        await eventually(lambda: _assert(_broker(a).shard_of(rooms[old]) == new), timeout=5)
        client = nodes.node_client(new)
        try:
            await eventually(_has_one_sub(client, _broker(a).client_name("sub")), timeout=5)
        finally:
            await client.aclose()
        for room in rooms.values():
            assert (await _deliver_within(b, member, room, 5)) < 5
        joiner = a.member("late")
        await joiner.join(rooms[old] + "-late")
        sent = await b.publish(rooms[old] + "-late", b"after the failover")
        [got] = await receive_n(joiner, 1)
        assert got.id == sent.id
        assert a.stats()["task_restarts"] == 0
        assert took < 5


async def test_history_reads_follow_a_failover(failover_cluster: RedisClusterServers) -> None:
    """History reads have connections of their own per shard master: after a manual failover
    of the room's master, recoveries read from the promoted replica, and the resync closes
    the read connections to the old master (a replica now)."""
    async with AsyncExitStack() as stack:
        nodes = Nodes(failover_cluster, stack)
        [a] = await nodes.start(1)
        broker = _broker(a)
        old = broker.shard_of("r")
        sent = [await a.publish("r", b"%d" % i, persist=True) for i in range(20)]
        assert [e.id for e in await a.history("r", limit=50)] == [e.id for e in sent]
        client = nodes.node_client(old)
        stack.push_async_callback(client.aclose)
        name = broker.client_name("read")
        assert any(c.get("name") == name for c in await client.client_list())
        replica = _replica_of(failover_cluster, old)
        assert "OK" in _cli(replica, "CLUSTER", "FAILOVER")
        deadline = time.monotonic() + 15
        while "role:master" not in _cli(replica, "INFO", "replication"):
            assert time.monotonic() < deadline, "the replica was not promoted"
            await anyio.sleep(0.05)
        members = [a.member(f"m{i}") for i in range(10)]

        async def recovered(i: int) -> None:
            with anyio.fail_after(10):
                while True:
                    try:
                        await members[i].join("r", since=sent[i].id)
                        break
                    except HistoryUnavailable:  # the first read may meet the old master
                        await anyio.sleep(0.1)
            got = [await members[i].receive() for _ in sent[i + 1 :]]
            assert [e.id for e in got] == [e.id for e in sent[i + 1 :]]

        async with anyio.create_task_group() as tg:
            for i in range(len(members)):
                tg.start_soon(recovered, i)
        await eventually(lambda: _assert(broker.shard_of("r") == f"127.0.0.1:{replica}"))

        async def old_reads_closed() -> None:
            assert not any(c.get("name") == name for c in await client.client_list())

        await eventually(old_reads_closed, timeout=5)


async def test_a_killed_shard_master_is_survived(failover_cluster: RedisClusterServers) -> None:
    """SIGKILL of a shard master, the one holding the namespace's control channels: its
    replica is promoted after the cluster's node timeout (2 s here) and every room delivers
    again, the cluster view included, within 10 s of the kill."""
    async with AsyncExitStack() as stack:
        nodes = Nodes(failover_cluster, stack)
        a, b = await nodes.start(2)
        broker = _broker(a)
        masters = await broker._masters()
        rooms = _rooms_per_shard(a, masters)
        member = a.member("m")
        for room in rooms.values():
            await member.join(room)
        control = broker._owner(broker._control)
        replica = _replica_of(failover_cluster, control)
        killed_at = anyio.current_time()
        failover_cluster.processes[int(control.rpartition(":")[2])].kill()
        for room in rooms.values():
            await _deliver_within(b, member, room, 10 - (anyio.current_time() - killed_at))
        assert "role:master" in _cli(replica, "INFO", "replication")
        await eventually(lambda: _assert(b.remote_hosts(rooms[control]) == {a.node_id}))
        assert a.stats()["task_restarts"] == 0 and b.stats()["task_restarts"] == 0


def _has_one_sub(client: Redis, name: str) -> Any:
    async def check() -> None:
        assert len(await _sub_connections(client, name)) == 1

    return check


def _replica_of(servers: RedisClusterServers, master: str) -> int:
    port = int(master.rpartition(":")[2])
    for candidate in servers.ports:
        info = _cli(candidate, "INFO", "replication")
        if "role:slave" in info and f"master_port:{port}\n" in info:
            return candidate
    raise AssertionError(f"no replica of {master}")


@pytest.fixture
def own_cluster() -> Iterator[RedisClusterServers]:
    """A 3-master cluster of its own, whose slots the test may move."""
    from .backends import BACKENDS

    BACKENDS["redis-cluster"]("probe").available()
    servers = RedisClusterServers(3)
    servers.start()
    try:
        yield servers
    finally:
        servers.stop()


async def test_slot_migration_is_followed(own_cluster: RedisClusterServers) -> None:
    async with AsyncExitStack() as stack:
        nodes = Nodes(own_cluster, stack)
        a, b = await nodes.start(2)
        masters = await _broker(a)._masters()
        room = _rooms_per_shard(a, masters)[masters[1]]
        member = a.member("m")
        await member.join(room)
        source, target = (int(m.rpartition(":")[2]) for m in (masters[1], masters[2]))
        slot = key_slot(cluster_room_channel(nodes.namespace, room))
        ids = {p: _cli(p, "CLUSTER", "MYID").strip() for p in (source, target)}
        # An empty slot (channels are not keys): IMPORTING, MIGRATING, then hand it over.
        assert "OK" in _cli(target, "CLUSTER", "SETSLOT", str(slot), "IMPORTING", ids[source])
        assert "OK" in _cli(source, "CLUSTER", "SETSLOT", str(slot), "MIGRATING", ids[target])
        for port in own_cluster.ports:
            _cli(port, "CLUSTER", "SETSLOT", str(slot), "NODE", ids[target])
        took = await _deliver_within(b, member, room, 5)
        await eventually(lambda: _assert(_broker(a).shard_of(room) == masters[2]), timeout=5)
        channel = cluster_room_channel(nodes.namespace, room)

        async def moved() -> None:
            assert await _broker(a).server_channels(masters[2]) == {room: 1}
            assert await _broker(a).server_channels(masters[1]) == {}

        await eventually(moved, timeout=5)
        sent = await b.publish(room, b"on the new owner")
        with anyio.fail_after(5):
            while True:
                try:
                    if (await member.receive()).id == sent.id:
                        break
                except DeliveryGap:
                    # The move resubscribed the room: a probe may have been lost, and said so
                    # (the mark can come after the probe that found the new owner).
                    pass
        assert key_slot(channel) in _slots_of(own_cluster, masters[2])
        assert took < 5


# -- bad input ------------------------------------------------------------------------------------


async def test_garbage_and_forged_frames_on_a_sharded_channel_are_dropped(nodes: Nodes) -> None:
    a, b = await nodes.start(2)
    member = b.member("m")
    await member.join("R")
    await a.publish("R", b"before")
    forged = encode_envelope(Envelope("x-1", "other-room", a.node_id, 0.0, b"forged"))
    channel = cluster_room_channel(nodes.namespace, "R")
    client = nodes.node_client(_broker(b).shard_of("R"))
    try:
        for junk in (b"", b"\xff\xfe garbage", b"\x93\x01\x02\x03", b"\xc1", forged):
            assert await client.execute_command("SPUBLISH", channel, junk) == 1
    finally:
        await client.aclose()
    await a.publish("R", b"after")
    assert [e.payload for e in await receive_n(member, 2)] == [b"before", b"after"]
    await eventually(lambda: _assert(b.stats()["dropped_decode"] == 4))
    await eventually(lambda: _assert(b.stats()["dropped_room_mismatch"] == 1))
    assert b.stats()["task_restarts"] == 0


# -- presence and URLs ----------------------------------------------------------------------------


async def test_presence_on_a_cluster(redis_cluster: RedisClusterServers) -> None:
    ns = unique_namespace()
    url = redis_cluster.url + "&health_interval=1"
    async with AsyncExitStack() as stack:
        a, b = [
            await stack.enter_async_context(
                RoomRouter.from_url(url, namespace=ns, presence=True, **TEST_ROUTER_OPTIONS)
            )
            for _ in range(2)
        ]
        assert isinstance(a.broker, RedisClusterBroker)
        events: list[PresenceEvent] = []
        ready = anyio.Event()

        async with anyio.create_task_group() as tg:
            tg.start_soon(watch_presence_into, a, "lobby", events, ready)
            await ready.wait()
            member = b.member("m1")
            await member.join("lobby")
            assert [e.member for e in await a.presence("lobby")] == ["m1"]
            await member.leave("lobby")
            await eventually(lambda: _assert(len(events) >= 2))
            tg.cancel_scope.cancel()
        assert [(e.kind, e.entry.member) for e in events] == [("join", "m1"), ("leave", "m1")]
        assert await a.presence("lobby") == []


async def test_cluster_url_options() -> None:
    router = RoomRouter.from_url(
        "redis://127.0.0.1:7000/?cluster=1&operation_timeout=2", namespace="n"
    )
    broker = router.broker
    assert isinstance(broker, RedisClusterBroker)
    assert (broker.host, broker.port, broker.operation_timeout) == ("127.0.0.1", 7000, 2.0)
    with pytest.raises(ConfigurationError) as info:
        RoomRouter.from_url("redis://u:hunter2@h:7000/3?cluster=1", namespace="n")
    assert "hunter2" not in str(info.value)
    with pytest.raises(ConfigurationError) as info:
        RoomRouter.from_url("redis://u:hunter2@h/0?cluster=1&operation_timeout=x", namespace="n")
    assert "hunter2" not in str(info.value)
    # Several seed nodes: the client starts from whichever answers (issue 19).
    broker = RoomRouter.from_url(
        "redis://u:pw@h1:7000,h2:7001,[::1]:7002,h4/0?cluster=1&operation_timeout=2", namespace="n"
    ).broker
    assert isinstance(broker, RedisClusterBroker)
    assert (broker.host, broker.port, broker.operation_timeout) == ("h1", 7000, 2.0)
    assert broker.seeds == [("h2", 7001), ("::1", 7002), ("h4", 6379)]
    assert broker._conn_kwargs["password"] == "pw"
    presence = RedisPresence.from_url("redis://h1:7000,h2:7001/0?cluster=1")
    assert (presence.cluster, presence.seeds) == (True, [("h2", 7001)])
    for bad in (
        "redis://u:hunter2@h1:7000,h2:x/?cluster=1",
        "redis://u:hunter2@h1,:7001/?cluster=1",
    ):
        with pytest.raises(ConfigurationError) as info:
            RoomRouter.from_url(bad, namespace="n")
        assert "hunter2" not in str(info.value)
    with pytest.raises(ConfigurationError):
        RedisPresence.from_url("redis://h1:7000,h2:7001/0")  # several nodes: a cluster only
    # Without cluster=1 the single-Redis broker and its names are untouched.
    assert RoomRouter.from_url("redis://127.0.0.1:6379/0", namespace="n").broker.name == "redis"
