"""Recovery reads (issue 19): a failed recovery leaves the member out, garbage in the recent
cache is skipped and counted, reads start at ``since`` and are shared per room, and the SQL
sinks answer a room's history from the (room, id) index."""

from __future__ import annotations

from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import pytest

from roomrouter import BrokerUnavailable, Envelope, HistoryUnavailable, Member, RoomRouter
from roomrouter._envelope import encode_envelope
from roomrouter.brokers._base import RECENT_SKEW_MS
from roomrouter.brokers.memory import MemoryBroker
from roomrouter.storage import SQLiteSink

from .backends import BACKENDS, Backend, key_prefix_of
from .conftest import TEST_ROUTER_OPTIONS, selected_backends, unique_namespace
from .faulty import ControlFault
from .helpers import drain, eventually, receive_n
from .test_redis import PrivateRedis

pytestmark = pytest.mark.anyio

STORAGE = [n for n in selected_backends() if BACKENDS[n].supports_storage]


def _router(broker: object, **options: object) -> RoomRouter:
    return RoomRouter(broker, namespace=unique_namespace(), **{**TEST_ROUTER_OPTIONS, **options})  # type: ignore[arg-type]


# -- case 2: a join whose recovery failed leaves the member out -----------------------------------


async def test_a_join_whose_recovery_failed_leaves_the_member_out_and_a_retry_recovers() -> None:
    fault = ControlFault(MemoryBroker(unique_namespace()))
    async with _router(fault) as router:
        sent = [await router.publish("r", b"%d" % i, persist=True) for i in range(30)]
        since = sent[9].id
        members = [router.member(f"m{i}") for i in range(20)]
        fault.recent_error = BrokerUnavailable("the recent cache is down")
        errors: list[BaseException] = []

        async def rejoin(member: object) -> None:
            try:
                await member.join("r", since=since)  # type: ignore[attr-defined]
            except HistoryUnavailable as exc:
                errors.append(exc)

        async with anyio.create_task_group() as tg:
            for m in members:
                tg.start_soon(rejoin, m)
        assert len(errors) == len(members)
        assert all(m.rooms == frozenset() for m in members)
        assert "r" not in router.local_rooms
        await router.publish("r", b"while out", persist=True)
        assert all(m.pending() == 0 for m in members)

        fault.recent_error = None
        recoveries = []

        async def retry(member: object) -> None:
            recoveries.append(await member.join("r", since=since))  # type: ignore[attr-defined]

        async with anyio.create_task_group() as tg:
            for m in members:
                tg.start_soon(retry, m)
        assert all(r.count == 21 and r.complete for r in recoveries), recoveries
        for m in members:
            got = await receive_n(m, 21)
            assert [e.id for e in got[:20]] == [e.id for e in sent[10:]]
            assert got[20].payload == b"while out"


async def _second_joins_during_a_held_recovery(
    outcome: str, kinds: tuple[str, ...]
) -> tuple[list[object], RoomRouter, list[Envelope], Member]:
    """A member joins ``r`` with ``since`` while its recovery is held in flight; then the
    same member joins ``r`` again, once per ``kinds`` at once (``plain``, ``since``,
    ``history``), and the first's recovery is let go: it fails (``outcome="fail"``), its
    caller is cancelled (``"cancel"``) or it succeeds (``"ok"``). Returns what each second
    join returned (with whether the member was in the room then) or raised, the router
    (running: the caller closes it), the sent envelopes and the member."""
    fault = ControlFault(MemoryBroker(unique_namespace()))
    router = _router(fault)
    await router.__aenter__()
    sent = [await router.publish("r", b"%d" % i, persist=True) for i in range(10)]
    member = router.member("m")
    fault.recent_hold = anyio.Event()
    if outcome == "fail":
        fault.recent_error = BrokerUnavailable("the recent cache is down")
    seconds: list[object] = [None] * len(kinds)
    first: list[object] = []

    async def first_join(scope: anyio.CancelScope) -> None:
        with scope:
            try:
                first.append(await member.join("r", since=sent[2].id))
            except HistoryUnavailable as exc:
                first.append(exc)

    async def second_join(i: int) -> None:
        try:
            if kinds[i] == "plain":
                recovery = await member.join("r")
            elif kinds[i] == "history":
                recovery = await member.join("r", history=2)
            else:
                recovery = await member.join("r", since=sent[4].id)
            seconds[i] = (recovery, "r" in member.rooms)
        except HistoryUnavailable as exc:
            seconds[i] = exc

    scope = anyio.CancelScope()
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(first_join, scope)

            def reading() -> None:  # the first joined live and is reading history
                assert fault.recent_reads > 0

            await eventually(reading, interval=0.005)
            assert "r" in member.rooms
            for i in range(len(kinds)):
                tg.start_soon(second_join, i)
            await anyio.sleep(0.1)  # the second joins are in, waiting or (before) returned
            if outcome == "cancel":
                scope.cancel()
            hold, fault.recent_hold = fault.recent_hold, None
            hold.set()
    assert len(first) == (outcome != "cancel")
    return seconds, router, sent, member


async def test_a_second_join_during_a_recovery_that_fails_fails_too() -> None:
    """A second join of the same member and room returned once the first's *live* join was
    done, and reported success; the first's recovery then failed, which takes the member out
    of the room: the second join's "joined" was false. It now waits for the first's whole
    outcome, and fails with it."""
    kinds = ("plain", "since", "since", "history")
    seconds, router, _, member = await _second_joins_during_a_held_recovery("fail", kinds)
    try:
        assert all(isinstance(s, HistoryUnavailable) for s in seconds), seconds
        assert member.rooms == frozenset()
        assert "r" not in router.local_rooms
    finally:
        await router.__aexit__(None, None, None)


@pytest.mark.parametrize(
    ("outcome", "kinds"),
    [("ok", ("plain", "since", "since", "history")), ("cancel", ("since", "since", "since"))],
)
async def test_a_second_join_during_a_recovery_returns_with_its_outcome(
    outcome: str, kinds: tuple[str, ...]
) -> None:
    """When the first's recovery succeeds, the second joins return with the member in the
    room and the first's recovery delivered. When the first's caller is cancelled during its
    recovery (which takes the member out), one second join makes the join with its own
    recovery and the others wait for it: each returns with the member in the room, and what
    was missed after its ``since`` comes first, once."""
    seconds, router, sent, member = await _second_joins_during_a_held_recovery(outcome, kinds)
    try:
        assert all(isinstance(s, tuple) and s[1] for s in seconds), seconds
        assert member.rooms == frozenset({"r"})
        later = await router.publish("r", b"later")
        got = [e.id for e in await drain(member, settle=0.05)]
        since = 2 if outcome == "ok" else 4
        assert got == [e.id for e in sent[since + 1 :]] + [later.id]
    finally:
        await router.__aexit__(None, None, None)


async def test_a_join_whose_sink_failed_leaves_the_member_out(tmp_path: Path) -> None:
    class BrokenSink(SQLiteSink):
        broken = True

        async def history(self, room: str, **kwargs: object) -> list[Envelope]:  # type: ignore[override]
            if self.broken:
                from roomrouter import SinkError

                raise SinkError("database is down")
            return await super().history(room, **kwargs)  # type: ignore[arg-type]

    sink = BrokenSink(tmp_path / "s.db")
    async with _router(MemoryBroker(unique_namespace()), sink=sink) as router:
        sent = [await router.publish("r", b"x", persist=True) for _ in range(5)]
        member = router.member("m")
        with pytest.raises(HistoryUnavailable):
            await member.join("r", since=sent[0].id)
        assert member.rooms == frozenset()
        sink.broken = False
        recovery = await member.join("r", since=sent[0].id)
        assert recovery.count == 4 and member.rooms == {"r"}


# -- case 8 (part): garbage in the recent cache ---------------------------------------------------


async def _write_garbage(backend: Backend, router: RoomRouter, room: str) -> int:
    """Write entries that hold no envelope into ``room``'s recent cache with a raw client of
    the broker; how many."""
    if backend.name == "memory":
        broker = router.broker
        assert isinstance(broker, MemoryBroker)
        broker.hub._append_recent((router.namespace, room), b"\x00garbage", 1000)
        return 1
    if backend.name in ("redis", "redis-sharded", "redis-cluster"):
        if backend.name == "redis-cluster":
            from roomrouter.brokers.redis_cluster import cluster_recent_key

            key = cluster_recent_key(router.namespace, room)
            client: Any = await backend._client()  # type: ignore[attr-defined]
        else:
            from redis.asyncio import Redis

            key = key_prefix_of(router.namespace) + b"recent:" + room.encode()
            client = Redis(host="127.0.0.1", port=6379)
        try:
            await client.xadd(key, {b"x": b"no f field"})
            await client.xadd(key, {b"f": b"\xc1 not msgpack"})
        finally:
            await client.aclose()
        return 2
    if backend.name == "rabbitmq":
        import aiormq

        from roomrouter.brokers.rabbitmq import RabbitMQBroker, routing_key

        broker = router.broker
        assert isinstance(broker, RabbitMQBroker)
        connection = await aiormq.connect(backend.url)  # type: ignore[attr-defined]
        try:
            channel = await connection.channel()
            queue = broker._recent_queue(routing_key(room))
            await channel.basic_publish(b"\xc1 not msgpack", exchange="", routing_key=queue)
        finally:
            await connection.close()
        return 1
    if hasattr(backend, "inject_recent"):  # a backend that says how (tests/backends.py)
        return await backend.inject_recent(router, room)  # type: ignore[no-any-return]
    assert backend.name == "kafka"
    from aiokafka import AIOKafkaProducer

    from roomrouter.brokers.kafka import KafkaBroker
    from roomrouter.brokers.kafka._common import _STORED

    broker = router.broker
    assert isinstance(broker, KafkaBroker)
    topic = broker.topic_names(router.namespace, backend.topic_prefix)[0]  # type: ignore[attr-defined]
    producer = AIOKafkaProducer(bootstrap_servers=backend.bootstrap, enable_idempotence=False)  # type: ignore[attr-defined]
    await producer.start()
    try:
        await producer.send_and_wait(
            topic,
            b"\xc1 not msgpack",
            key=room.encode(),
            partition=broker.partition_for(room),
            headers=[_STORED],
        )
    finally:
        await producer.stop()
    return 1


@pytest.fixture(params=STORAGE)
async def cache_backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    backend = BACKENDS[request.param](unique_namespace())
    backend.available()
    try:
        yield backend
    finally:
        await backend.cleanup()


def _router_on(backend: Backend, **broker_options: object) -> RoomRouter:
    options = {**TEST_ROUTER_OPTIONS, **backend.router_options}
    broker = backend.broker(**broker_options)  # type: ignore[call-arg]
    return RoomRouter(broker, namespace=backend.namespace, **options)  # type: ignore[arg-type]


async def test_garbage_in_the_recent_cache_is_skipped_and_counted(cache_backend: Backend) -> None:
    router = _router_on(cache_backend)
    async with router:
        first = await router.publish("r", b"one", persist=True)
        garbage = await _write_garbage(cache_backend, router, "r")
        last = await router.publish("r", b"two", persist=True)
        history = await router.history("r")
        assert [e.id for e in history] == [first.id, last.id]
        member = router.member("m")
        recovery = await member.join("r", since=first.id)
        assert recovery.count == 1 and recovery.complete
        assert [e.id for e in await receive_n(member, 1)] == [last.id]
        assert router.stats()["dropped_recent_garbage"] >= garbage


# -- reads start at `since`, truncated stays exact ------------------------------------------------


async def test_a_recent_read_with_since_stops_at_it(cache_backend: Backend) -> None:
    router = _router_on(cache_backend, recent_size=600)
    broker = router.broker
    async with router:
        old = [await router.publish("r", b"old", persist=True) for _ in range(400)]
        # Beyond the skew allowance: a scan for `since` below stops before the old ones.
        await anyio.sleep(RECENT_SKEW_MS / 1000 + 0.05)
        new = [await router.publish("r", b"new", persist=True) for _ in range(300)]
        whole = await broker.recent("r")
        assert len(whole.frames) == 600 and whole.truncated  # 100 evicted
        part = await broker.recent("r", since=new[100].id)
        assert not part.truncated  # it reached `since`: every frame above it is there
        assert 199 <= len(part.frames) <= 300
        assert part.frames == whole.frames[-len(part.frames) :]
        limited = await broker.recent("r", since=new[100].id, limit=50)
        assert limited.truncated and limited.frames == whole.frames[-50:]
        # Asking for a position the cache no longer reaches: truncated, all that is left.
        gone = await broker.recent("r", since=old[10].id)
        assert gone.truncated and gone.frames == whole.frames
        member = router.member("m")
        recovery = await member.join("r", since=new[100].id)
        assert recovery.complete and recovery.count == 199


# -- single flight --------------------------------------------------------------------------------


async def test_concurrent_recoveries_of_a_room_share_one_read() -> None:
    fault = ControlFault(MemoryBroker(unique_namespace()))
    async with _router(fault) as router:
        sent = [
            await router.publish(f"room{r}", b"x", persist=True)
            for r in range(4)
            for _ in range(50)
        ]
        by_room = {f"room{r}": [e for e in sent if e.room == f"room{r}"] for r in range(4)}
        members = [router.member(f"m{i}") for i in range(400)]
        recoveries: dict[str, int] = {}

        async def rejoin(i: int) -> None:
            room = f"room{i % 4}"
            since = by_room[room][10 + i % 30].id
            recovery = await members[i].join(room, since=since)
            recoveries[members[i].id] = recovery.count
            assert recovery.count == 50 - 11 - i % 30 and recovery.complete

        before = fault.recent_reads
        async with anyio.create_task_group() as tg:
            for i in range(len(members)):
                tg.start_soon(rejoin, i)
        assert len(recoveries) == 400
        # One read per room on the wire, one gathering behind it: at most two per room.
        assert fault.recent_reads - before <= 8, fault.recent_reads - before
        for i, m in enumerate(members):
            room = f"room{i % 4}"
            assert [e.id for e in await drain(m, settle=0)] == [
                e.id for e in by_room[room][11 + i % 30 :]
            ]


# -- history reads have a budget of their own ---------------------------------------------


@pytest.mark.serial
async def test_history_reads_do_not_wait_behind_publishes(private_redis: PrivateRedis) -> None:
    """A recovery's read must not queue behind publishes on the publisher's pipeline (nor
    share their timeout): with Redis refusing writes for a while (CLIENT PAUSE WRITE), a
    persisted publish waits, and a join with ``since`` still recovers at once."""
    from redis.asyncio import Redis

    from roomrouter.brokers.redis import RedisBroker

    broker = RedisBroker(host="127.0.0.1", port=private_redis.port, operation_timeout=3)
    async with _router(broker) as router:
        sent = [await router.publish("r", b"%d" % i, persist=True) for i in range(20)]
        member = router.member("m")
        # The room is subscribed already (a first join announces it on the control channel,
        # a write that the pause holds too): what is measured is the history read.
        await router.member("keeper").join("r")
        client = Redis(host="127.0.0.1", port=private_redis.port)
        try:
            await client.execute_command("CLIENT", "PAUSE", "1500", "WRITE")
            async with anyio.create_task_group() as tg:
                tg.start_soon(partial(router.publish, "r", b"paused", persist=True))
                await anyio.sleep(0.1)  # that publish is on the wire, waiting for Redis
                started = anyio.current_time()
                recovery = await member.join("r", since=sent[5].id)
                took = anyio.current_time() - started
        finally:
            await client.aclose()
        assert recovery.count >= 14 and recovery.complete
        assert took < 0.7, f"the recovery waited {took:.2f}s behind a paused publish"


async def test_cluster_history_reads_do_not_wait_behind_publishes() -> None:
    """The same on Redis Cluster: with the room's shard refusing writes for a while (CLIENT
    PAUSE WRITE there), a persisted publish to the room waits on the shard's pipelined
    connection, and a join with ``since`` still reads the shard's recent cache at once."""
    from redis.asyncio import Redis

    from roomrouter.brokers.redis_cluster import RedisClusterBroker

    backend = BACKENDS["redis-cluster"](unique_namespace())
    backend.available()
    try:
        async with _router_on(backend, operation_timeout=3) as router:
            broker = router.broker
            assert isinstance(broker, RedisClusterBroker)
            sent = [await router.publish("r", b"%d" % i, persist=True) for i in range(20)]
            member = router.member("m")
            await router.member("keeper").join("r")  # the room is subscribed already
            host, _, port = broker.shard_of("r").rpartition(":")
            client = Redis(host=host, port=int(port))
            try:
                await client.execute_command("CLIENT", "PAUSE", "1500", "WRITE")
                async with anyio.create_task_group() as tg:
                    tg.start_soon(partial(router.publish, "r", b"paused", persist=True))
                    await anyio.sleep(0.1)  # that publish is on the wire, waiting for Redis
                    started = anyio.current_time()
                    recovery = await member.join("r", since=sent[5].id)
                    took = anyio.current_time() - started
            finally:
                await client.execute_command("CLIENT", "UNPAUSE")
                await client.aclose()
            assert recovery.count >= 14 and recovery.complete
            assert took < 0.7, f"the recovery waited {took:.2f}s behind a paused publish"
            reads = await _clients_named(host, int(port), broker.client_name("read"))
            assert reads >= 1, "the history read did not run on a connection of its own"

        async def closed() -> None:
            assert await _clients_named(host, int(port), broker.client_name("read")) == 0

        await eventually(closed, timeout=3)  # closed with the broker
    finally:
        await backend.cleanup()


async def _clients_named(host: str, port: int, name: str) -> int:
    from redis.asyncio import Redis

    client = Redis(host=host, port=port)
    try:
        listing = await client.client_list()
    finally:
        await client.aclose()
    return sum(entry.get("name") == name for entry in listing)


async def test_concurrent_recoveries_of_a_room_share_one_sink_read(tmp_path: Path) -> None:
    """With a sink, the shared read goes on to the sink's pages after the oldest ``since``;
    each recovery cuts its part, and one whose part the shared read cut short (it stops at
    ``max_recover`` rows) reads the rest itself."""
    reads = [0]

    class CountingSink(SQLiteSink):
        async def history(self, room: str, **kwargs: Any) -> list[Envelope]:  # type: ignore[override]
            reads[0] += 1
            return await super().history(room, **kwargs)

    sink = CountingSink(tmp_path / "s.db")
    broker = MemoryBroker(unique_namespace(), recent_size=20)  # the sink holds the rest
    async with _router(broker, sink=sink, max_recover=100) as router:
        sent = [await router.publish("r", b"%d" % i, persist=True) for i in range(300)]
        await sink.write(sent)
        members = [router.member(f"m{i}") for i in range(200)]
        # Most within the last 100, a few further back than max_recover.
        positions = [150 + i % 140 if i % 20 else i % 100 for i in range(200)]
        results: dict[int, tuple[int, bool]] = {}

        async def rejoin(i: int) -> None:
            recovery = await members[i].join("r", since=sent[positions[i]].id)
            results[i] = (recovery.count, recovery.complete)

        async with anyio.create_task_group() as tg:
            for i in range(200):
                tg.start_soon(rejoin, i)
        for i, m in enumerate(members):
            want = [e.id for e in sent[positions[i] + 1 :]][:100]
            assert [e.id for e in await drain(m, settle=0)] == want, i
            # Exactly max_recover rows is reported incomplete (more may follow).
            assert results[i] == (len(want), len(sent) - positions[i] - 1 < 100), i
        # Two shared reads (one on the wire, one gathering) of at most a page each, plus the
        # continuation of those whose part was cut short: far fewer than one per recovery.
        assert reads[0] <= 2 + sum(1 for p in positions if p < 200), reads[0]


def _id_at(ms: int, n: int = 0) -> str:
    h = f"{ms:012x}7{n:03x}8{n:015x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def test_a_scan_goes_on_past_since_for_the_clock_skew() -> None:
    """A cache holds frames in arrival order, ids come from each publisher's clock: a frame
    that arrived before ``since``'s but carries a higher id (its node's clock runs ahead)
    lies further back, and the scan must still return it; it stops only at an id
    ``RECENT_SKEW_MS`` older than ``since``."""
    from roomrouter.brokers._base import RecentScan

    def frame(ident: str) -> bytes:
        return encode_envelope(Envelope(id=ident, room="r", origin="o", ts=0.0, payload=b""))

    t = 1_800_000_000_000
    old = _id_at(t - RECENT_SKEW_MS - 1)  # beyond the allowance: the scan stops here
    ahead = _id_at(t + 500)  # arrived before `since`, from a clock 0.5 s ahead
    since = _id_at(t)
    newer = _id_at(t + 10)
    cache = [frame(old), frame(ahead), frame(since), frame(newer)]  # arrival order
    scan = RecentScan(since, None)
    for f in reversed(cache):
        if not scan.add(f):
            break
    result = scan.result(evicted=True)
    assert scan.reached and not result.truncated
    assert result.frames == cache[1:]  # `ahead` included, `old` not
    # Garbage is skipped and counted, never the end of the scan.
    scan = RecentScan(since, None)
    for f in [frame(newer), b"\xc1", None, frame(ahead), frame(old)]:
        if not scan.add(f):
            break
    assert scan.skipped == 2 and scan.result(evicted=False).frames == [frame(ahead), frame(newer)]
