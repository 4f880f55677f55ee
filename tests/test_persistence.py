"""Persistence: the storage queue, storage workers (competing, crashing), the sink, history and
recovery after reconnect — on every backend that has a storage queue."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import anyio
import pytest

from roomrouter import ConfigurationError, Envelope, RoomRouter, SinkError
from roomrouter.storage import MAX_HISTORY_LIMIT, SQLiteSink, StorageWorker

from .backends import BACKENDS, Backend
from .conftest import TEST_ROUTER_OPTIONS, selected_backends, unique_namespace
from .helpers import drain, eventually, receive_n

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
STORAGE = [n for n in selected_backends() if BACKENDS[n].supports_storage]


@pytest.fixture(params=STORAGE)
async def sbackend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    backend = BACKENDS[request.param](unique_namespace())
    backend.available()
    try:
        yield backend
    finally:
        await backend.cleanup()


class Nodes:
    """Routers and workers of one test, closed at the end."""

    def __init__(self, backend: Backend, stack: AsyncExitStack, sink_path: Path) -> None:
        self.backend = backend
        self.stack = stack
        self.sink_path = sink_path

    def broker(self, **options: Any) -> Any:
        options.setdefault("redelivery_after", self.backend.redelivery_after)
        return self.backend.broker(**options)  # type: ignore[call-arg]

    async def routers(self, count: int, *, sink: bool = True, **options: Any) -> list[RoomRouter]:
        opts = {**TEST_ROUTER_OPTIONS, **self.backend.router_options, **options}
        broker_opts = {k: opts.pop(k) for k in ("recent_size",) if k in opts}
        out = []
        for _ in range(count):
            router = RoomRouter(
                self.broker(**broker_opts),
                namespace=self.backend.namespace,
                sink=SQLiteSink(self.sink_path) if sink else None,
                **opts,
            )
            out.append(await self.stack.enter_async_context(router))
        return out

    async def wait_drained(self, timeout: float = 30) -> None:
        """Wait until the storage queue holds nothing unacknowledged."""
        async with self.broker().storage_consumer(self.backend.namespace, "probe") as probe:

            async def drained() -> None:
                assert await probe.pending() == 0

            await eventually(drained, timeout=timeout, interval=0.1)

    def worker(self, name: str, **options: Any) -> StorageWorker:
        consumer = self.broker().storage_consumer(self.backend.namespace, name)
        return StorageWorker(consumer, SQLiteSink(self.sink_path), **options)


@pytest.fixture
async def nodes(sbackend: Backend, tmp_path: Path) -> AsyncIterator[Nodes]:
    async with AsyncExitStack() as stack:
        yield Nodes(sbackend, stack, tmp_path / "chat.db")


async def _stored(path: Path) -> list[Envelope]:
    async with SQLiteSink(path) as sink:
        out: list[Envelope] = []
        for room in await _rooms(path):
            out.extend(await sink.history(room, after="", limit=10_000))
        return out


async def _count(path: Path) -> int:
    import sqlite3

    try:
        with sqlite3.connect(path) as conn:
            (n,) = conn.execute("SELECT count(*) FROM roomrouter_messages").fetchone()
        conn.close()
    except sqlite3.OperationalError:  # the table is not created yet
        return 0
    return int(n)


async def _rooms(path: Path) -> list[str]:
    import sqlite3

    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT DISTINCT room FROM roomrouter_messages").fetchall()
    conn.close()
    return [r[0] for r in rows]


async def _publish_many(
    routers: Sequence[RoomRouter], rooms: Sequence[str], count: int
) -> list[Envelope]:
    sent: list[Envelope] = []

    async def one_node(router: RoomRouter, n: int) -> None:
        rnd = random.Random(router.node_id)
        for i in range(n):
            sent.append(await router.publish(rnd.choice(rooms), f"{i}".encode(), persist=True))

    async with anyio.create_task_group() as tg:
        for i, router in enumerate(routers):
            tg.start_soon(one_node, router, count // len(routers) + (i < count % len(routers)))
    return sent


async def test_every_persisted_message_is_stored_once_despite_a_crashed_worker(
    nodes: Nodes,
) -> None:
    routers = await nodes.routers(3, sink=False)
    rooms = [f"room-{i}" for i in range(50)]
    members = [routers[i % 3].member(f"m{i}") for i in range(6)]
    for i, m in enumerate(members):  # some rooms hosted on several nodes, most nowhere
        await m.join(rooms[i])
    first, second = nodes.worker("w1", batch_size=200), nodes.worker("w2", batch_size=200)
    async with anyio.create_task_group() as tg:
        crash_scope = anyio.CancelScope()
        tg.start_soon(_run_in, crash_scope, first)
        tg.start_soon(second.run)
        sent = await _publish_many(routers, rooms, 5000)
        # The first worker dies mid-run, cancelled wherever it is (often with a batch in hand).
        # It must have begun first: on Kafka it joins the group after the 5,000 are published.
        await eventually(lambda: _assert(first.stats.received > 0), timeout=30)
        crash_scope.cancel()
        sent += await _publish_many(routers, rooms, 5000)
        restarted = nodes.worker("w1", batch_size=200)
        tg.start_soon(restarted.run)
        await nodes.wait_drained(timeout=60)
        second.stop()
        restarted.stop()
    stored = await _stored(nodes.sink_path)
    assert len(sent) == 10_000
    assert sorted(e.id for e in stored) == sorted(e.id for e in sent)  # each exactly once
    by_room: dict[str, list[str]] = {}
    for e in sent:
        by_room.setdefault(e.room, []).append(e.id)
    async with SQLiteSink(nodes.sink_path) as sink:
        for room, ids in by_room.items():
            history = await sink.history(room, after="", limit=10_000)
            assert [e.id for e in history] == sorted(ids)
    # The crash really happened mid-run (the first worker had work), the other one worked too.
    assert first.stats.received > 0 and second.stats.acked > 0


def _assert(condition: bool) -> None:
    assert condition


async def _run_in(scope: anyio.CancelScope, worker: StorageWorker) -> None:
    with scope:
        await worker.run()


async def test_rejoin_with_since_gets_exactly_the_missed_messages(nodes: Nodes) -> None:
    a, b, c = await nodes.routers(3)
    reader = b.member("reader")
    await reader.join("lecture")
    seen = [await c.publish("lecture", f"before {i}".encode(), persist=True) for i in range(5)]
    got = await receive_n(reader, 5)
    last_seen = got[-1].id
    await reader.close()  # the client's connection drops
    # Ids order messages of *different* nodes only by their clocks (docs/architecture.md,
    # "Recovery"): a reconnect takes far longer than the millisecond this leaves.
    await anyio.sleep(0.002)

    missed = []
    for i in range(100):
        publisher = (a, c)[i % 2]
        missed.append(await publisher.publish("lecture", f"missed {i}".encode(), persist=True))
    # Half of them are written to the sink before the reconnect, half are not (no worker runs
    # meanwhile): the recovery must stitch sink and recent cache together.
    async with SQLiteSink(nodes.sink_path) as sink:
        await sink.write(missed[:50])
    # The live ones below come from another node than some missed ones: keep them in a later
    # millisecond so that id order (the order of recovery) is publish order here too.
    await anyio.sleep(0.002)

    again = b.member("reader")
    live_during = []

    async def publish_while_recovering() -> None:
        for i in range(20):
            live_during.append(await a.publish("lecture", f"live {i}".encode(), persist=True))

    async with anyio.create_task_group() as tg:
        tg.start_soon(publish_while_recovering)
        recovery = await again.join("lecture", since=last_seen)
    assert recovery.complete
    assert recovery.count >= 100
    live_after = [await c.publish("lecture", b"after", persist=True) for _ in range(5)]
    received = await receive_n(again, 100 + 20 + 5)
    ids = [e.id for e in received]
    assert len(ids) == len(set(ids)), "duplicate delivery"
    expected = {e.id for e in missed + live_during + live_after}
    assert set(ids) == expected
    assert not {e.id for e in seen} & set(ids)
    # The missed ones come first, in id order; per publisher the order holds throughout.
    assert ids[:100] == sorted(e.id for e in missed)
    for origin in {e.origin for e in received}:
        seq = [e.id for e in received if e.origin == origin]
        assert seq == sorted(seq)
    assert await drain(again) == []


async def test_a_window_the_cache_no_longer_holds_is_reported(nodes: Nodes) -> None:
    a, b = await nodes.routers(2, recent_size=20)
    m = b.member("m")
    await m.join("R")
    first = await a.publish("R", b"first", persist=True)
    await m.close()
    for i in range(50):
        await a.publish("R", f"{i}".encode(), persist=True)
    # No worker ran, and the cache kept only the last 20: the window is not provably complete.
    again = b.member("m")
    recovery = await again.join("R", since=first.id)
    assert not recovery.complete
    assert recovery.count == 20
    await again.close()
    # Read without joining, from any node: the same window, the same verdict.
    for router in (a, b):
        envelopes, complete = await router.recover("R", first.id)
        assert not complete
        assert [e.payload for e in envelopes] == [f"{i}".encode() for i in range(30, 50)]

    # Once a worker stored everything, the same request is complete.
    worker = nodes.worker("w")
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        await nodes.wait_drained()
        worker.stop()
    third = b.member("m")
    recovery = await third.join("R", since=first.id)
    assert recovery.complete and recovery.count == 50
    envelopes, complete = await a.recover("R", first.id)
    assert complete and [e.payload for e in envelopes] == [f"{i}".encode() for i in range(50)]
    assert [e.payload for e in await receive_n(third, 50)] == [f"{i}".encode() for i in range(50)]


async def test_join_with_history_then_live(nodes: Nodes) -> None:
    a, b = await nodes.routers(2)
    for i in range(30):
        await a.publish("R", f"{i}".encode(), persist=True)
    m = b.member("m")
    recovery = await m.join("R", history=10)
    assert recovery.count == 10
    await a.publish("R", b"live", persist=False)
    got = await receive_n(m, 11)
    assert [e.payload for e in got] == [f"{i}".encode() for i in range(20, 30)] + [b"live"]
    page = await b.history("R", limit=5)
    assert [e.payload for e in page] == [f"{i}".encode() for i in range(25, 30)]
    older = await b.history("R", before=page[0].id, limit=5)
    assert [e.payload for e in older] == [f"{i}".encode() for i in range(20, 25)]
    newer = await b.history("R", after=older[-1].id, limit=3)
    assert [e.payload for e in newer] == [b"25", b"26", b"27"]


async def test_persisted_publish_to_a_local_room_goes_to_storage_only(nodes: Nodes) -> None:
    a, b = await nodes.routers(2)
    local = a.member("local")
    await local.join("mine")
    before_b = b.stats()["broker_received"]
    await a.publish("mine", b"keep me", persist=True)
    assert (await local.receive()).payload == b"keep me"
    assert a.stats()["persisted"] == 1 and a.stats()["bypassed_publishes"] == 1
    assert b.stats()["broker_received"] == before_b
    consumer = nodes.broker().storage_consumer(nodes.backend.namespace, "probe")
    async with consumer:
        assert await consumer.pending() == 1


async def test_worker_retries_a_failing_sink_and_loses_nothing(nodes: Nodes) -> None:
    class FlakySink(SQLiteSink):
        """A real SQLite sink whose first writes fail, like a database that is restarting."""

        failures = 3

        async def write(self, envelopes: Sequence[Envelope]) -> int:
            if self.failures:
                self.failures -= 1
                raise SinkError("database is restarting")
            return await super().write(envelopes)

    [a] = await nodes.routers(1, sink=False)
    sent = [await a.publish("R", f"{i}".encode(), persist=True) for i in range(100)]
    consumer = nodes.broker().storage_consumer(nodes.backend.namespace, "w")
    worker = StorageWorker(consumer, FlakySink(nodes.sink_path), max_backoff=0.2)
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        await nodes.wait_drained()
        worker.stop()
    assert worker.stats.sink_errors == 3
    assert sorted(e.id for e in await _stored(nodes.sink_path)) == sorted(e.id for e in sent)


async def test_history_without_persistence_is_a_configuration_error(tmp_path: Path) -> None:
    from tests.backends import MemoryBackend

    class NoStorage(MemoryBackend):
        pass

    from roomrouter.brokers.memory import MemoryBroker

    class Plain(MemoryBroker):
        supports_storage = False

    async with RoomRouter(Plain(unique_namespace()), linger=0) as r:
        with pytest.raises(ConfigurationError):
            await r.history("R")
        with pytest.raises(ConfigurationError):
            await r.member("m").join("R", since="0190a4c3-7b1e-7c3d-8e4f-0123456789ab")
        with pytest.raises(ConfigurationError):
            await r.recover("R", "0190a4c3-7b1e-7c3d-8e4f-0123456789ab")
        with pytest.raises(ConfigurationError):
            await r.publish("R", b"x", persist=True)
        with pytest.raises(ConfigurationError):
            await r.publish("R", b"x", headers={"k": "nul\x00"})
    assert NoStorage  # keeps the subclass honest for readers: memory normally has storage


@pytest.mark.parametrize("sink", [False, True])
async def test_history_takes_the_limits_a_sink_takes(tmp_path: Path, sink: bool) -> None:
    # One bound for RoomRouter.history and Sink.history, with a sink or the cache alone.
    from roomrouter.brokers.memory import MemoryBroker

    store = SQLiteSink(tmp_path / "history.db") if sink else None
    async with RoomRouter(MemoryBroker(unique_namespace()), sink=store, linger=0) as r:
        sent = await r.publish("R", b"x", persist=True)
        assert [e.id for e in await r.history("R", limit=MAX_HISTORY_LIMIT)] == [sent.id]
        for limit in (0, MAX_HISTORY_LIMIT + 1):
            with pytest.raises(ConfigurationError, match="limit must be between 1 and"):
                await r.history("R", limit=limit)
        # Wrong types: the same clear error with or without a sink (True was one message
        # without a sink, "5" a TypeError).
        for wrong in (True, 2.0, "5", None):
            with pytest.raises(ConfigurationError, match="limit must be an int"):
                await r.history("R", limit=wrong)  # type: ignore[arg-type]
        member = r.member("m")
        for wrong in (True, 2.5, "3", -1, 10**9):
            with pytest.raises(ConfigurationError, match="history must be an int between"):
                await member.join("R", history=wrong)  # type: ignore[arg-type]
        assert member.rooms == frozenset()


async def test_a_since_that_is_not_a_message_id_is_refused(nodes: Nodes) -> None:
    # Ids compare as strings: "zzz" would be after every id, recover nothing and call that
    # complete. Refused instead, and the member is not left in the room.
    (a,) = await nodes.routers(1)
    await a.publish("R", b"stored", persist=True)
    member = a.member("m")
    for bad in ("zzz", "", "0190A4C3-7B1E-7C3D-8E4F-0123456789AB", 5, b"x"):
        with pytest.raises(ConfigurationError, match="message id"):
            await member.join("R", since=bad)  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError, match="message id"):
            await a.recover("R", bad)  # type: ignore[arg-type]
    assert member.rooms == frozenset()
    assert a.local_rooms == frozenset()
    await member.join("R", since="00000000-0000-7000-8000-000000000000")  # before everything
    assert [e.payload for e in await receive_n(member, 1)] == [b"stored"]


@pytest.fixture(params=[n for n in STORAGE if BACKENDS[n].url_for_process])
async def process_backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    backend = BACKENDS[request.param](unique_namespace())
    backend.available()
    try:
        yield backend
    finally:
        await backend.cleanup()


@pytest.mark.serial  # 10,000 persisted publishes and two worker processes: a load run
async def test_sigkilled_worker_process_loses_nothing(
    process_backend: Backend, tmp_path: Path
) -> None:
    """The issue's end-to-end run: 10,000 persisted messages over 50 rooms from 3 nodes, two
    `roomrouter worker` processes into one sink, one killed with SIGKILL mid-run and
    restarted; the sink ends with exactly one row per message."""
    backend = process_backend
    sink_path = tmp_path / "e2e.db"
    url = backend.process_url(redelivery_after=max(backend.redelivery_after, 1))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}

    def start_worker(name: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "roomrouter.cli", "worker", "--broker", url,
             "--namespace", backend.namespace, "--sink", f"sqlite:///{sink_path}",
             "--name", name, "--batch-size", "200", "--max-delay", "0.05"],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
        )  # fmt: skip

    workers = [start_worker("w1"), start_worker("w2")]
    try:
        async with AsyncExitStack() as stack:
            opts = {**TEST_ROUTER_OPTIONS, **backend.router_options}
            routers = [
                await stack.enter_async_context(
                    RoomRouter(backend.broker(), namespace=backend.namespace, **opts)
                )
                for _ in range(3)
            ]
            rooms = [f"room-{i}" for i in range(50)]
            sent = await _publish_many(routers, rooms, 5000)

            async def workers_busy() -> None:
                assert sink_path.exists() and await _count(sink_path) > 0

            await eventually(workers_busy, timeout=30)  # kill it mid-run, not before it began
            workers[0].send_signal(signal.SIGKILL)
            workers[0].wait(timeout=10)
            sent += await _publish_many(routers, rooms, 5000)
            workers[0] = start_worker("w1")
            probe = backend.broker().storage_consumer(backend.namespace, "probe")  # type: ignore[call-arg]
            async with probe:

                async def drained() -> None:
                    assert await probe.pending() == 0

                await eventually(drained, timeout=90, interval=0.25)
    finally:
        for w in workers:
            w.send_signal(signal.SIGTERM)
        for w in workers:
            try:
                w.wait(timeout=10)
            except subprocess.TimeoutExpired:
                w.kill()
                w.wait()
    stored = await _stored(sink_path)
    missing = {e.id for e in sent} - {e.id for e in stored}
    assert not missing, await _explain_missing(backend, missing)
    assert len(stored) == 10_000
    assert sorted(e.id for e in stored) == sorted(e.id for e in sent)


async def _explain_missing(backend: Backend, missing: set[str]) -> str:
    """Which sent envelopes the sink lacks and, on Kafka, whether the topic holds them: a
    frame in the topic but not in the sink was lost by the workers, one not there by the
    publisher or the broker."""
    found = ""
    if backend.name == "kafka":
        from aiokafka import AIOKafkaConsumer, TopicPartition

        from roomrouter._envelope import decode_envelope
        from roomrouter.brokers.kafka import KafkaBroker

        topic = KafkaBroker.topic_names(backend.namespace, "rrtest")[0]
        consumer = AIOKafkaConsumer(
            bootstrap_servers=backend.bootstrap,  # type: ignore[attr-defined]
            enable_auto_commit=False, auto_offset_reset="earliest",
        )  # fmt: skip
        await consumer.start()
        try:
            parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
            consumer.assign(parts)
            ends = await consumer.end_offsets(parts)
            hits = []
            with anyio.move_on_after(30):
                while any(await consumer.position(tp) < ends[tp] for tp in parts):
                    for tp, records in (await consumer.getmany(timeout_ms=500)).items():
                        for record in records:
                            try:
                                envelope = decode_envelope(record.value)
                            except Exception:
                                continue
                            if envelope.id in missing:
                                hits.append(f"{envelope.id} at {tp.partition}:{record.offset} "
                                            f"headers={record.headers}")  # fmt: skip
            found = f"; in the topic: {hits or 'none of them'}"
        finally:
            await consumer.stop()
    return f"{len(missing)} sent envelope(s) not in the sink: {sorted(missing)}{found}"


async def test_live_copies_of_recovered_messages_are_not_delivered_twice(tmp_path: Path) -> None:
    """The history read can overtake the live path: a message recovered from history may
    still arrive live afterwards. The member receives it once, and later ones normally."""
    from roomrouter.brokers.memory import MemoryBroker

    class LateLive(MemoryBroker):
        """A real memory broker whose live frames to this node wait while ``late`` is set."""

        late = False
        waiting: list[tuple[str | None, bytes]]  # (room, frame); room None: direct

        def _deliver_data(self, room: str, frame: bytes) -> None:
            if self.late:
                self.waiting.append((room, frame))
            else:
                super()._deliver_data(room, frame)

        def _deliver_direct(self, frame: bytes) -> None:
            if self.late:
                self.waiting.append((None, frame))
            else:
                super()._deliver_direct(frame)

        def catch_up(self) -> None:
            self.late = False
            for room, frame in self.waiting:
                if room is None:
                    super()._deliver_direct(frame)
                else:
                    super()._deliver_data(room, frame)
            self.waiting.clear()

    hub = f"late-{unique_namespace()}"
    slow = LateLive(hub)
    slow.waiting = []
    opts = {**TEST_ROUTER_OPTIONS}
    async with (
        RoomRouter(MemoryBroker(hub), namespace="ns", **opts) as a,
        RoomRouter(slow, namespace="ns", **opts) as b,
    ):
        first = b.member("first")
        await first.join("R")
        seen = await a.publish("R", b"seen", persist=True)
        await receive_n(first, 1)
        slow.late = True  # node b's live path falls behind
        late = [await a.publish("R", f"late {i}".encode(), persist=True) for i in range(3)]
        again = b.member("again")
        recovery = await again.join("R", since=seen.id)
        assert recovery.count == 3 and recovery.complete
        slow.catch_up()  # the live copies of the three recovered ones arrive now
        after = await a.publish("R", b"after", persist=True)
        got = await drain(again)
        assert [e.id for e in got] == [e.id for e in late] + [after.id]
        assert [e.id for e in await drain(first)] == [e.id for e in late] + [after.id]
        assert b.stats()["dropped_duplicate"] == 3
