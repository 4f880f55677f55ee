"""Storage-worker throughput on RabbitMQ: messages per second from the storage queue into
SQLite. A probe, not a test; it only touches 127.0.0.1.

Phase 1 publishes ``--n`` persisted envelopes (200-byte payloads, 50 rooms nobody hosts, so
each is one confirmed publish routed to the quorum storage queue and the room's recent queue)
from one router with ``--concurrency`` publishers, and reports publishes per second. Phase 2
starts ``--workers`` storage workers on the filled queue and reports how fast the SQLite sink
receives the rows (time from the workers' start until every row is in the sink).

    PYTHONPATH=src python benchmarks/_rabbit_worker_probe.py [--n 20000] [--batch-size 500]
        [--workers 1] [--concurrency 64]
"""

from __future__ import annotations

import argparse
import sqlite3
import tempfile
import time
import uuid
from pathlib import Path

import aiormq
import anyio

from roomrouter import RoomRouter
from roomrouter.brokers.rabbitmq import RabbitMQBroker, amqp_name, routing_key
from roomrouter.storage import SQLiteSink, StorageWorker

URL = "amqp://guest:guest@127.0.0.1:5672/"
PAYLOAD = bytes(200)


def _rows(path: Path) -> int:
    try:
        with sqlite3.connect(path) as conn:
            (n,) = conn.execute("SELECT count(*) FROM roomrouter_messages").fetchone()
        conn.close()
        return int(n)
    except sqlite3.OperationalError:
        return 0


async def main(n: int, batch_size: int, workers: int, concurrency: int) -> None:
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    rooms = [f"room-{i}" for i in range(50)]
    try:
        async with RoomRouter(RabbitMQBroker(URL), namespace=namespace, linger=0) as router:
            counter = iter(range(n))
            start = time.perf_counter()

            async def publisher() -> None:
                for i in counter:
                    await router.publish(rooms[i % 50], PAYLOAD, persist=True)

            async with anyio.create_task_group() as tg:
                for _ in range(concurrency):
                    tg.start_soon(publisher)
            elapsed = time.perf_counter() - start
            print(f"publish_persistent: {n} in {elapsed:.2f}s = {n / elapsed:,.0f} msg/s "
                  f"({concurrency} concurrent publishers)")  # fmt: skip

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "bench.db"
            broker = RabbitMQBroker(URL, storage_prefetch=max(1000, 2 * batch_size))
            running = [
                StorageWorker(
                    broker.storage_consumer(namespace, f"w{i}"),
                    SQLiteSink(path),
                    batch_size=batch_size,
                )
                for i in range(workers)
            ]
            start = time.perf_counter()
            async with anyio.create_task_group() as tg:
                for worker in running:
                    tg.start_soon(worker.run)
                while _rows(path) < n:
                    await anyio.sleep(0.05)
                elapsed = time.perf_counter() - start
                for worker in running:
                    worker.stop()
            print(f"worker into SQLite: {n} in {elapsed:.2f}s = {n / elapsed:,.0f} msg/s "
                  f"({workers} worker(s), batch {batch_size})")  # fmt: skip
    finally:
        connection = await aiormq.connect(URL)
        channel = await connection.channel()
        await channel.queue_delete(amqp_name(namespace, "store"))
        for room in rooms:
            await channel.queue_delete(amqp_name(namespace, "recent", routing_key(room)))
        for kind in ("data", "control", "direct"):
            await channel.exchange_delete(amqp_name(namespace, kind, exchange=True))
        await connection.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    anyio.run(main, args.n, args.batch_size, args.workers, args.concurrency)
