"""Storage-path faults (issue 10): a storage queue the broker lost, poison entries, envelopes the
sink refuses, and stopping a worker whatever it is doing — on every backend with a storage queue.

Sharded Redis is left out: its storage queue is the same stream and consumer as plain Redis.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from roomrouter import Envelope, RoomRouter, SinkError
from roomrouter._envelope import encode_envelope
from roomrouter.brokers.redis import store_key
from roomrouter.storage import SQLiteSink, StorageWorker
from roomrouter.storage._base import Sink

from .backends import BACKENDS, Backend, require_tcp
from .conftest import TEST_ROUTER_OPTIONS, selected_backends, unique_namespace
from .helpers import eventually
from .storage.conftest import MYSQL_URL, PG_DSN, drop_mysql_tables, drop_postgres_tables
from .test_redis import PrivateRedis

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
FAULT_BACKENDS = [
    n for n in selected_backends() if BACKENDS[n].supports_storage and n != "redis-sharded"
]


@pytest.fixture(params=FAULT_BACKENDS)
async def sbackend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    backend = BACKENDS[request.param](unique_namespace())
    backend.available()
    try:
        yield backend
    finally:
        await backend.cleanup()


@pytest.fixture
async def pg_prefix() -> AsyncIterator[str]:
    require_tcp("127.0.0.1", 5432, "PostgreSQL")
    prefix = f"rrtest_{uuid.uuid4().hex[:16]}"
    try:
        yield prefix
    finally:
        await drop_postgres_tables(prefix)


def _broker(backend: Backend, **options: Any) -> Any:
    options.setdefault("redelivery_after", backend.redelivery_after)
    return backend.broker(**options)  # type: ignore[call-arg]


def _worker(backend: Backend, sink: Sink, name: str = "w", **options: Any) -> StorageWorker:
    consumer = _broker(backend).storage_consumer(backend.namespace, name)
    options.setdefault("max_delay", 0.05)
    options.setdefault("max_backoff", 0.2)
    return StorageWorker(consumer, sink, name=name, **options)


async def _router(stack: AsyncExitStack, backend: Backend) -> RoomRouter:
    opts = {**TEST_ROUTER_OPTIONS, **backend.router_options}
    router = RoomRouter(_broker(backend), namespace=backend.namespace, **opts)
    return await stack.enter_async_context(router)


async def _pending(backend: Backend) -> int:
    async with _broker(backend).storage_consumer(backend.namespace, "probe") as probe:
        return await probe.pending()


async def _wait_drained(backend: Backend, timeout: float = 30) -> None:
    async with _broker(backend).storage_consumer(backend.namespace, "probe") as probe:

        async def drained() -> None:
            assert await probe.pending() == 0

        await eventually(drained, timeout=timeout, interval=0.1)


async def _inject(backend: Backend, frames: Sequence[bytes], *, no_field: int = 0) -> None:
    """Put raw ``frames`` into the namespace's storage queue behind the router's back, as a
    forger, a bug in another producer or a hand-made XADD would (``no_field``: Redis entries
    without the frame field)."""
    ns = backend.namespace
    if backend.name == "memory":
        from roomrouter.brokers.memory import MemoryHub

        for frame in frames:
            MemoryHub.named(f"test-{ns}").store(ns).put(frame)
    elif backend.name in ("redis", "redis-cluster"):
        from redis.asyncio import Redis
        from redis.asyncio.cluster import RedisCluster

        client: Redis | RedisCluster = (
            Redis(host="127.0.0.1", port=6379)
            if backend.name == "redis"
            else RedisCluster(host="127.0.0.1", port=backend.port)  # type: ignore[attr-defined]
        )
        try:
            for frame in frames:
                await client.xadd(store_key(ns), {b"f": frame})
            for i in range(no_field):
                await client.xadd(store_key(ns), {b"body": b"hand-made %d" % i})
        finally:
            await client.aclose()
    elif backend.name == "rabbitmq":
        import aiormq
        from pamqp.commands import Basic

        conn = await aiormq.connect("amqp://guest:guest@127.0.0.1:5672/")
        try:
            channel = await conn.channel()
            for frame in frames:
                await channel.basic_publish(
                    frame,
                    exchange=f"rr.{ns}.data",
                    routing_key="~store",
                    properties=Basic.Properties(delivery_mode=2),
                )
        finally:
            await conn.close()
    elif backend.name == "kafka":
        from aiokafka import AIOKafkaProducer

        from roomrouter.brokers.kafka._common import STORED_HEADERS, names

        topic = names(ns, backend.topic_prefix)[0]  # type: ignore[attr-defined]
        producer = AIOKafkaProducer(bootstrap_servers=backend.bootstrap)  # type: ignore[attr-defined]
        await producer.start()
        try:
            for frame in frames:
                await producer.send_and_wait(topic, frame, key=b"R", headers=STORED_HEADERS)
        finally:
            await producer.stop()
    elif hasattr(backend, "inject_stored"):  # a backend that says how (tests/backends.py)
        await backend.inject_stored(frames)
    else:  # pragma: no cover - a new backend must say how to forge a frame
        raise AssertionError(f"no injector for {backend.name}")


def _forged(room: str = "R", origin: str = "forger") -> bytes:
    """A well-formed envelope that a router would never have published."""
    envelope = Envelope(
        id=f"0190-forged-{uuid.uuid4().hex}", room=room, origin=origin, ts=time.time(),
        payload=b"forged", persist=True,
    )  # fmt: skip
    return encode_envelope(envelope)


async def _stored_ids(sink_path: Path) -> list[str]:
    import sqlite3

    try:
        with sqlite3.connect(sink_path) as conn:
            rows = conn.execute("SELECT id FROM roomrouter_messages").fetchall()
        conn.close()
    except sqlite3.OperationalError as exc:  # no worker has started the sink yet
        raise AssertionError(f"no table yet: {exc}") from exc
    return [r[0] for r in rows]


async def _run_until(worker: StorageWorker, check: Any, timeout: float = 30) -> None:
    """Run ``worker`` until ``check`` passes; fail if it dies or the check never passes."""
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        await eventually(check, timeout=timeout, interval=0.1)
        worker.stop()


# --- poison entries ---------------------------------------------------------------------------


async def test_poison_entries_are_dead_lettered_and_never_block_the_rest(
    sbackend: Backend, tmp_path: Path
) -> None:
    """Undecodable frames, frames of the wrong shape and (Redis) entries without the frame
    field go to the dead-letter table with their reason; everything around them is stored,
    by this worker and by the next one (which would reclaim a poison entry left pending)."""
    backend = sbackend
    sink_path = tmp_path / "s.db"
    poison = [b"\xc1 not msgpack", msgspec.msgpack.encode([1, "wrong", "shape"]), b""]
    no_field = 2 if backend.name == "redis" else 0
    async with AsyncExitStack() as stack:
        router = await _router(stack, backend)
        sent = [await router.publish("R", b"%d" % i, persist=True) for i in range(20)]
        await _inject(backend, poison, no_field=no_field)
        sent += [await router.publish("R", b"%d" % i, persist=True) for i in range(20, 40)]

        worker = _worker(backend, SQLiteSink(sink_path), batch_size=8)

        async def all_stored() -> None:
            assert sorted(await _stored_ids(sink_path)) == sorted(e.id for e in sent)
            assert await _pending(backend) == 0

        await _run_until(worker, all_stored)
        # A second worker finds nothing left to choke on.
        sent += [await router.publish("R", b"after", persist=True)]
        await _run_until(_worker(backend, SQLiteSink(sink_path), name="w2"), all_stored)

    assert worker.stats.dead_lettered == len(poison) + no_field
    assert worker.stats.dropped_decode == len(poison)
    async with SQLiteSink(sink_path) as sink:
        letters = await sink.dead_letters()
    assert sorted(d.frame for d in letters if d.frame in poison) == sorted(poison)
    assert all(d.reason and d.worker == "w" and d.at > 0 for d in letters)
    assert sum("no frame field" in d.reason for d in letters) == no_field


# --- envelopes the sink refuses -----------------------------------------------------------


@pytest.fixture(params=["postgresql", "mysql"])
async def sql_store(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Any, bytes]]:
    """A factory of sinks on one fresh SQL store, and a forged frame that store refuses: NUL
    in ``origin`` for PostgreSQL; for MySQL (which keeps NUL) a room name within the router's
    limit but longer than the sink's column (error 1406, data too long)."""
    prefix = f"rrtest_{uuid.uuid4().hex[:16]}"
    if request.param == "postgresql":
        from roomrouter.storage import PostgresSink

        require_tcp("127.0.0.1", 5432, "PostgreSQL")
        try:
            yield (
                (lambda: PostgresSink(PG_DSN, table_prefix=prefix)),
                _forged(origin="evil\x00node"),
            )
        finally:
            await drop_postgres_tables(prefix)
    else:
        from roomrouter.storage import MySQLSink

        require_tcp("127.0.0.1", 3306, "MariaDB")
        try:
            yield (
                (lambda: MySQLSink(MYSQL_URL, table_prefix=prefix)),
                _forged(room="\U0001f389" * 701),
            )
        finally:
            await drop_mysql_tables(prefix)


async def test_envelopes_the_sink_refuses_are_dead_lettered_and_the_rest_stored(
    sbackend: Backend, sql_store: tuple[Any, bytes]
) -> None:
    """A forged envelope the database refuses makes it refuse its whole batch; the batch is
    split until the bad row is alone, so every good one is stored. NUL in ``room`` is refused
    by the worker's own check before the sink."""
    backend = sbackend
    make_sink, refused = sql_store
    bad = [refused, _forged(room="evil\x00room")]
    async with AsyncExitStack() as stack:
        router = await _router(stack, backend)
        sent = [await router.publish("R", b"%d" % i, persist=True) for i in range(30)]
        await _inject(backend, bad)
        sent += [await router.publish("R", b"%d" % i, persist=True) for i in range(30, 60)]
        worker = _worker(backend, make_sink(), batch_size=64, max_delay=0.3)
        reader = await stack.enter_async_context(make_sink())

        async def all_stored() -> None:
            assert await reader.count() == len(sent)
            assert await _pending(backend) == 0

        await _run_until(worker, all_stored)
        stored = await reader.history("R", after="", limit=1000)
        assert [e.id for e in stored] == sorted(e.id for e in sent)
        letters = await reader.dead_letters()
    assert sorted(d.frame for d in letters) == sorted(bad)
    reasons = {d.frame: d.reason for d in letters}
    assert "refused by the sink" in reasons[bad[0]] and "\x00" not in reasons[bad[0]]
    assert "control character" in reasons[bad[1]]
    assert worker.stats.dead_lettered == 2 and worker.stats.refused == 1


# --- stopping -------------------------------------------------------------------------------


class DownSink(SQLiteSink):
    """A real SQLite sink whose writes fail once ``down`` is set, like a database that went
    away; with ``hang`` they never return instead."""

    down = False
    hang = False

    async def write(self, envelopes: Sequence[Envelope]) -> int:
        if self.hang:
            await anyio.sleep_forever()
        if self.down:
            raise SinkError("connection refused (the database is down)")
        return await super().write(envelopes)


@pytest.mark.parametrize("hang", [False, True], ids=["failing", "hanging"])
async def test_stop_returns_in_bounded_time_whatever_the_sink_does(
    sbackend: Backend, tmp_path: Path, hang: bool
) -> None:
    """stop() while the sink fails (or hangs) returns within ``stop_timeout``; the batch in
    hand is not acknowledged, so another worker stores it later."""
    backend = sbackend
    sink_path = tmp_path / "s.db"
    async with AsyncExitStack() as stack:
        router = await _router(stack, backend)
        sent = [await router.publish("R", b"%d" % i, persist=True) for i in range(30)]
        sink = DownSink(sink_path)
        sink.down, sink.hang = True, hang
        worker = _worker(backend, sink, stop_timeout=1.0, max_backoff=5.0)
        finished = anyio.Event()

        async def run() -> None:
            await worker.run()
            finished.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            await eventually(lambda: _check(worker.stats.received >= 30), timeout=30)
            await anyio.sleep(0.3)  # it is retrying (or stuck) now
            worker.stop()
            started = anyio.current_time()
            with anyio.fail_after(10):
                await finished.wait()
        elapsed = anyio.current_time() - started
        assert elapsed < 1.0 + 2.5, f"stop took {elapsed:.1f}s"
        assert worker.stats.acked == 0
        # Nothing was lost: a healthy worker stores all of it.
        again = _worker(backend, SQLiteSink(sink_path), name="w2")

        async def all_stored() -> None:
            assert sorted(await _stored_ids(sink_path)) == sorted(e.id for e in sent)

        await _run_until(again, all_stored, timeout=40)


def _check(condition: bool) -> None:
    assert condition


class _Proxy:
    """A TCP forwarder on a free loopback port to a real server, which the test can cut off:
    the server is "down" for whoever connects through it."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.port = 0
        self.scope = anyio.CancelScope()

    async def run(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        with self.scope:
            listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
            self.port = listener.extra(anyio.abc.SocketAttribute.local_port)
            task_status.started()
            async with listener:
                await listener.serve(self._pipe)

    async def _pipe(self, client: anyio.abc.SocketStream) -> None:
        async with client, await anyio.connect_tcp("127.0.0.1", self.target) as server:

            async def copy(a: anyio.abc.SocketStream, b: anyio.abc.SocketStream) -> None:
                try:
                    async for chunk in a:
                        await b.send(chunk)
                except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                    pass
                tg.cancel_scope.cancel()

            async with anyio.create_task_group() as tg:
                tg.start_soon(copy, client, server)
                tg.start_soon(copy, server, client)


@pytest.mark.parametrize("database", ["postgresql", "mysql"])
async def test_worker_process_exits_on_sigterm_while_the_sink_is_down(
    database: str, tmp_path: Path
) -> None:
    """`roomrouter worker` on PostgreSQL (MySQL) through a proxy; the proxy is cut (the
    database is gone for the worker), frames keep coming, SIGTERM: the process exits within
    its stop timeout, and what it held is stored by the next worker."""
    from roomrouter.storage import MySQLSink, PostgresSink

    require_tcp("127.0.0.1", 6379, "Redis")
    prefix = f"rrtest_{uuid.uuid4().hex[:16]}"
    if database == "postgresql":
        require_tcp("127.0.0.1", 5432, "PostgreSQL")
        port, url = 5432, "postgresql://postgres@127.0.0.1:{port}/test?table_prefix={prefix}"

        def direct_sink() -> Sink:
            return PostgresSink(PG_DSN, table_prefix=prefix)
    else:
        require_tcp("127.0.0.1", 3306, "MariaDB")
        port, url = 3306, "mysql://root@127.0.0.1:{port}/test?table_prefix={prefix}"

        def direct_sink() -> Sink:
            return MySQLSink(MYSQL_URL, table_prefix=prefix)

    try:
        await _sigterm_while_the_sink_is_down(tmp_path, port, url, prefix, direct_sink)
    finally:
        with anyio.CancelScope(shield=True):
            if database == "postgresql":
                await drop_postgres_tables(prefix)
            else:
                await drop_mysql_tables(prefix)


async def _sigterm_while_the_sink_is_down(
    tmp_path: Path, port: int, url: str, prefix: str, direct_sink: Any
) -> None:
    from roomrouter.brokers.redis import RedisBroker

    ns = unique_namespace()
    log_path = tmp_path / "worker.log"
    async with AsyncExitStack() as stack:
        tg = await stack.enter_async_context(anyio.create_task_group())
        proxy = _Proxy(port)
        await tg.start(proxy.run)
        dsn = url.format(port=proxy.port, prefix=prefix)
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        with log_path.open("wb") as log_file:
            proc = subprocess.Popen(
                [sys.executable, "-m", "roomrouter.cli", "-v", "worker", "--broker",
                 "redis://127.0.0.1:6379/0?redelivery_after=1", "--namespace", ns,
                 "--sink", dsn, "--name", "w1", "--max-delay", "0.05"],
                cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT,
            )  # fmt: skip
        try:
            router = RoomRouter(
                RedisBroker(host="127.0.0.1", port=6379, redelivery_after=1),
                namespace=ns, **TEST_ROUTER_OPTIONS,
            )  # fmt: skip
            router = await stack.enter_async_context(router)
            reader = await stack.enter_async_context(direct_sink())
            first = [await router.publish("R", b"%d" % i, persist=True) for i in range(10)]

            async def stored_first() -> None:
                assert await reader.count() == 10

            await eventually(stored_first, timeout=30, interval=0.1)
            proxy.scope.cancel()  # the database is gone for the worker
            later = [await router.publish("R", b"%d" % i, persist=True) for i in range(10)]

            async def retrying() -> None:
                assert b"sink write of" in log_path.read_bytes()

            await eventually(retrying, timeout=30, interval=0.1)
            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                await anyio.to_thread.run_sync(proc.wait, 20)
            elapsed = time.monotonic() - started
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert elapsed < 5.0 + 3.0, f"SIGTERM took {elapsed:.1f}s\n{log_path.read_text()}"
        assert proc.returncode == 0, log_path.read_text()
        consumer = RedisBroker(host="127.0.0.1", port=6379, redelivery_after=1).storage_consumer(
            ns, "w2"
        )
        again = StorageWorker(consumer, direct_sink(), name="w2")

        async def all_stored() -> None:
            assert await reader.count() == 20

        await _run_until(again, all_stored)
        ids = [e.id for e in await reader.history("R", after="", limit=100)]
        assert ids == sorted(e.id for e in first + later)
        tg.cancel_scope.cancel()
    await BACKENDS["redis"](ns).cleanup()


# --- the storage queue lost by the broker -------------------------------------------------


def _redis_worker(port: int, ns: str, sink_path: Path, name: str) -> StorageWorker:
    from roomrouter.brokers.redis import RedisBroker

    broker = RedisBroker(host="127.0.0.1", port=port, redelivery_after=0.5, operation_timeout=2)
    return StorageWorker(
        broker.storage_consumer(ns, name), SQLiteSink(sink_path), name=name,
        max_delay=0.05, max_backoff=0.2,
    )  # fmt: skip


@pytest.mark.parametrize("how", ["flushall", "restart", "del"])
async def test_redis_storage_stream_lost_is_recreated_counted_and_reported(
    private_redis: PrivateRedis, tmp_path: Path, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    """The stream (and its group) vanish under two running workers: they recreate it, go on
    storing what is published afterwards, and the loss is counted once and logged once as an
    error that says what happened. Frames held by the lost stream are reported, not stored."""
    from redis.asyncio import Redis

    from roomrouter.brokers.redis import RedisBroker

    ns = unique_namespace()
    sink_path = tmp_path / "s.db"
    port = private_redis.port
    caplog.set_level(logging.ERROR, logger="roomrouter.worker")
    workers = [_redis_worker(port, ns, sink_path, f"w{i}") for i in (1, 2)]
    opts = {**TEST_ROUTER_OPTIONS}
    broker = RedisBroker(host="127.0.0.1", port=port, max_backoff=0.2, operation_timeout=2)
    router = RoomRouter(broker, namespace=ns, **opts)  # type: ignore[arg-type]
    async with router, anyio.create_task_group() as tg:
        for w in workers:
            tg.start_soon(w.run)
        before = [await router.publish("R", b"%d" % i, persist=True) for i in range(20)]

        async def stored(envelopes: list[Envelope]) -> None:
            assert set(e.id for e in envelopes) <= set(await _stored_ids(sink_path))

        await eventually(lambda: stored(before), timeout=10)
        if how == "restart":
            private_redis.stop()
            private_redis.start()  # no persistence: it comes back empty
        else:
            client = Redis(host="127.0.0.1", port=port)
            if how == "flushall":
                await client.flushall()
            else:
                await client.delete(store_key(ns))
            await client.aclose()
        after: list[Envelope] = []

        async def publish_after() -> None:
            with anyio.fail_after(10):
                while True:  # the node's publisher reconnects after a restart
                    try:
                        after.append(await router.publish("R", b"after", persist=True))
                        return
                    except Exception:
                        await anyio.sleep(0.1)

        for _ in range(20):
            await publish_after()
        await eventually(lambda: stored(after), timeout=15)
        for w in workers:
            w.stop()
    assert sum(w.stats.queue_recreated for w in workers) == 1
    errors = [r for r in caplog.records if "vanished" in r.getMessage()]
    assert len(errors) == 1 and errors[0].levelno == logging.ERROR
    assert "NOGROUP" in errors[0].getMessage() and "lost" in errors[0].getMessage()
    assert sorted(await _stored_ids(sink_path)) == sorted(e.id for e in before + after)


@pytest.mark.parametrize("late_starter", [False, True], ids=["alone", "late-starter"])
async def test_redis_frames_in_the_lost_stream_are_the_reported_window(
    private_redis: PrivateRedis, tmp_path: Path, late_starter: bool
) -> None:
    """Frames waiting in the stream (the worker's sink is down, it holds one batch) are
    flushed: they are gone, and the worker says so once its sink is back, instead of retrying
    NOGROUP forever; what it held and what came after the flush is stored. With a consumer
    that starts after the flush (and so recreates the group before the worker sees NOGROUP),
    the loss is still reported, from the group's changed epoch."""
    from redis.asyncio import Redis

    from roomrouter.brokers.redis import RedisBroker

    ns = unique_namespace()
    sink_path = tmp_path / "s.db"
    port = private_redis.port
    broker = RedisBroker(host="127.0.0.1", port=port)
    sink = DownSink(sink_path)
    consumer = RedisBroker(host="127.0.0.1", port=port).storage_consumer(ns, "w1")
    worker = StorageWorker(consumer, sink, batch_size=2, max_delay=0.05, max_backoff=0.1)
    router = RoomRouter(broker, namespace=ns, **TEST_ROUTER_OPTIONS)  # type: ignore[arg-type]
    async with router, anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        await anyio.sleep(0.3)  # the group exists now
        sink.down = True
        waiting = [await router.publish("R", b"lost", persist=True) for _ in range(5)]
        await eventually(lambda: _check(worker.stats.sink_errors > 0), timeout=10)
        client = Redis(host="127.0.0.1", port=port)
        await client.flushall()
        await client.aclose()
        if late_starter:
            late = RedisBroker(host="127.0.0.1", port=port).storage_consumer(ns, "late")
            async with late:
                assert await late.pending() == 0  # it recreated the group, and saw no loss
        kept = [await router.publish("R", b"kept", persist=True) for _ in range(5)]
        sink.down = False

        async def kept_stored() -> None:
            assert {e.id for e in kept} <= set(await _stored_ids(sink_path))

        await eventually(kept_stored, timeout=15)
        worker.stop()
    assert worker.stats.queue_recreated == 1
    stored = set(await _stored_ids(sink_path))
    held = {e.id for e in waiting[:2]}  # the batch the worker held through the flush
    assert stored == held | {e.id for e in kept}


async def test_rabbitmq_storage_queue_deleted_is_redeclared_counted_and_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import aiormq

    backend = BACKENDS["rabbitmq"](unique_namespace())
    if "rabbitmq" not in selected_backends():
        pytest.skip("rabbitmq not selected")
    backend.available()
    caplog.set_level(logging.ERROR, logger="roomrouter.worker")
    sink_path = tmp_path / "s.db"
    try:
        async with AsyncExitStack() as stack:
            router = await _router(stack, backend)
            before = [await router.publish("R", b"%d" % i, persist=True) for i in range(10)]
            worker = _worker(backend, SQLiteSink(sink_path))
            async with anyio.create_task_group() as tg:
                tg.start_soon(worker.run)

                async def stored(envelopes: list[Envelope]) -> None:
                    assert {e.id for e in envelopes} <= set(await _stored_ids(sink_path))

                await eventually(lambda: stored(before), timeout=15)
                conn = await aiormq.connect(backend.url)  # type: ignore[attr-defined]
                channel = await conn.channel()
                await channel.queue_delete(f"rr.{backend.namespace}.store")
                await conn.close()
                await eventually(lambda: _check(worker.stats.queue_recreated == 1), timeout=10)
                after = [await router.publish("R", b"after", persist=True) for _ in range(10)]
                await eventually(lambda: stored(after), timeout=15)
                worker.stop()
    finally:
        await backend.cleanup()
    errors = [r for r in caplog.records if "was deleted" in r.getMessage()]
    assert len(errors) == 1 and errors[0].levelno == logging.ERROR


async def test_a_sink_that_cannot_start_raises_its_own_error(tmp_path: Path) -> None:
    """run() raises the SinkError itself (no ExceptionGroup), so `roomrouter worker` can
    print it and exit 1."""
    from roomrouter.brokers.memory import MemoryBroker

    consumer = MemoryBroker(unique_namespace()).storage_consumer("ns", "w")
    worker = StorageWorker(consumer, SQLiteSink(tmp_path / "no" / "such" / "dir.db"))
    with anyio.fail_after(10), pytest.raises(SinkError, match="cannot open"):
        await worker.run()


async def test_a_value_error_from_the_sink_is_a_refusal_not_an_outage(tmp_path: Path) -> None:
    """A sink that raises ValueError (here InvalidRoomName, also a RoomRouterError) for one
    row has that row dead-lettered; the rest of the batch is stored, nothing is retried."""
    from roomrouter import InvalidRoomName

    class PickySink(SQLiteSink):
        async def write(self, envelopes: Sequence[Envelope]) -> int:
            if any(e.payload == b"bad" for e in envelopes):
                raise InvalidRoomName("this sink refuses payload b'bad'")
            return await super().write(envelopes)

    backend = BACKENDS["memory"](unique_namespace())
    sink_path = tmp_path / "s.db"
    async with AsyncExitStack() as stack:
        router = await _router(stack, backend)
        sent = [
            await router.publish("R", b"bad" if i == 13 else b"%d" % i, persist=True)
            for i in range(40)
        ]
        worker = _worker(backend, PickySink(sink_path), batch_size=64, max_delay=0.2)

        async def stored() -> None:
            assert len(await _stored_ids(sink_path)) == 39
            assert await _pending(backend) == 0

        await _run_until(worker, stored)
    assert set(await _stored_ids(sink_path)) == {e.id for e in sent if e.payload != b"bad"}
    assert worker.stats.refused == 1 and worker.stats.dead_lettered == 1
