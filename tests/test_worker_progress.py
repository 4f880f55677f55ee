"""A storage worker that makes no progress says so (issue 19): one ERROR log line and one
count (``WorkerStats.stalls``, the ``roomrouter_worker_stalls_total`` metric) per stall, and a
line when it moves again. Generic: shown on a private Redis that dies under a worker while
entries are pending, and on a sink that keeps failing with a batch in hand."""

from __future__ import annotations

import logging
from pathlib import Path

import anyio
import pytest

from roomrouter import ConfigurationError, RoomRouter, SinkError
from roomrouter.brokers.redis import RedisBroker
from roomrouter.storage import SQLiteSink, StorageWorker

from .conftest import TEST_ROUTER_OPTIONS, unique_namespace
from .helpers import eventually
from .test_redis import PrivateRedis

pytestmark = pytest.mark.anyio


def _broker(port: int) -> RedisBroker:
    return RedisBroker(host="127.0.0.1", port=port, redelivery_after=0.5, operation_timeout=1)


def _stalls(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "stalled" in r.getMessage()]


async def _persist(router: RoomRouter, i: int) -> None:
    await router.publish("r", b"%d" % i, persist=True)


def _assert(condition: bool) -> None:
    assert condition


async def test_a_worker_whose_queue_is_unreachable_reports_a_stall(
    private_redis: PrivateRedis, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ns = unique_namespace()
    caplog.set_level(logging.WARNING, logger="roomrouter.worker")
    port = private_redis.port
    worker = StorageWorker(
        _broker(port).storage_consumer(ns, "w"), SQLiteSink(tmp_path / "sink.db"),
        name="w", max_delay=0.05, max_backoff=0.1, stall_after=0.5,
    )  # fmt: skip
    router = RoomRouter(_broker(port), namespace=ns, **TEST_ROUTER_OPTIONS)  # type: ignore[arg-type]
    async with router, anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        await router.publish("r", b"before", persist=True)
        await eventually(lambda: _assert(worker.stats.acked == 1))
        assert worker.stats.stalls == 0 and _stalls(caplog) == []
        private_redis.stop()  # every fetch fails from now on
        await anyio.sleep(0.3)
        assert worker.stats.stalls == 0  # failing, but not for stall_after yet
        await eventually(lambda: _assert(worker.stats.stalls == 1), timeout=3)
        await anyio.sleep(0.5)  # still failing: the same stall, not a new one
        assert worker.stats.stalls == 1
        [record] = _stalls(caplog)
        assert record.levelno == logging.ERROR
        assert "fetch failed" in record.getMessage() and "w" in record.getMessage()
        private_redis.start()  # an empty Redis: the worker recreates its group and goes on
        await eventually(lambda: _assert(worker.stats.queue_recreated == 1), timeout=5)
        await eventually(lambda: _assert(any("moves again" in r.getMessage()
                                             for r in caplog.records)))  # fmt: skip
        async with anyio.create_task_group() as burst:
            for i in range(20):
                burst.start_soon(_persist, router, i)
        await eventually(lambda: _assert(worker.stats.acked == 21), timeout=5)
        assert worker.stats.stalls == 1
        worker.stop()


class _DownSink(SQLiteSink):
    """A real SQLite sink whose writes fail while ``down`` is set (a database outage)."""

    down = True

    async def write(self, envelopes):  # type: ignore[no-untyped-def]
        if self.down:
            raise SinkError("database unavailable")
        return await super().write(envelopes)


async def test_a_worker_whose_sink_keeps_failing_reports_a_stall(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from roomrouter.brokers.memory import MemoryBroker

    ns = unique_namespace()
    caplog.set_level(logging.WARNING, logger="roomrouter.worker")
    broker = MemoryBroker(f"stall-{ns}")
    sink = _DownSink(tmp_path / "sink.db")
    worker = StorageWorker(
        broker.storage_consumer(ns, "w"), sink, name="w", max_delay=0.05, max_backoff=0.1,
        stall_after=0.5,
    )  # fmt: skip
    router = RoomRouter(broker, namespace=ns, **TEST_ROUTER_OPTIONS)
    async with router, anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        async with anyio.create_task_group() as burst:
            for i in range(10):
                burst.start_soon(_persist, router, i)
        await eventually(lambda: _assert(worker.stats.stalls == 1), timeout=3)
        [record] = _stalls(caplog)
        assert record.levelno == logging.ERROR and "sink keeps failing" in record.getMessage()
        sink.down = False
        await eventually(lambda: _assert(worker.stats.acked == 10), timeout=5)
        assert worker.stats.stalls == 1
        worker.stop()


def test_stall_after_must_be_positive(tmp_path: Path) -> None:
    from roomrouter.brokers.memory import MemoryBroker

    consumer = MemoryBroker("x").storage_consumer("ns", "w")
    with pytest.raises(ConfigurationError):
        StorageWorker(consumer, SQLiteSink(tmp_path / "s.db"), stall_after=0)
