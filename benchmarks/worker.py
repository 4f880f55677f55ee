"""Storage worker throughput: messages/s from a backend's storage queue into a sink.

    python benchmarks/worker.py
    python benchmarks/worker.py --backends memory,redis,rabbitmq,kafka --kafka-url kafka://127.0.0.1:9092

For each backend and sink, ``--n`` persisted messages (100-byte payloads, 50 rooms) are
published first (not timed); then ``--workers`` StorageWorkers (batch size ``--batch``) drain the
queue. Timed: from the moment every worker has received frames (all are working) until all
frames are acknowledged; the rate counts the frames acknowledged in that window. Connecting
is not timed -- on Kafka it includes joining the storage consumer group, and each worker that
joins stalls the group for a rebalance (about a second on Tansu). If one worker drains the
queue before the others got anything, the row says so and times from its first frame.
Reported, not asserted.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import anyio

from roomrouter import Broker, RoomRouter
from roomrouter.storage import Sink, StorageWorker, sink_from_url


def _broker(name: str, args: argparse.Namespace) -> Broker:
    from roomrouter._urls import broker_from_url

    url = {
        "memory": "memory://bench-worker",
        "redis": args.redis_url,
        "rabbitmq": args.amqp_url,
        "kafka": args.kafka_url,
    }
    return broker_from_url(url[name])


def _sink(kind: str, args: argparse.Namespace, tag: str) -> Sink:
    if kind == "sqlite":
        return sink_from_url(f"sqlite:///{Path(args.tmp) / (tag + '.db')}")
    if kind == "mysql":
        return sink_from_url(f"{args.mysql_url}?table_prefix=bench_{tag}")
    return sink_from_url(f"{args.postgres_url}?table_prefix=bench_{tag}")


async def run_one(backend: str, sink_kind: str, args: argparse.Namespace) -> tuple[float, int]:
    tag = uuid.uuid4().hex[:8]
    namespace = f"bench-{tag}"
    async with RoomRouter(_broker(backend, args), namespace=namespace, linger=0) as router:
        rooms = [f"room-{i}" for i in range(50)]

        async def publish(part: int) -> None:
            for i in range(part, args.n, 32):
                await router.publish(rooms[i % 50], b"p" * 100, persist=True)

        async with anyio.create_task_group() as tg:
            for part in range(32):
                tg.start_soon(publish, part)
        workers = [
            StorageWorker(
                _broker(backend, args).storage_consumer(namespace, f"w{i}"),
                _sink(sink_kind, args, tag),
                batch_size=args.batch,
                max_delay=0.05,
            )
            for i in range(args.workers)
        ]
        async with anyio.create_task_group() as tg:
            for w in workers:
                tg.start_soon(w.run)
            # In-process counters, not probe.pending(): on RabbitMQ an exact pending count
            # waits for the management statistics (seconds) and would be timed instead.
            while not any(w.stats.received for w in workers):
                await anyio.sleep(0.001)
            t0, base = time.perf_counter(), 0
            working = 1
            while (acked := sum(w.stats.acked for w in workers)) < args.n:
                busy = sum(1 for w in workers if w.stats.received)
                if busy > working:
                    working = busy
                    t0, base = time.perf_counter(), acked
                await anyio.sleep(0.001)
            elapsed = time.perf_counter() - t0
            for w in workers:
                w.stop()
    written = sum(w.stats.written for w in workers)
    if written != args.n:
        print(f"    warning: {written} rows written for {args.n} messages")
    if sink_kind == "postgresql":
        await _drop_pg(args.postgres_url, f"bench_{tag}")
    if sink_kind == "mysql":
        await _drop_mysql(args.mysql_url, f"bench_{tag}")
    return (args.n - base) / elapsed, working


async def _drop_pg(url: str, prefix: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        for table in ("messages", "meta", "dead_letters"):
            await conn.execute(f"DROP TABLE IF EXISTS {prefix}_{table}")
    finally:
        await conn.close()


async def _drop_mysql(url: str, prefix: str) -> None:
    from roomrouter.storage import MySQLSink

    async def drop(conn: Any) -> None:
        async with conn.cursor() as cur:
            await cur.execute(
                f"DROP TABLE IF EXISTS {prefix}_messages, {prefix}_meta, {prefix}_dead_letters"
            )

    async with MySQLSink(url, table_prefix=prefix) as sink:
        await sink._run(drop)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="memory,redis")
    parser.add_argument("--sinks", default="sqlite,postgresql,mysql")
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    parser.add_argument(
        "--amqp-url", default=os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
    )
    parser.add_argument(
        "--kafka-url", default=os.environ.get("KAFKA_URL", "kafka://127.0.0.1:9092")
    )
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get("POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"),
    )
    parser.add_argument(
        "--mysql-url", default=os.environ.get("MYSQL_URL", "mysql://root@127.0.0.1:3306/test")
    )
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        args.tmp = tmp
        for backend in args.backends.split(","):
            for sink in args.sinks.split(","):
                print(f"running {backend} -> {sink} ...", flush=True)
                rows.append((backend, sink, *await run_one(backend, sink, args)))
    print(f"\nn={args.n} batch={args.batch} workers={args.workers}")
    print(f"{'backend':<10} {'sink':<11} {'msg/s':>10}")
    for backend, sink, rate, working in rows:
        note = "" if working == args.workers else f"  (only {working} worker(s) got frames)"
        print(f"{backend:<10} {sink:<11} {rate:>10,.0f}{note}")


if __name__ == "__main__":
    anyio.run(main)
