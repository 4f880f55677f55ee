"""The sink contract (``roomrouter.storage._base``), run against SQLite, PostgreSQL and MySQL
(MariaDB)."""

from __future__ import annotations

import logging
import random
import sqlite3
import subprocess
import sys
import uuid
from contextlib import AsyncExitStack
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import roomrouter.storage
from roomrouter._envelope import Envelope, IdGenerator
from roomrouter._errors import ConfigurationError, MissingDependency, SinkError, SinkRefused
from roomrouter.storage import MySQLSink, PostgresSink, Sink, SQLiteSink, sink_from_url
from roomrouter.storage._base import SCHEMA_VERSION

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from typing import Any

    from .conftest import Store

    PgFetch = Callable[..., Awaitable[list[dict[str, Any]]]]

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]


def envelopes(room: str, n: int, *, payload: bytes = b"x") -> list[Envelope]:
    gen = IdGenerator()
    return [
        Envelope(id=gen.next(), room=room, origin="node-a", ts=1_700_000_000.0 + i, payload=payload)
        for i in range(n)
    ]


def ids(items: list[Envelope]) -> list[str]:
    return [e.id for e in items]


# --- writes -------------------------------------------------------------------------------


async def test_write_is_idempotent_by_id(sink: Sink) -> None:
    batch = envelopes("lobby", 20)
    assert await sink.write(batch) == 20
    assert await sink.write(batch) == 0
    assert await sink.count("lobby") == 20

    more = envelopes("lobby", 10)
    assert await sink.write(batch[:10] + more) == 10
    assert await sink.count("lobby") == 30


async def test_duplicates_within_one_batch_are_stored_once(sink: Sink) -> None:
    batch = envelopes("lobby", 5)
    assert await sink.write(batch + batch[::-1] + batch[:2]) == 5
    assert ids(await sink.history("lobby")) == ids(batch)


async def test_first_write_of_an_id_wins(sink: Sink) -> None:
    [first] = envelopes("lobby", 1, payload=b"first")
    second = Envelope(id=first.id, room="lobby", origin="node-b", ts=0.0, payload=b"second")
    await sink.write([first])
    assert await sink.write([second]) == 0
    [stored] = await sink.history("lobby")
    assert (stored.payload, stored.origin) == (b"first", "node-a")


async def test_empty_write_is_a_no_op(sink: Sink) -> None:
    assert await sink.write([]) == 0
    assert await sink.count() == 0


async def test_write_is_committed_when_it_returns(store: Store, sink: Sink) -> None:
    batch = envelopes("lobby", 3)
    await sink.write(batch)
    # A second, independent connection sees the batch while the writer is still open.
    async with store.make() as reader:
        assert ids(await reader.history("lobby")) == ids(batch)


async def test_a_failing_batch_writes_nothing(sink: Sink) -> None:
    good = envelopes("lobby", 3)
    # A lone surrogate cannot be encoded as UTF-8 by either driver. It sorts last, so SQLite
    # has inserted the good rows when it fails, and the transaction must take them back.
    bad = Envelope(id=good[-1].id + "z", room="lobby\ud800", origin="n", ts=0.0, payload=b"")
    with pytest.raises(SinkError) as info:
        await sink.write([*good, bad])
    assert info.value.__cause__ is not None
    assert await sink.count() == 0
    assert await sink.write(good) == 3
    # Reading such a room is refused the same way, never a bare UnicodeError.
    with pytest.raises(SinkError):
        await sink.history(bad.room)


# --- reads --------------------------------------------------------------------------------


async def test_history_is_in_id_order_whatever_the_write_order(sink: Sink) -> None:
    batch = envelopes("lobby", 60)
    shuffled = batch[:]
    random.Random(7).shuffle(shuffled)
    for start in range(0, 60, 7):
        await sink.write(shuffled[start : start + 7])
    assert ids(await sink.history("lobby", limit=100)) == ids(batch)


async def test_ids_compare_as_code_points_not_by_locale(sink: Sink) -> None:
    # Under a linguistic collation "a" < "B" and "-" is ignored; the contract is plain order.
    raw = ["B", "a", "a-c", "ab", "é", "z", "\U0001f600"]
    await sink.write(
        [Envelope(id=i, room="r", origin="n", ts=0.0, payload=b"") for i in reversed(raw)]
    )
    assert ids(await sink.history("r")) == sorted(raw)
    assert ids(await sink.history("r", after="a")) == [i for i in sorted(raw) if i > "a"]
    assert await sink.latest_id("r") == max(raw)


async def test_walk_a_room_backwards_with_before(sink: Sink) -> None:
    batch = envelopes("lobby", 237)
    await sink.write(batch)
    pages: list[list[str]] = []
    before: str | None = None
    while True:
        page = ids(await sink.history("lobby", before=before, limit=50))
        if not page:
            break
        assert page == sorted(page)
        pages.append(page)
        before = page[0]
    assert [len(p) for p in pages] == [50, 50, 50, 50, 37]
    assert [i for page in reversed(pages) for i in page] == ids(batch)


async def test_walk_a_room_forwards_with_after(sink: Sink) -> None:
    batch = envelopes("lobby", 237)
    await sink.write(batch)
    pages: list[list[str]] = []
    after = ""
    while True:
        page = ids(await sink.history("lobby", after=after, limit=50))
        if not page:
            break
        pages.append(page)
        after = page[-1]
    assert [len(p) for p in pages] == [50, 50, 50, 50, 37]
    assert [i for page in pages for i in page] == ids(batch)


async def test_history_without_after_returns_the_latest(sink: Sink) -> None:
    batch = envelopes("lobby", 30)
    await sink.write(batch)
    assert ids(await sink.history("lobby", limit=5)) == ids(batch[-5:])
    assert ids(await sink.history("lobby", before=batch[10].id, limit=5)) == ids(batch[5:10])
    assert ids(await sink.history("lobby", before=batch[3].id, limit=5)) == ids(batch[:3])


async def test_history_between_after_and_before(sink: Sink) -> None:
    batch = envelopes("lobby", 120)
    await sink.write(batch)
    window = await sink.history("lobby", after=batch[10].id, before=batch[100].id, limit=20)
    assert ids(window) == ids(batch[11:31])
    window = await sink.history("lobby", after=batch[10].id, before=batch[100].id, limit=500)
    assert ids(window) == ids(batch[11:100])
    assert await sink.history("lobby", after=batch[50].id, before=batch[51].id) == []


@pytest.mark.parametrize("limit", [0, -1, 10_001, True, 2.0, "5", None])
async def test_history_rejects_a_bad_limit(sink: Sink, limit: object) -> None:
    with pytest.raises(ValueError):
        await sink.history("lobby", limit=limit)  # type: ignore[arg-type]


async def test_history_accepts_the_largest_limit(sink: Sink) -> None:
    await sink.write(envelopes("lobby", 3))
    assert len(await sink.history("lobby", limit=10_000)) == 3


async def test_rooms_are_isolated(sink: Sink) -> None:
    rooms = ["lobby", "lobby2", "lob%", "Lobby", "é-room", "a b"]
    written = {room: envelopes(room, 4 + n) for n, room in enumerate(rooms)}
    # One mixed batch, so isolation does not come from batch boundaries.
    await sink.write([e for batch in written.values() for e in batch])
    for room, batch in written.items():
        assert await sink.count(room) == len(batch)
        assert ids(await sink.history(room)) == ids(batch)
        assert ids(await sink.history(room, after="")) == ids(batch)
        assert await sink.latest_id(room) == batch[-1].id
    assert await sink.count() == sum(len(b) for b in written.values())
    assert await sink.count("nobody") == 0
    assert await sink.history("nobody") == []
    assert await sink.latest_id("nobody") is None


@pytest.mark.parametrize(
    "payload",
    [b"", b"\x00", bytes(range(256)), b"\xff\xfe" * 5000, "ünïcødé".encode(), b"'; --"],
    ids=["empty", "nul", "all-bytes", "10k", "utf8", "sql-ish"],
)
async def test_payload_bytes_roundtrip(sink: Sink, payload: bytes) -> None:
    [envelope] = envelopes("lobby", 1, payload=payload)
    await sink.write([envelope])
    [stored] = await sink.history("lobby")
    assert type(stored.payload) is bytes
    assert stored.payload == payload


@pytest.mark.parametrize(
    "headers",
    [{}, {"a": "b"}, {"content-type": "text/plain", "x": ""}, {"ключ": "值 \x00 \"'\\"}],
    ids=["none", "one", "two", "unicode-nul-quotes"],
)
async def test_every_field_roundtrips(sink: Sink, headers: dict[str, str]) -> None:
    envelope = Envelope(
        id=IdGenerator().next(),
        room="lobby",
        origin="node-ü",
        ts=1_712_345_678.123456,
        payload=b"p",
        headers=headers,
        persist=True,
    )
    await sink.write([envelope])
    assert await sink.history("lobby") == [envelope]


async def test_persist_comes_back_true(sink: Sink) -> None:
    [envelope] = envelopes("lobby", 1)
    assert envelope.persist is False
    await sink.write([envelope])
    [stored] = await sink.history("lobby")
    assert stored.persist is True


# --- property: random interleavings -------------------------------------------------------

_POOL_SIZE = 40


@settings(
    max_examples=30,
    deadline=None,
    # The sink is shared by all examples on purpose (a new database per example would be slow);
    # each example writes to its own room, so examples cannot see each other.
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    batches=st.lists(
        st.lists(st.integers(0, _POOL_SIZE - 1), min_size=1, max_size=15), min_size=1, max_size=6
    ),
    concurrent=st.booleans(),
    cut=st.integers(-1, _POOL_SIZE - 1),
)
async def test_random_interleaved_writes_store_each_id_once(
    sink: Sink, batches: list[list[int]], concurrent: bool, cut: int
) -> None:
    # Fresh ids and room per example: ids are unique across rooms, and the sink outlives examples.
    pool = sorted(IdGenerator().next() for _ in range(_POOL_SIZE))
    room = f"prop-{uuid.uuid4().hex}"
    by_index = {
        i: Envelope(id=pool[i], room=room, origin="n", ts=float(i), payload=bytes([i]))
        for batch in batches
        for i in batch
    }
    inserted: list[int] = []

    async def write(batch: list[int]) -> None:
        inserted.append(await sink.write([by_index[i] for i in batch]))

    if concurrent:
        async with anyio.create_task_group() as tg:
            for batch in batches:
                tg.start_soon(write, batch)
    else:
        for batch in batches:
            await write(batch)

    distinct = sorted(pool[i] for i in by_index)
    assert sum(inserted) == len(distinct)
    assert await sink.count(room) == len(distinct)
    after = "" if cut < 0 else pool[cut]
    assert ids(await sink.history(room, after=after, limit=10_000)) == [
        i for i in distinct if i > after
    ]
    assert ids(await sink.history(room, limit=10_000)) == distinct


# --- lifecycle and schema -----------------------------------------------------------------


async def test_schema_version_is_recorded(store: Store, sink: Sink) -> None:
    assert await store.read_schema_version() == str(SCHEMA_VERSION)


async def test_restart_keeps_the_data(store: Store) -> None:
    batch = envelopes("lobby", 5)
    async with store.make() as sink:
        await sink.write(batch)
    async with store.make() as sink:
        assert ids(await sink.history("lobby")) == ids(batch)
    assert await store.read_schema_version() == str(SCHEMA_VERSION)


async def test_a_newer_schema_version_is_refused(store: Store) -> None:
    async with store.make():
        pass
    await store.write_schema_version(str(SCHEMA_VERSION + 1))
    with pytest.raises(SinkError, match=rf"schema version {SCHEMA_VERSION + 1}\b.*upgrade"):
        await store.make().start()
    # Refusing must not touch the recorded version.
    assert await store.read_schema_version() == str(SCHEMA_VERSION + 1)


async def test_an_unreadable_schema_version_is_refused(store: Store) -> None:
    async with store.make():
        pass
    await store.write_schema_version("one")
    with pytest.raises(SinkError, match="unreadable schema version"):
        await store.make().start()


async def test_concurrent_first_starts_create_the_schema_once(store: Store) -> None:
    sinks = [store.make() for _ in range(4)]
    async with anyio.create_task_group() as tg:
        for s in sinks:
            tg.start_soon(s.start)
    try:
        await sinks[0].write(envelopes("lobby", 2))
        assert [await s.count() for s in sinks] == [2, 2, 2, 2]
    finally:
        for s in sinks:
            await s.aclose()


async def test_use_outside_start_and_aclose_raises_sink_error(store: Store) -> None:
    sink = store.make()
    with pytest.raises(SinkError, match="not started"):
        await sink.count()
    await sink.start()
    with pytest.raises(SinkError, match="once"):
        await sink.start()
    await sink.aclose()
    await sink.aclose()
    with pytest.raises(SinkError, match="not started"):
        await sink.write(envelopes("lobby", 1))
    with pytest.raises(SinkError):
        await sink.start()


@pytest.mark.parametrize("prefix", ["", "Upper", "1abc", "a-b", 'x"; drop', "é", "a" * 41, 5])
def test_a_bad_table_prefix_is_refused(prefix: object) -> None:
    with pytest.raises(ConfigurationError, match="table_prefix"):
        SQLiteSink(":memory:", table_prefix=prefix)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="table_prefix"):
        PostgresSink("postgresql://u@h/db", table_prefix=prefix)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="table_prefix"):
        MySQLSink("mysql://u@h/db", table_prefix=prefix)  # type: ignore[arg-type]


@pytest.mark.parametrize(("low", "high"), [(2, 1), (-1, 4), (0, 0), (1, 0)])
def test_an_impossible_pool_size_is_refused(low: int, high: int) -> None:
    with pytest.raises(ConfigurationError, match="min_pool_size"):
        PostgresSink("postgresql://u@h/db", min_pool_size=low, max_pool_size=high)
    with pytest.raises(ConfigurationError, match="min_pool_size"):
        MySQLSink("mysql://u@h/db", min_pool_size=low, max_pool_size=high)


@pytest.mark.parametrize(("low", "high"), [(0, 1), (1, 1), (4, 4)])
def test_a_possible_pool_size_is_taken(low: int, high: int) -> None:
    pg = PostgresSink("postgresql://u@h/db", min_pool_size=low, max_pool_size=high)
    my = MySQLSink("mysql://u@h/db", min_pool_size=low, max_pool_size=high)
    assert (
        (pg.min_pool_size, pg.max_pool_size) == (my.min_pool_size, my.max_pool_size) == (low, high)
    )


# --- backend specifics --------------------------------------------------------------------


async def test_sqlite_file_is_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "wal.db"
    async with SQLiteSink(path):
        pass
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    finally:
        conn.close()


async def test_sqlite_sinks_opening_a_new_file_together(tmp_path: Path) -> None:
    # Switching a fresh file to WAL fails at once with "database is locked" while another
    # connection holds it, whatever the busy timeout; start() must wait its turn instead.
    for n in range(40):  # a race: several rounds make a regression fail reliably
        sinks = [SQLiteSink(tmp_path / f"{n}.db") for _ in range(8)]
        async with AsyncExitStack() as stack:
            for sink in sinks:
                stack.push_async_callback(sink.aclose)
            async with anyio.create_task_group() as tg:
                for sink in sinks:
                    tg.start_soon(sink.start)
            assert [await sink.count() for sink in sinks] == [0] * 8


async def test_sqlite_in_memory_works() -> None:
    async with SQLiteSink(":memory:") as sink:
        batch = envelopes("lobby", 3)
        assert await sink.write(batch) == 3
        assert await sink.history("lobby") == [
            msgspec.structs.replace(e, persist=True) for e in batch
        ]


async def test_sqlite_table_prefixes_share_a_file(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    async with SQLiteSink(path, table_prefix="a") as a, SQLiteSink(path, table_prefix="b") as b:
        await a.write(envelopes("lobby", 2))
        assert (await a.count(), await b.count()) == (2, 0)


async def test_sqlite_unopenable_path_raises_sink_error(tmp_path: Path) -> None:
    with pytest.raises(SinkError) as info:
        await SQLiteSink(tmp_path / "missing-dir" / "x.db").start()
    assert isinstance(info.value.__cause__, sqlite3.Error)


async def test_postgres_unreachable_raises_sink_error() -> None:
    sink = PostgresSink("postgresql://postgres@127.0.0.1:1/test", connect_timeout=5)
    with pytest.raises(SinkError, match=r"cannot reach PostgreSQL at 127\.0\.0\.1:1: ") as info:
        await sink.start()
    assert type(info.value) is SinkError
    assert isinstance(info.value.__cause__, OSError)


async def test_postgres_server_errors_are_mapped(
    postgres_dsn: str, pg_prefix: str, pg: PgFetch
) -> None:
    import asyncpg

    async with PostgresSink(postgres_dsn, table_prefix=pg_prefix) as sink:
        await pg(f"DROP TABLE {pg_prefix}_messages")
        with pytest.raises(SinkError) as info:
            await sink.write(envelopes("lobby", 1))
        assert isinstance(info.value.__cause__, asyncpg.UndefinedTableError)


async def test_postgres_orders_ids_bytewise_whatever_the_database_locale(
    postgres_dsn: str, pg_prefix: str, pg: PgFetch
) -> None:
    # The test database may well use the C locale, where the contract tests above would pass
    # without COLLATE "C"; so check the columns themselves.
    async with PostgresSink(postgres_dsn, table_prefix=pg_prefix):
        rows = await pg(
            "SELECT column_name, collation_name FROM information_schema.columns "
            "WHERE table_name = $1 AND column_name IN ('id', 'room')",
            f"{pg_prefix}_messages",
        )
    assert {r["column_name"]: r["collation_name"] for r in rows} == {"id": "C", "room": "C"}


async def test_mysql_unreachable_raises_sink_error() -> None:
    sink = MySQLSink("mysql://root:hunter2@127.0.0.1:1/test", connect_timeout=5)
    with pytest.raises(SinkError, match=r"cannot reach MySQL at 127\.0\.0\.1:1: ") as info:
        await sink.start()
    assert type(info.value) is SinkError
    assert "hunter2" not in str(info.value) and "hunter2" not in repr(sink)


async def test_mysql_restart_logs_no_warning(
    mysql_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """asyncmy logs each server note as a WARNING; a start on existing tables makes none."""
    from .conftest import MYSQL_URL

    for _ in range(2):
        async with MySQLSink(MYSQL_URL, table_prefix=mysql_prefix) as sink:
            await sink.write(envelopes("lobby", 2))
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


async def test_mysql_server_errors_are_mapped(mysql_prefix: str) -> None:
    from asyncmy.errors import ProgrammingError

    from .conftest import MYSQL_URL, mysql_fetch

    async with MySQLSink(MYSQL_URL, table_prefix=mysql_prefix) as sink:
        await mysql_fetch(f"DROP TABLE {mysql_prefix}_messages")
        with pytest.raises(SinkError) as info:
            await sink.write(envelopes("lobby", 1))
        # A missing table is an outage to report, not a refusal of the rows.
        assert type(info.value) is SinkError
        assert isinstance(info.value.__cause__, ProgrammingError)


@pytest.mark.parametrize(
    "field",
    ["room", "origin", "id"],
)
async def test_mysql_refuses_values_too_long_and_writes_none_of_the_batch(
    mysql_prefix: str, field: str
) -> None:
    """Strict mode: a value too long for its column is refused (error 1406), never truncated;
    the rest of the batch is not written either, and written alone it is stored."""
    from .conftest import MYSQL_URL

    good = envelopes("lobby", 3)
    values = {"room": "\U0001f389" * 701, "origin": "o" * 70_000, "id": "z" * 256}
    fields = {"id": "zz", "room": "lobby", "origin": "n", **{field: values[field]}}
    bad = Envelope(ts=0.0, payload=b"", **fields)
    async with MySQLSink(MYSQL_URL, table_prefix=mysql_prefix) as sink:
        with pytest.raises(SinkRefused, match="1406") as info:
            await sink.write([*good, bad])
        assert await sink.count() == 0
        assert await sink.write(good) == 3
        # At the limit it fits: 700 four-byte characters is 2,800 bytes.
        edge = Envelope(id="y" * 255, room="\U0001f389" * 700, origin="n", ts=0.0, payload=b"")
        assert await sink.write([edge]) == 1
        assert [e.id for e in await sink.history(edge.room)] == [edge.id]
    assert info.value.__cause__ is not None


async def test_mysql_refuses_a_message_larger_than_the_server_takes(mysql_prefix: str) -> None:
    """Past max_allowed_packet (16 MiB here) the server breaks the connection mid-statement
    ("Packet sequence number wrong"): a plain SinkError, which a worker would retry for ever.
    It is refused up front instead; a large message within the bound is stored."""
    from .conftest import MYSQL_URL, mysql_fetch

    [(max_packet,)] = await mysql_fetch("SELECT @@max_allowed_packet")
    async with MySQLSink(MYSQL_URL, table_prefix=mysql_prefix) as sink:
        [huge] = envelopes("lobby", 1, payload=bytes(int(max_packet) + 1))
        with pytest.raises(SinkRefused, match="max_allowed_packet"):
            await sink.write([huge, *envelopes("lobby", 2)])
        assert await sink.count() == 0
        # All NUL, the worst case of escaping (each byte doubled), just under the bound.
        [large] = envelopes("lobby", 1, payload=bytes((int(max_packet) - 1_200_000) // 2))
        assert await sink.write([large, *envelopes("lobby", 2)]) == 3
        [stored] = await sink.history("lobby", limit=1, before=large.id + "0")
        assert stored.payload == large.payload


async def test_mysql_a_lost_connection_is_an_outage_and_the_sink_recovers(
    mysql_prefix: str,
) -> None:
    from .conftest import MYSQL_URL, mysql_fetch

    async with MySQLSink(MYSQL_URL, table_prefix=mysql_prefix, max_pool_size=1) as sink:
        await sink.write(envelopes("lobby", 1))
        # The server ends the sink's (only) connection behind its back.
        [(conn_id,)] = await mysql_fetch(
            "SELECT id FROM information_schema.processlist WHERE info IS NULL AND db = 'test' "
            "AND id <> CONNECTION_ID() ORDER BY time LIMIT 1"
        )
        await mysql_fetch(f"KILL CONNECTION {int(conn_id)}")
        batch = envelopes("lobby", 5)
        outcomes: list[object] = []
        for _ in range(3):  # the first try may meet the dead connection; a retry must work
            try:
                outcomes.append(await sink.write(batch))
                break
            except SinkError as exc:
                assert type(exc) is SinkError, exc  # transient, not SinkRefused
                outcomes.append(exc)
        assert outcomes[-1] == 5, outcomes
        assert await sink.count() == 6


async def test_mysql_a_write_stuck_behind_a_lock_is_an_outage(mysql_prefix: str) -> None:
    """Another transaction holds one of the batch's ids: the write waits for the lock until
    its command timeout, fails as a plain SinkError (worth retrying), writes nothing, and the
    retry after the lock is gone stores the batch."""
    from .conftest import MYSQL_URL, mysql_connect

    batch = envelopes("lobby", 50)
    async with MySQLSink(MYSQL_URL, table_prefix=mysql_prefix, command_timeout=1.0) as sink:
        holder = await mysql_connect()
        try:
            async with holder.cursor() as cur:
                await cur.execute("BEGIN")
                await cur.execute(
                    f"INSERT INTO {mysql_prefix}_messages (id, room, origin, ts, payload, "
                    "headers) VALUES (%s, 'lobby', 'x', 0, '', '{}')",
                    (batch[25].id,),
                )
            with pytest.raises(SinkError) as info:
                await sink.write(batch)
            assert type(info.value) is SinkError, info.value
            async with holder.cursor() as cur:
                await cur.execute("ROLLBACK")
        finally:
            await holder.ensure_closed()
        assert await sink.count() == 0
        with anyio.fail_after(20):
            while True:  # the server may still be finishing the abandoned statement
                try:
                    assert await sink.write(batch) == 50
                    break
                except SinkError:
                    await anyio.sleep(0.2)
        assert [e.id for e in await sink.history("lobby", limit=100)] == ids(batch)


def test_mysql_error_numbers_are_classified() -> None:
    """The table behind the classification: values refused, the rest transient."""
    from asyncmy import errors

    from roomrouter.storage.mysql import _refused

    refused = {
        1048: "Column cannot be null",
        1264: "Out of range value",
        1366: "Incorrect string value",
        1406: "Data too long",
        1292: "Truncated incorrect value",
    }
    transient = {
        1205: "Lock wait timeout exceeded",
        1213: "Deadlock found",
        2013: "Lost connection",
        2006: "MySQL server has gone away",
        1146: "Table doesn't exist",
    }
    for code, text in refused.items():
        assert _refused(errors.DataError(code, text)), code
    for code, text in transient.items():
        assert not _refused(errors.OperationalError(code, text)), code
    assert _refused(UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed"))


async def test_mysql_a_cancelled_write_is_committed_whole_or_not_at_all(mysql_prefix: str) -> None:
    """Cancelled at many points of a batch large enough to take several INSERT statements:
    each time either all of it is stored or none; a partial commit would show as a later
    write of the same batch inserting some but not all."""
    from .conftest import MYSQL_URL

    async with MySQLSink(MYSQL_URL, table_prefix=mysql_prefix) as sink:
        seen: set[int] = set()
        for n, delay in enumerate([0.0, 0.002, 0.01, 0.03, 0.08, 0.15, 0.25, 0.4, 0.6, 3.0]):
            batch = envelopes(f"room-{n}", 12_000, payload=bytes(200))
            with anyio.move_on_after(delay):
                await sink.write(batch)
            again = await sink.write(batch)
            assert again in (0, len(batch)), (delay, again)
            seen.add(again)
            assert await sink.count(f"room-{n}") == len(batch)
    # Both outcomes happened, so the cancellations landed inside the write.
    assert seen == {0, len(batch)}, seen


async def test_mysql_names_and_payloads_roundtrip(mysql_prefix: str) -> None:
    """utf8mb4 end to end (emoji in room, origin, headers), binary payloads, and byte-exact
    keys: trailing spaces and case make different rooms and ids."""
    from .conftest import MYSQL_URL

    rooms = ["\U0001f389 party", "\U0001f389 party ", "Party", "party", "\u00e9"]
    items = [
        Envelope(
            id=f"{IdGenerator().next()}",
            room=room,
            origin="node-\U0001f680",
            ts=1.5,
            payload=bytes(range(256)) + "\U0001f600".encode(),
            headers={"\U0001f511": "\U0001f512 \x00"},
            persist=True,
        )
        for room in rooms
    ]
    items.append(msgspec.structs.replace(items[0], id=items[0].id + " "))
    async with MySQLSink(MYSQL_URL, table_prefix=mysql_prefix) as sink:
        assert await sink.write(items) == len(items)
        for room in rooms:
            stored = await sink.history(room)
            assert stored == [e for e in items if e.room == room]


# --- URLs and exports ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("sqlite:///relative.db", "relative.db"),
        ("sqlite:///dir/rel.db", "dir/rel.db"),
        ("sqlite:////abs/path.db", "/abs/path.db"),
        ("sqlite:///my%20file.db", "my file.db"),
        ("sqlite://:memory:", ":memory:"),
        ("sqlite:///:memory:", ":memory:"),
        ("SQLITE:///x.db", "x.db"),
    ],
)
def test_sqlite_urls(url: str, path: str) -> None:
    sink = sink_from_url(url)
    assert isinstance(sink, SQLiteSink)
    assert (sink.path, sink.table_prefix) == (path, "roomrouter")


def test_sqlite_url_table_prefix() -> None:
    sink = sink_from_url("sqlite:///x.db?table_prefix=chat")
    assert isinstance(sink, SQLiteSink)
    assert (sink.path, sink.table_prefix) == ("x.db", "chat")


@pytest.mark.parametrize(
    ("url", "dsn", "prefix"),
    [
        ("postgresql://u@h:5432/db", "postgresql://u@h:5432/db", "roomrouter"),
        ("postgres://u@h/db?table_prefix=t1", "postgres://u@h/db", "t1"),
        (
            "postgresql://u@h/db?sslmode=disable&table_prefix=t2",
            "postgresql://u@h/db?sslmode=disable",
            "t2",
        ),
    ],
)
def test_postgres_urls(url: str, dsn: str, prefix: str) -> None:
    sink = sink_from_url(url)
    assert isinstance(sink, PostgresSink)
    assert (sink.dsn, sink.table_prefix) == (dsn, prefix)


@pytest.mark.parametrize(
    "url",
    [
        "",
        "messages.db",
        "mysqlx://u@h/db",
        "mysql://u@h",
        "mysql://u@h/",
        "mysql://u@h:port/db",
        "mysql://u@h/db?ssl=1",
        "mariadb://u@h/db?table_prefix=Bad",
        "mysql://u@h/db?table_prefix=a&table_prefix=b",
        "sqlite://",
        "sqlite:///",
        "sqlite://host/x.db",
        "sqlite:///x.db?table_prefix=Bad-Name",
        "sqlite:///x.db?mode=ro",
        "sqlite:///x.db?table_prefix=a&table_prefix=b",
        "postgresql://u@h:port/db",
        "postgresql://u@h/db?table_prefix=x;y",
    ],
)
def test_bad_urls_raise_configuration_error(url: str) -> None:
    with pytest.raises(ConfigurationError):
        sink_from_url(url)


@pytest.mark.parametrize(
    ("url", "connect", "prefix"),
    [
        (
            "mysql://app:s%40cret@db.local:3307/chat",
            {"host": "db.local", "port": 3307, "user": "app", "password": "s@cret", "db": "chat"},
            "roomrouter",
        ),
        (
            "MariaDB://root@127.0.0.1/test?table_prefix=t1",
            {"host": "127.0.0.1", "port": 3306, "user": "root", "password": "", "db": "test"},
            "t1",
        ),
    ],
)
def test_mysql_urls(url: str, connect: dict[str, object], prefix: str) -> None:
    sink = sink_from_url(url)
    assert isinstance(sink, MySQLSink)
    assert (sink._connect, sink.table_prefix) == (connect, prefix)
    assert "cret" not in repr(sink)


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u:hunter2@h:port/db",
        "mysql://u:hunter2@h:port/db",
        "mysql://u:hunter2@h/db?ssl=1",
        "mysql://u:hunter2@h/",
        "mariadb://u:hunter2@h/db?table_prefix=Bad",
    ],
)
def test_error_messages_do_not_repeat_a_password(url: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        sink_from_url(url)
    assert "hunter2" not in str(info.value)


def test_a_missing_asyncpg_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "asyncpg", None)  # makes `import asyncpg` fail
    monkeypatch.delitem(sys.modules, "roomrouter.storage.postgres")
    with pytest.raises(MissingDependency, match=r'pip install "roomrouter\[postgres\]"'):
        sink_from_url("postgresql://u@h/db")
    assert isinstance(sink_from_url("sqlite:///x.db"), SQLiteSink)


def test_a_missing_asyncmy_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "asyncmy", None)  # makes `import asyncmy` fail
    monkeypatch.delitem(sys.modules, "roomrouter.storage.mysql", raising=False)
    with pytest.raises(MissingDependency, match=r'pip install "roomrouter\[mysql\]"'):
        sink_from_url("mysql://u@h/db")
    with pytest.raises(MissingDependency, match=r'pip install "roomrouter\[mysql\]"'):
        roomrouter.storage.MySQLSink  # noqa: B018
    assert isinstance(sink_from_url("sqlite:///x.db"), SQLiteSink)


def test_importing_storage_does_not_import_asyncmy() -> None:
    code = (
        "import sys, roomrouter.storage as s; s.sink_from_url('sqlite://:memory:'); "
        "assert 'asyncmy' not in sys.modules, 'asyncmy imported'; "
        "s.MySQLSink; assert 'asyncmy' in sys.modules"
    )
    src = Path(roomrouter.storage.__file__).parents[2]
    subprocess.run(
        [sys.executable, "-W", "error", "-c", code],
        check=True,
        env={"PYTHONPATH": str(src)},
        timeout=30,
    )


def test_importing_storage_does_not_import_asyncpg() -> None:
    code = (
        "import sys, roomrouter.storage as s; s.sink_from_url('sqlite://:memory:'); "
        "assert 'asyncpg' not in sys.modules, 'asyncpg imported'; "
        "s.PostgresSink; assert 'asyncpg' in sys.modules"
    )
    src = Path(roomrouter.storage.__file__).parents[2]
    subprocess.run(
        [sys.executable, "-W", "error", "-c", code],
        check=True,
        env={"PYTHONPATH": str(src)},
        timeout=30,
    )


def test_exports() -> None:
    names = roomrouter.storage.__all__
    assert names == sorted(names)
    assert {"MySQLSink", "PostgresSink", "SQLiteSink", "Sink", "sink_from_url"} <= set(names)
    for name in names:
        assert getattr(roomrouter.storage, name) is not None
    with pytest.raises(AttributeError):
        roomrouter.storage.NoSuchThing  # noqa: B018


async def test_concurrent_overlapping_batches_do_not_deadlock(store: Store) -> None:
    # Writers holding the same ids in different orders would lock them in different orders (a
    # deadlock in PostgreSQL) unless the sink orders each batch itself. Four sinks whose
    # connections are open and whose statement is prepared (by a first write), so that the
    # four statements really run at the same time; a few rounds, as it is a race.
    async with AsyncExitStack() as stack:
        sinks = [await stack.enter_async_context(store.make()) for _ in range(4)]
        for n, sink in enumerate(sinks):
            await sink.write(envelopes(f"warm-up-{n}", 1))

        async def write(sink: Sink, items: list[Envelope]) -> None:
            inserted.append(await sink.write(items))

        for rnd in range(3):
            batch = envelopes(f"lobby-{rnd}", 5000, payload=bytes(200))
            orders = [batch, batch[::-1], batch[1::2] + batch[::2], batch[::2][::-1] + batch[1::2]]
            inserted: list[int] = []
            async with anyio.create_task_group() as tg:
                for sink, items in zip(sinks, orders, strict=True):
                    tg.start_soon(write, sink, items)
            assert sorted(inserted) == [0, 0, 0, len(batch)]
            stored = await sinks[0].history(f"lobby-{rnd}", after="", limit=10_000)
            assert ids(stored) == ids(batch)
