"""Write throughput of the persistence sinks, by batch size. A benchmark, not a test.

Writes N envelopes (200-byte payloads, spread over 50 rooms, ids in publish order) to a fresh
store per run, one ``Sink.write`` per batch, awaited one after the other as a storage worker
does, and prints messages per second. SQLite uses a file in a temporary directory; PostgreSQL
and MySQL (MariaDB) use a unique table prefix whose tables are dropped afterwards.

    PYTHONPATH=src python benchmarks/sink_write.py [--n 20000] [--batch-sizes 100,500,1000]
        [--repeat 3] [--postgres postgresql://postgres@127.0.0.1:5432/test | --no-postgres]
        [--mysql mysql://root@127.0.0.1:3306/test | --no-mysql]

Each figure is the median of ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import anyio

from roomrouter._envelope import Envelope, IdGenerator
from roomrouter.storage import MySQLSink, PostgresSink, Sink, SQLiteSink

ROOMS = 50
PAYLOAD = bytes(200)


def make_envelopes(n: int) -> list[Envelope]:
    gen = IdGenerator()
    now = time.time()
    return [
        Envelope(
            id=gen.next(),
            room=f"room-{i % ROOMS}",
            origin="bench-node",
            ts=now,
            payload=PAYLOAD,
            headers={"content-type": "application/octet-stream"},
            persist=True,
        )
        for i in range(n)
    ]


async def run_once(sink: Sink, items: list[Envelope], batch: int) -> float:
    async with sink:
        started = time.perf_counter()
        written = 0
        for start in range(0, len(items), batch):
            written += await sink.write(items[start : start + batch])
        elapsed = time.perf_counter() - started
        if written != len(items) or await sink.count() != len(items):
            raise RuntimeError(f"wrote {written} of {len(items)} envelopes")
    return len(items) / elapsed


async def drop_tables(dsn: str, prefix: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            f"DROP TABLE IF EXISTS {prefix}_messages, {prefix}_meta, {prefix}_dead_letters"
        )
    finally:
        await conn.close()


async def drop_mysql_tables(url: str, prefix: str) -> None:
    sink = MySQLSink(url, table_prefix=prefix)
    async with sink:
        await sink._run(lambda conn: _drop_mysql(conn, prefix))


async def _drop_mysql(conn: Any, prefix: str) -> None:
    async with conn.cursor() as cur:
        await cur.execute(
            f"DROP TABLE IF EXISTS {prefix}_messages, {prefix}_meta, {prefix}_dead_letters"
        )


async def bench_sqlite(items: list[Envelope], batch: int, repeat: int, tmp: Path) -> float:
    rates = []
    for _ in range(repeat):
        path = tmp / f"{uuid.uuid4().hex}.db"
        rates.append(await run_once(SQLiteSink(path), items, batch))
    return statistics.median(rates)


async def bench_postgres(items: list[Envelope], batch: int, repeat: int, dsn: str) -> float:
    rates = []
    for _ in range(repeat):
        prefix = f"bench_{uuid.uuid4().hex[:12]}"
        try:
            sink = PostgresSink(dsn, table_prefix=prefix)
            rates.append(await run_once(sink, items, batch))
        finally:
            await drop_tables(dsn, prefix)
    return statistics.median(rates)


async def bench_mysql(items: list[Envelope], batch: int, repeat: int, url: str) -> float:
    rates = []
    for _ in range(repeat):
        prefix = f"bench_{uuid.uuid4().hex[:12]}"
        try:
            rates.append(await run_once(MySQLSink(url, table_prefix=prefix), items, batch))
        finally:
            await drop_mysql_tables(url, prefix)
    return statistics.median(rates)


async def main(args: argparse.Namespace) -> None:
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    backends = ["sqlite"] + ([] if args.no_postgres else ["postgresql"])
    backends += [] if args.no_mysql else ["mysql"]
    print(
        f"{args.n:,} envelopes, {len(PAYLOAD)}-byte payloads, {ROOMS} rooms, "
        f"median of {args.repeat} runs; messages/s"
    )
    print(f"{'batch':>7} " + " ".join(f"{b:>12}" for b in backends))
    items = make_envelopes(args.n)  # every run writes them to a fresh, empty store
    with tempfile.TemporaryDirectory() as tmp:
        for batch in batch_sizes:
            row = [await bench_sqlite(items, batch, args.repeat, Path(tmp))]
            if not args.no_postgres:
                row.append(await bench_postgres(items, batch, args.repeat, args.postgres))
            if not args.no_mysql:
                row.append(await bench_mysql(items, batch, args.repeat, args.mysql))
            print(f"{batch:>7} " + " ".join(f"{rate:>12,.0f}" for rate in row))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--batch-sizes", default="100,500,1000")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--no-postgres", action="store_true")
    parser.add_argument("--mysql", default="mysql://root@127.0.0.1:3306/test")
    parser.add_argument("--no-mysql", action="store_true")
    anyio.run(main, parser.parse_args())
