"""The SQL sinks answer a room's history from the (room, id) index (issue 19, case 1): the
recovery query of a room must not walk the primary key filtering rooms out (EXPLAIN showed
4,763 rows removed to return 250), and a database made before the index gets it on start."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from roomrouter import Envelope
from roomrouter._envelope import IdGenerator
from roomrouter.storage import MySQLSink, PostgresSink, SQLiteSink

from .conftest import MYSQL_URL, mysql_fetch, pg_fetch

pytestmark = pytest.mark.anyio

ROOMS = 20
ROWS = 40_000


def _envelopes() -> list[Envelope]:
    ids = IdGenerator()
    return [
        Envelope(id=ids.next(), room=f"room{i % ROOMS}", origin="o", ts=1.0, payload=b"x" * 40)
        for i in range(ROWS)
    ]


def _shapes(envelopes: list[Envelope]) -> list[dict[str, Any]]:
    """The history queries a recovery and ``RoomRouter.history`` make."""
    room = [e for e in envelopes if e.room == "room3"]
    return [
        {"after": room[100].id, "before": None, "limit": 250},  # join(since=): old position
        {"after": room[-30].id, "before": None, "limit": 1000},  # join(since=): recent one
        {"after": None, "before": None, "limit": 50},  # history(): the newest
        {"after": None, "before": room[500].id, "limit": 50},  # history(before=)
        {"after": room[10].id, "before": room[400].id, "limit": 100},
    ]


async def _explain(mode: str, sql: str, params: list[Any]) -> dict[str, Any]:
    import asyncpg

    conn = await asyncpg.connect("postgresql://postgres@127.0.0.1:5432/test")
    try:
        await conn.execute(f"SET plan_cache_mode = {mode}")
        text = await conn.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}", *params)
    finally:
        await conn.close()
    plan: dict[str, Any] = json.loads(text)[0]["Plan"]
    return plan


def _walk(plan: dict[str, Any]) -> list[dict[str, Any]]:
    nodes = [plan]
    for child in plan.get("Plans", []):
        nodes.extend(_walk(child))
    return nodes


async def test_postgres_history_uses_the_room_index(pg_prefix: str) -> None:
    envelopes = _envelopes()
    async with PostgresSink(
        "postgresql://postgres@127.0.0.1:5432/test", table_prefix=pg_prefix
    ) as sink:
        await sink.write(envelopes)
        await pg_fetch(f"ANALYZE {pg_prefix}_messages")
        for shape in _shapes(envelopes):
            sql, params = sink._history_query("room3", **shape)
            # Both plans: asyncpg prepares statements, and after a few runs PostgreSQL may
            # switch to a generic plan that cannot see which room is asked.
            for mode in ("force_custom_plan", "force_generic_plan"):
                plan = await _explain(mode, sql, params)
                nodes = _walk(plan)
                assert not [n for n in nodes if n["Node Type"] == "Seq Scan"], (shape, plan)
                used = {n["Index Name"] for n in nodes if "Index Name" in n}
                assert used == {f"{pg_prefix}_messages_room_id"}, (shape, plan)
                removed = sum(n.get("Rows Removed by Filter", 0) for n in nodes)
                assert removed == 0, (shape, plan)
            assert [e.id for e in await sink.history("room3", **shape)] == _expected(
                envelopes, **shape
            )


async def test_sqlite_history_uses_the_room_index(tmp_path: Path) -> None:
    envelopes = _envelopes()
    path = tmp_path / "h.db"
    async with SQLiteSink(path) as sink:
        await sink.write(envelopes)
        for shape in _shapes(envelopes):
            sql, params = sink._history_query("room3", **shape)
            with sqlite3.connect(path) as conn:
                conn.execute("ANALYZE")
                plan = [row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}", params)]
            conn.close()
            # One search of the room's part of the index, in its order (no sort, no scan).
            assert len(plan) == 1, (shape, plan)
            assert "USING INDEX roomrouter_messages_room_id (room=?" in plan[0], (shape, plan)
            assert [e.id for e in await sink.history("room3", **shape)] == _expected(
                envelopes, **shape
            )


async def test_mysql_history_uses_the_room_index(mysql_prefix: str) -> None:
    """MariaDB's ANALYZE: one range of the (room, id) index, read in its order (no filesort),
    and no row read beyond the page (MySQL would rather walk the primary key in id order for
    ``ORDER BY ... LIMIT``, reading every room's rows)."""
    envelopes = _envelopes()
    async with MySQLSink(MYSQL_URL, table_prefix=mysql_prefix) as sink:
        await sink.write(envelopes)
        await mysql_fetch(f"ANALYZE TABLE {mysql_prefix}_messages")
        for shape in _shapes(envelopes):
            sql, params = sink._history_query("room3", **shape)
            [(text,)] = await mysql_fetch(f"ANALYZE FORMAT=JSON {sql}", *params)
            plan = json.loads(text)
            assert "filesort" not in text and "temporary" not in text, (shape, plan)
            [step] = plan["query_block"]["nested_loop"]
            table = step["table"]
            assert table["key"] == f"{mysql_prefix}_messages_room_id", (shape, plan)
            assert table["access_type"] in ("range", "ref"), (shape, plan)
            assert table["r_rows"] <= shape["limit"], (shape, plan)
            assert table["r_filtered"] == 100, (shape, plan)
            assert [e.id for e in await sink.history("room3", **shape)] == _expected(
                envelopes, **shape
            )


async def test_mysql_database_without_the_room_index_gets_it_on_start(mysql_prefix: str) -> None:
    async with MySQLSink(MYSQL_URL, table_prefix=mysql_prefix):
        pass
    index = f"{mysql_prefix}_messages_room_id"
    await mysql_fetch(f"DROP INDEX `{index}` ON {mysql_prefix}_messages")
    async with MySQLSink(MYSQL_URL, table_prefix=mysql_prefix) as sink:
        await sink.write(_envelopes()[:50])
        assert len(await sink.history("room3")) == 3
    rows = await mysql_fetch(
        "SELECT column_name FROM information_schema.statistics WHERE table_schema = DATABASE() "
        "AND index_name = %s ORDER BY seq_in_index",
        index,
    )
    assert [r[0] for r in rows] == ["room", "id"]


def _expected(
    envelopes: list[Envelope], *, after: str | None, before: str | None, limit: int
) -> list[str]:
    ids = [
        e.id
        for e in envelopes
        if e.room == "room3"
        and (after is None or e.id > after)
        and (before is None or e.id < before)
    ]
    return ids[:limit] if after is not None else ids[-limit:]


async def test_a_database_without_the_room_index_gets_it_on_start(
    pg_prefix: str, tmp_path: Path
) -> None:
    dsn = "postgresql://postgres@127.0.0.1:5432/test"
    async with PostgresSink(dsn, table_prefix=pg_prefix):
        pass
    await pg_fetch(f'DROP INDEX "{pg_prefix}_messages_room_id"')
    async with PostgresSink(dsn, table_prefix=pg_prefix):
        pass
    rows = await pg_fetch(
        "SELECT indexdef FROM pg_indexes WHERE indexname = $1", f"{pg_prefix}_messages_room_id"
    )
    assert rows and "(room, id)" in rows[0]["indexdef"]

    path = tmp_path / "old.db"
    async with SQLiteSink(path):
        pass
    with sqlite3.connect(path) as conn:
        conn.execute("DROP INDEX roomrouter_messages_room_id")
    conn.close()
    async with SQLiteSink(path):
        pass
    with sqlite3.connect(path) as conn:
        names = {row[1] for row in conn.execute("PRAGMA index_list(roomrouter_messages)")}
    conn.close()
    assert "roomrouter_messages_room_id" in names
