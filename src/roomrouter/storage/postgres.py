"""PostgreSQL sink, on an asyncpg connection pool (asyncio only: asyncpg has no trio support).

A batch is written by one statement in one round trip: the columns travel as arrays and
``INSERT ... SELECT FROM unnest(...) ON CONFLICT (id) DO NOTHING`` inserts the new ids. A single
statement is its own transaction, so there is no ``BEGIN``/``COMMIT`` to pay for. The
alternative, ``COPY`` into a temporary staging table and ``INSERT ... SELECT`` from it inside a
transaction, was measured on loopback with 200-byte payloads: no faster for batches of 500
(within noise, ~70k messages/s either way) and a quarter slower for batches of 100, with more
moving parts, so unnest it is.

Ids and rooms are stored with ``COLLATE "C"`` so that ``ORDER BY id`` and ``id > $1`` compare
bytes, as the contract requires, instead of following the database's locale (under which, for
instance, ``-`` may be ignored when comparing).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

import anyio

from .._envelope import Envelope
from .._errors import ConfigurationError, MissingDependency, SinkError, SinkRefused, unreachable
from .._urls import redact
from ._base import (
    DEAD_LETTER_COLUMNS,
    DEFAULT_TABLE_PREFIX,
    MESSAGE_COLUMNS,
    SCHEMA_VERSION,
    DeadLetter,
    Sink,
    check_history_limit,
    check_pool_sizes,
    check_schema_version,
    check_table_prefix,
    encode_headers,
    printable_reason,
    row_to_dead_letter,
    row_to_envelope,
)

try:
    import asyncpg
except ImportError as exc:  # pragma: no cover - exercised in a test by hiding the module
    raise MissingDependency("postgres", "asyncpg") from exc

__all__ = ["PostgresSink"]


# Everything asyncpg raises: server errors, client/protocol errors, and the OSError /
# TimeoutError of a connection that cannot be made or is lost. UnicodeError: a str holding a
# lone surrogate cannot be encoded as UTF-8.
_DRIVER_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    OSError,
    TimeoutError,
    UnicodeError,
)

# What the server (or asyncpg encoding the arguments) raises about the *values* of a row:
# class 22 (data exception: NUL or an untranslatable character in text, a number out of
# range), class 23 (a constraint), 54 (a value too large for an index row). Retrying the
# same rows cannot succeed; a batch without them can.
_REFUSED: tuple[type[BaseException], ...] = (
    asyncpg.DataError,
    asyncpg.exceptions._base.DataError,
    asyncpg.IntegrityConstraintViolationError,
    asyncpg.ProgramLimitExceededError,
    UnicodeError,
)


class PostgresSink(Sink):
    """Stores envelopes in PostgreSQL, in ``<table_prefix>_messages`` and ``<table_prefix>_meta``.

    ``dsn`` is a libpq-style URL (``postgresql://user@host:5432/db``); the tables live in the
    connection's current schema (set ``search_path`` through the DSN to choose another).
    ``table_prefix`` isolates independent stores in one database, for instance one per test.
    ``connect_timeout`` bounds each connection attempt and ``command_timeout`` each statement
    (``None`` for no limit); the pool holds ``min_pool_size`` to ``max_pool_size`` connections.
    """

    name = "postgresql"

    def __init__(
        self,
        dsn: str,
        *,
        table_prefix: str = DEFAULT_TABLE_PREFIX,
        min_pool_size: int = 1,
        max_pool_size: int = 4,
        connect_timeout: float = 10.0,
        command_timeout: float | None = 30.0,
    ) -> None:
        check_pool_sizes(min_pool_size, max_pool_size)
        self.dsn = dsn
        self.table_prefix = check_table_prefix(table_prefix)
        self.min_pool_size = min_pool_size
        self.max_pool_size = max_pool_size
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self._messages = f'"{self.table_prefix}_messages"'
        self._meta = f'"{self.table_prefix}_meta"'
        self._dead = f'"{self.table_prefix}_dead_letters"'
        self._pool: Any = None
        self._started = False
        self._closed = False

    def __repr__(self) -> str:
        return f"<PostgresSink {redact(self.dsn)} table_prefix={self.table_prefix!r}>"

    async def start(self) -> None:
        if self._closed or self._started:
            raise SinkError("PostgresSink.start() may be called once, before aclose()")
        self._started = True
        try:
            self._pool = await self._open()
        finally:
            self._started = self._pool is not None  # after a failure start() may try again

    async def _open(self) -> Any:
        try:
            pool = await asyncpg.create_pool(
                self.dsn,
                min_size=self.min_pool_size,
                max_size=self.max_pool_size,
                timeout=self.connect_timeout,
                command_timeout=self.command_timeout,
            )
        except asyncpg.ClientConfigurationError as exc:
            raise ConfigurationError(f"invalid PostgreSQL DSN: {exc}") from exc
        except _DRIVER_ERRORS as exc:
            parts = urlsplit(self.dsn)
            host, port = parts.hostname or "localhost", parts.port or 5432
            user = unquote(parts.username) if parts.username else None
            raise unreachable("PostgreSQL", host, port, exc, user=user, error=SinkError) from exc
        try:
            async with pool.acquire() as conn, conn.transaction():
                await self._ensure_schema(conn)
        except BaseException as exc:
            pool.terminate()  # not close(): it awaits, and this may be a cancellation
            if isinstance(exc, _DRIVER_ERRORS):
                raise SinkError(f"cannot set up PostgreSQL tables: {_describe(exc)}") from exc
            raise
        return pool

    async def aclose(self) -> None:
        self._closed = True
        pool, self._pool = self._pool, None
        if pool is None:
            return
        # Shielded: a cancelled aclose() must still release the server connections. close()
        # waits for calls in flight to give their connection back.
        with anyio.CancelScope(shield=True):
            try:
                await pool.close()
            except _DRIVER_ERRORS as exc:
                pool.terminate()
                raise SinkError(f"error closing the PostgreSQL pool: {_describe(exc)}") from exc

    async def write(self, envelopes: Sequence[Envelope]) -> int:
        if not envelopes:
            return 0
        # Sorted by id: concurrent writers of overlapping batches then lock the conflicting
        # index entries in the same order and cannot deadlock each other.
        batch = sorted(envelopes, key=lambda e: e.id)
        sql = (
            f"INSERT INTO {self._messages} ({MESSAGE_COLUMNS}) "
            "SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::float8[], "
            "$5::bytea[], $6::text[]) ON CONFLICT (id) DO NOTHING"
        )
        status = await self._execute(
            "execute",
            sql,
            [e.id for e in batch],
            [e.room for e in batch],
            [e.origin for e in batch],
            [e.ts for e in batch],
            [e.payload for e in batch],
            [encode_headers(e.headers) for e in batch],
        )
        # The command tag of an INSERT is "INSERT <oid> <rows>".
        return int(str(status).rsplit(" ", 1)[1])

    async def write_dead_letters(self, letters: Sequence[DeadLetter]) -> None:
        if not letters:
            return
        sql = (
            f"INSERT INTO {self._dead} ({DEAD_LETTER_COLUMNS}) "
            "SELECT * FROM unnest($1::bytea[], $2::text[], $3::text[], $4::float8[])"
        )
        await self._execute(
            "execute",
            sql,
            [d.frame for d in letters],
            [printable_reason(d.reason) for d in letters],
            [printable_reason(d.worker, 200) for d in letters],
            [d.at for d in letters],
        )

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        check_history_limit(limit)
        sql = f"SELECT {DEAD_LETTER_COLUMNS} FROM {self._dead} ORDER BY seq LIMIT $1"
        rows = await self._execute("fetch", sql, limit)
        return [row_to_dead_letter(*row) for row in rows]

    async def history(
        self,
        room: str,
        *,
        before: str | None = None,
        after: str | None = None,
        limit: int = 50,
    ) -> list[Envelope]:
        check_history_limit(limit)
        sql, params = self._history_query(room, before=before, after=after, limit=limit)
        descending = after is None
        rows = await self._execute("fetch", sql, *params)
        if descending:
            rows.reverse()
        return [row_to_envelope(*row) for row in rows]

    def _history_query(
        self, room: str, *, before: str | None, after: str | None, limit: int
    ) -> tuple[str, list[Any]]:
        """The history statement and its parameters. Bounds are row comparisons on
        ``(room, id)`` and the order is ``room, id``: only the (room, id) index serves both,
        so the planner cannot walk the primary key and filter the other rooms out (which it
        prefers when ids are correlated with the heap, the usual case, at a cost of up to the
        number of rooms times the rows asked; docs/architecture.md)."""
        # Both ends as row comparisons on (room, id), which only that index evaluates: a
        # room filter next to a comparison of id alone lets the planner take the primary key
        # (it did so for `before`). The room's start is ''; its end, without `before`, is
        # what `room = $1` bounds.
        params: list[Any] = [room]
        if after is not None:
            params.append(after)
            where = [f"(room, id) > ($1, ${len(params)})"]
        else:
            where = ["(room, id) >= ($1, '')"]
        if before is not None:
            params.append(before)
            where.append(f"(room, id) < ($1, ${len(params)})")
        else:
            where.append("room = $1")
        params.append(limit)
        # Without `after` we want the newest `limit` rows: scan the index backwards, then put
        # the page back in ascending order.
        order = "room DESC, id DESC" if after is None else "room, id"
        sql = (
            f"SELECT {MESSAGE_COLUMNS} FROM {self._messages} WHERE {' AND '.join(where)} "
            f"ORDER BY {order} LIMIT ${len(params)}"
        )
        return sql, params

    async def count(self, room: str | None = None) -> int:
        if room is None:
            value = await self._execute("fetchval", f"SELECT count(*) FROM {self._messages}")
        else:
            sql = f"SELECT count(*) FROM {self._messages} WHERE room = $1"
            value = await self._execute("fetchval", sql, room)
        return int(value)

    async def latest_id(self, room: str) -> str | None:
        sql = f"SELECT id FROM {self._messages} WHERE room = $1 ORDER BY id DESC LIMIT 1"
        value = await self._execute("fetchval", sql, room)
        return None if value is None else str(value)

    async def _execute(self, method: str, sql: str, *args: Any) -> Any:
        """Run ``pool.<method>(sql, *args)``, mapping driver errors to SinkError."""
        pool = self._pool
        if pool is None:
            raise SinkError("the PostgreSQL sink is not started (or already closed)")
        try:
            return await getattr(pool, method)(sql, *args)
        except _REFUSED as exc:
            raise SinkRefused(f"PostgreSQL refused the data: {_describe(exc)}") from exc
        except _DRIVER_ERRORS as exc:
            raise SinkError(f"PostgreSQL: {_describe(exc)}") from exc

    @property
    def _room_index(self) -> str:
        return (
            f'CREATE INDEX IF NOT EXISTS "{self.table_prefix}_messages_room_id" '
            f"ON {self._messages} (room, id)"
        )

    async def _ensure_schema(self, conn: Any) -> None:
        # The advisory lock serialises concurrent first starts: CREATE TABLE IF NOT EXISTS alone
        # can still fail with a unique violation in pg_type when two sessions race.
        await conn.execute(
            "SELECT pg_advisory_xact_lock(hashtext($1))", f"roomrouter schema {self._meta}"
        )
        await conn.execute(
            f"CREATE TABLE IF NOT EXISTS {self._meta} (key text PRIMARY KEY, value text NOT NULL)"
        )
        # Outside the versioned layout: added after version 1, created on every start so older
        # databases get it too (older code ignores it).
        await conn.execute(
            f"CREATE TABLE IF NOT EXISTS {self._dead} (seq bigserial PRIMARY KEY, "
            "frame bytea NOT NULL, reason text NOT NULL, worker text NOT NULL, "
            "dead_at double precision NOT NULL)"
        )
        value = await conn.fetchval(f"SELECT value FROM {self._meta} WHERE key = 'schema_version'")
        if value is not None:
            check_schema_version(value, f"PostgreSQL table {self._meta}")
            # On every start: history reads need it (see _history_query), and a database
            # whose index was lost or never made gets it back.
            await conn.execute(self._room_index)
            return
        await conn.execute(
            f"CREATE TABLE IF NOT EXISTS {self._messages} ("
            'id text COLLATE "C" PRIMARY KEY, room text COLLATE "C" NOT NULL, '
            "origin text NOT NULL, ts double precision NOT NULL, payload bytea NOT NULL, "
            "headers text NOT NULL, stored_at timestamptz NOT NULL DEFAULT now())"
        )
        await conn.execute(self._room_index)
        await conn.execute(
            f"INSERT INTO {self._meta} (key, value) VALUES ('schema_version', $1)",
            str(SCHEMA_VERSION),
        )


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
