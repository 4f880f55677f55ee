"""Write throughput of the two asyncio MySQL drivers, asyncmy and aiomysql, by batch size.

The measurement behind the MySQL sink's choice of driver (figures in docs/architecture.md).
Each driver writes the same N envelopes (200-byte payloads, 50 rooms, ids in publish order)
into a fresh table with the sink's layout and statement (one multi-row ``INSERT ... ON
DUPLICATE KEY UPDATE`` per batch, in a transaction), one batch after the other as a storage
worker does, and prints messages per second, the median of ``--repeat`` runs.

    PYTHONPATH=src python benchmarks/mysql_drivers.py [--n 20000] [--batch-sizes 100,500,1000]
        [--repeat 3] [--url mysql://root@127.0.0.1:3306/test]

aiomysql 0.3.2 fails on bytes parameters with PyMySQL 1.2 (see roomrouter/storage/mysql.py):
measure it with PyMySQL 1.1 first on the path, e.g. ``pip install --target /tmp/pm11
"PyMySQL<1.2"`` and ``PYTHONPATH=/tmp/pm11:src``. Needs both drivers installed (asyncmy comes
with the ``mysql`` extra; ``pip install aiomysql``).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import statistics
import time
import uuid
from typing import Any
from urllib.parse import unquote, urlsplit

from roomrouter._envelope import Envelope, IdGenerator
from roomrouter.storage._base import encode_headers

DRIVERS = ("asyncmy", "aiomysql")


def make_envelopes(n: int) -> list[Envelope]:
    """As benchmarks/sink_write.py makes them."""
    gen = IdGenerator()
    now = time.time()
    headers = {"content-type": "application/octet-stream"}
    return [
        Envelope(
            id=gen.next(),
            room=f"room-{i % 50}",
            origin="bench-node",
            ts=now,
            payload=bytes(200),
            headers=headers,
            persist=True,
        )
        for i in range(n)
    ]


def _table(name: str) -> str:
    return (
        f"CREATE TABLE {name} (id VARBINARY(255) NOT NULL PRIMARY KEY, "
        "room VARBINARY(2800) NOT NULL, origin TEXT NOT NULL, ts DOUBLE NOT NULL, "
        "payload LONGBLOB NOT NULL, headers LONGTEXT NOT NULL, INDEX (room, id)) "
        "ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin"
    )


def _rows(items: list[Envelope]) -> list[tuple[Any, ...]]:
    return [
        (e.id.encode(), e.room.encode(), e.origin, e.ts, e.payload, encode_headers(e.headers))
        for e in items
    ]


async def run_once(driver: str, url: str, items: list[Envelope], batch: int) -> float:
    module = importlib.import_module(driver)
    parts = urlsplit(url)
    pool = await module.create_pool(
        host=parts.hostname or "127.0.0.1",
        port=parts.port or 3306,
        user=unquote(parts.username or "root"),
        password=unquote(parts.password or ""),
        db=parts.path.lstrip("/"),
        charset="utf8mb4",
        autocommit=False,
        minsize=1,
        maxsize=1,
    )
    table = f"bench_{uuid.uuid4().hex[:12]}"
    sql = (
        f"INSERT INTO {table} (id, room, origin, ts, payload, headers) "
        "VALUES (%s, %s, %s, %s, %s, %s) ON DUPLICATE KEY UPDATE id = id"
    )
    try:
        async with pool.acquire() as conn:
            async with conn.cursor() as cur:
                await cur.execute(_table(table))
            started = time.perf_counter()
            written = 0
            for start in range(0, len(items), batch):
                # Encoding the rows is part of the work a sink does per batch.
                rows = _rows(items[start : start + batch])
                async with conn.cursor() as cur:
                    await conn.begin()
                    written += await cur.executemany(sql, rows)
                    await conn.commit()
            elapsed = time.perf_counter() - started
    finally:
        # Also after a failure (aiomysql with PyMySQL >= 1.2 fails on the first batch).
        async with pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute(f"DROP TABLE IF EXISTS {table}")
        pool.close()
        await pool.wait_closed()
    if written != len(items):
        raise RuntimeError(f"{driver}: wrote {written} of {len(items)} envelopes")
    return len(items) / elapsed


async def main(args: argparse.Namespace) -> None:
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    items = make_envelopes(args.n)
    print(
        f"{args.n:,} envelopes, 200-byte payloads, median of {args.repeat} runs; messages/s "
        f"into {urlsplit(args.url).hostname}"
    )
    print(f"{'batch':>7} " + " ".join(f"{d:>12}" for d in DRIVERS))
    for batch in batch_sizes:
        row = []
        for driver in DRIVERS:
            rates = [await run_once(driver, args.url, items, batch) for _ in range(args.repeat)]
            row.append(statistics.median(rates))
        print(f"{batch:>7} " + " ".join(f"{rate:>12,.0f}" for rate in row))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--batch-sizes", default="100,500,1000")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--url", default="mysql://root@127.0.0.1:3306/test")
    asyncio.run(main(parser.parse_args()))
