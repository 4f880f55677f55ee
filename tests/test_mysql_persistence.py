"""The persistence path into MySQL / MariaDB, on every backend with a storage queue: competing
workers with one killed mid-batch store each message exactly once, and a rejoin with ``since``
stitches the sink and the recent cache (the same scenarios as tests/test_persistence.py, which
runs them on SQLite)."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import anyio
import pytest

from roomrouter import Envelope, RoomRouter
from roomrouter.storage import MySQLSink, StorageWorker

from . import test_persistence as persistence
from .conftest import TEST_ROUTER_OPTIONS
from .helpers import drain, eventually, receive_n
from .storage.conftest import MYSQL_URL, mysql_prefix, mysql_url  # noqa: F401 - fixtures
from .test_persistence import Nodes, sbackend  # noqa: F401 - sbackend: over the backends

pytestmark = pytest.mark.anyio


class MySQLNodes(Nodes):
    """``Nodes`` whose routers read and whose workers write one MySQL store."""

    def __init__(self, backend: Any, stack: AsyncExitStack, prefix: str) -> None:
        super().__init__(backend, stack, Path("unused"))
        self.prefix = prefix

    def sink(self) -> MySQLSink:
        return MySQLSink(MYSQL_URL, table_prefix=self.prefix)

    async def routers(self, count: int, *, sink: bool = True, **options: Any) -> list[RoomRouter]:
        opts = {**TEST_ROUTER_OPTIONS, **self.backend.router_options, **options}
        broker_opts = {k: opts.pop(k) for k in ("recent_size",) if k in opts}
        out = []
        for _ in range(count):
            router = RoomRouter(
                self.broker(**broker_opts),
                namespace=self.backend.namespace,
                sink=self.sink() if sink else None,
                **opts,
            )
            out.append(await self.stack.enter_async_context(router))
        return out

    def worker(self, name: str, **options: Any) -> StorageWorker:
        consumer = self.broker().storage_consumer(self.backend.namespace, name)
        return StorageWorker(consumer, self.sink(), **options)


@pytest.fixture
async def mysql_nodes(sbackend: Any, mysql_prefix: str) -> AsyncIterator[MySQLNodes]:  # noqa: F811
    async with AsyncExitStack() as stack:
        yield MySQLNodes(sbackend, stack, mysql_prefix)


async def test_mysql_competing_workers_one_killed_store_each_message_once(
    mysql_nodes: MySQLNodes,
) -> None:
    nodes = mysql_nodes
    routers = await nodes.routers(2, sink=False)
    rooms = [f"room-{i}" for i in range(20)]
    sent: list[Envelope] = []

    async def publish(router: RoomRouter, n: int) -> None:
        rnd = random.Random(router.node_id)
        for i in range(n):
            sent.append(await router.publish(rnd.choice(rooms), b"%d" % i, persist=True))

    first, second = nodes.worker("w1", batch_size=100), nodes.worker("w2", batch_size=100)
    async with anyio.create_task_group() as tg:
        crash = anyio.CancelScope()

        async def run_first() -> None:
            with crash:
                await first.run()

        tg.start_soon(run_first)
        tg.start_soon(second.run)
        async with anyio.create_task_group() as pubs:
            for router in routers:
                pubs.start_soon(publish, router, 1000)
        # The first worker dies wherever it is (often inside a write: the transaction is
        # rolled back or committed whole, and the redelivery is a no-op for what was stored).
        await eventually(lambda: _check(first.stats.received > 0), timeout=30)
        crash.cancel()
        async with anyio.create_task_group() as pubs:
            for router in routers:
                pubs.start_soon(publish, router, 1000)
        restarted = nodes.worker("w1", batch_size=100)
        tg.start_soon(restarted.run)
        await nodes.wait_drained(timeout=60)
        second.stop()
        restarted.stop()
    async with nodes.sink() as sink:
        assert await sink.count() == len(sent) == 4000
        for room in rooms:
            history = await sink.history(room, after="", limit=10_000)
            assert [e.id for e in history] == sorted(e.id for e in sent if e.room == room)


def _check(condition: bool) -> None:
    assert condition


async def test_mysql_rejoin_with_since_gets_exactly_the_missed_messages(
    mysql_nodes: MySQLNodes,
) -> None:
    a, b = await mysql_nodes.routers(2)
    reader = b.member("reader")
    await reader.join("lecture \U0001f393")
    first = [await a.publish("lecture \U0001f393", b"before", persist=True) for _ in range(3)]
    await receive_n(reader, 3)
    await reader.close()
    await anyio.sleep(0.002)
    missed = [
        await a.publish("lecture \U0001f393", "missed \U0001f600 %d".encode() % i, persist=True)
        for i in range(60)
    ]
    # Half in the sink, half only in the recent cache: the recovery stitches them.
    async with mysql_nodes.sink() as sink:
        assert await sink.write(missed[:30]) == 30
    again = b.member("reader")
    recovery = await again.join("lecture \U0001f393", since=first[-1].id)
    assert recovery.complete and recovery.count == 60
    received = await receive_n(again, 60)
    assert [e.id for e in received] == [e.id for e in missed]
    assert [e.payload for e in received] == [e.payload for e in missed]
    assert await drain(again) == []


async def test_mysql_a_window_the_cache_no_longer_holds_is_reported(
    mysql_nodes: MySQLNodes,
) -> None:
    await persistence.test_a_window_the_cache_no_longer_holds_is_reported(mysql_nodes)
