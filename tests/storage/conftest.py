"""Fixtures for the sink contract suite: one ``store`` per backend, isolated per test.

A ``Store`` makes any number of sinks on the same storage (a temp SQLite file, or a unique
PostgreSQL / MySQL table prefix dropped afterwards) and reads or tampers with the schema version
through the raw driver, behind the sink's back.

PostgreSQL is expected at ``ROOMROUTER_TEST_POSTGRES`` (default
``postgresql://postgres@127.0.0.1:5432/test``), MariaDB (or MySQL) at ``ROOMROUTER_TEST_MYSQL``
(default ``mysql://root@127.0.0.1:3306/test``). If one cannot be reached its tests are skipped,
except when ``CI`` is set: there a missing server is a failure, not a skip.
"""

from __future__ import annotations

import os
import sqlite3
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from roomrouter.storage import MySQLSink, PostgresSink, Sink, SQLiteSink

PG_DSN = os.environ.get("ROOMROUTER_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
MYSQL_URL = os.environ.get("ROOMROUTER_TEST_MYSQL", "mysql://root@127.0.0.1:3306/test")

# Probed once per session: a down server costs one connection attempt, not one per test.
_pg_probe: list[str | None] = []
_mysql_probe: list[str | None] = []


@pytest.fixture
def anyio_backend() -> str:
    # asyncpg runs on asyncio only.
    return "asyncio"


@dataclass
class Store:
    backend: str
    make: Callable[[], Sink]
    read_schema_version: Callable[[], Awaitable[str | None]]
    write_schema_version: Callable[[str], Awaitable[None]]


@pytest.fixture
async def postgres_dsn() -> str:
    """The test server's DSN; skips the test if it is not reachable (fails it under CI)."""
    import asyncpg

    if not _pg_probe:
        try:
            conn = await asyncpg.connect(PG_DSN, timeout=5)
        except Exception as exc:
            _pg_probe.append(f"{type(exc).__name__}: {exc}")
        else:
            await conn.close()
            _pg_probe.append(None)
    reason = _pg_probe[0]
    if reason is not None:
        where = urlsplit(PG_DSN)
        message = f"PostgreSQL not reachable at {where.hostname}:{where.port or 5432}: {reason}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return PG_DSN


@pytest.fixture
async def pg_prefix(postgres_dsn: str) -> AsyncIterator[str]:
    """A table prefix no other test uses; its tables are dropped afterwards."""
    prefix = f"rrtest_{uuid.uuid4().hex[:16]}"
    try:
        yield prefix
    finally:
        await drop_postgres_tables(prefix)


async def mysql_connect() -> Any:
    """A raw asyncmy connection to the test server (autocommit), behind any sink's back."""
    import asyncmy

    where = urlsplit(MYSQL_URL)
    return await asyncmy.connect(
        host=where.hostname or "127.0.0.1",
        port=where.port or 3306,
        user=where.username or "root",
        password=where.password or "",
        db=where.path.lstrip("/"),
        charset="utf8mb4",
        autocommit=True,
        connect_timeout=5,
    )


async def mysql_fetch(sql: str, *args: object) -> list[tuple[Any, ...]]:
    """Run one statement on a fresh connection of its own, behind any sink's back."""
    conn = await mysql_connect()
    try:
        async with conn.cursor() as cur:
            await cur.execute(sql, args or None)
            return list(await cur.fetchall() or [])
    finally:
        await conn.ensure_closed()


async def drop_mysql_tables(prefix: str) -> None:
    await mysql_fetch(
        f"DROP TABLE IF EXISTS {prefix}_messages, {prefix}_meta, {prefix}_dead_letters"
    )


@pytest.fixture
async def mysql_url() -> str:
    """The test server's URL; skips the test if it is not reachable (fails it under CI)."""
    if not _mysql_probe:
        try:
            conn = await mysql_connect()
        except Exception as exc:
            _mysql_probe.append(f"{type(exc).__name__}: {exc}")
        else:
            await conn.ensure_closed()
            _mysql_probe.append(None)
    reason = _mysql_probe[0]
    if reason is not None:
        where = urlsplit(MYSQL_URL)
        message = f"MariaDB/MySQL not reachable at {where.hostname}:{where.port or 3306}: {reason}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return MYSQL_URL


@pytest.fixture
async def mysql_prefix(mysql_url: str) -> AsyncIterator[str]:
    """A table prefix no other test uses; its tables are dropped afterwards."""
    prefix = f"rrtest_{uuid.uuid4().hex[:16]}"
    try:
        yield prefix
    finally:
        await drop_mysql_tables(prefix)


def _mysql_store(prefix: str) -> Store:
    async def read() -> str | None:
        rows = await mysql_fetch(f"SELECT value FROM {prefix}_meta WHERE `key` = 'schema_version'")
        return str(rows[0][0]) if rows else None

    async def write(version: str) -> None:
        await mysql_fetch(
            f"UPDATE {prefix}_meta SET value = %s WHERE `key` = 'schema_version'", version
        )

    return Store("mysql", lambda: MySQLSink(MYSQL_URL, table_prefix=prefix), read, write)


def _sqlite_store(path: Path) -> Store:
    def raw(sql: str, *params: str) -> str | None:
        with sqlite3.connect(path) as conn:
            row = conn.execute(sql, params).fetchone()
        conn.close()
        return None if row is None else str(row[0])

    async def read() -> str | None:
        return raw("SELECT value FROM roomrouter_meta WHERE key = 'schema_version'")

    async def write(version: str) -> None:
        raw("UPDATE roomrouter_meta SET value = ? WHERE key = 'schema_version'", version)

    return Store("sqlite", lambda: SQLiteSink(path), read, write)


def _postgres_store(prefix: str) -> Store:
    async def read() -> str | None:
        rows = await pg_fetch(f"SELECT value FROM {prefix}_meta WHERE key = 'schema_version'")
        return str(rows[0]["value"]) if rows else None

    async def write(version: str) -> None:
        await pg_fetch(f"UPDATE {prefix}_meta SET value = $1 WHERE key = 'schema_version'", version)

    return Store("postgresql", lambda: PostgresSink(PG_DSN, table_prefix=prefix), read, write)


async def pg_fetch(sql: str, *args: object) -> list[dict[str, Any]]:
    """Run one statement on a fresh connection of its own, behind any sink's back."""
    import asyncpg

    conn = await asyncpg.connect(PG_DSN)
    try:
        return [dict(row) for row in await conn.fetch(sql, *args)]
    finally:
        await conn.close()


async def drop_postgres_tables(prefix: str) -> None:
    await pg_fetch(f"DROP TABLE IF EXISTS {prefix}_messages, {prefix}_meta, {prefix}_dead_letters")


@pytest.fixture
def pg() -> Callable[..., Awaitable[list[dict[str, Any]]]]:
    """:func:`pg_fetch`, for tests (request ``postgres_dsn`` or ``pg_prefix`` first)."""
    return pg_fetch


@pytest.fixture(params=["sqlite", "postgresql", "mysql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "sqlite":
        return _sqlite_store(tmp_path / "messages.db")
    if request.param == "mysql":
        return _mysql_store(request.getfixturevalue("mysql_prefix"))
    return _postgres_store(request.getfixturevalue("pg_prefix"))


@pytest.fixture
async def sink(store: Store) -> AsyncIterator[Sink]:
    async with store.make() as sink:
        yield sink
