"""MySQL and MariaDB sink, on an asyncmy connection pool (asyncio only, as asyncmy is).

asyncmy, not aiomysql. Both are asyncio ports of PyMySQL's protocol and write a batch at
about the same rate here, asyncmy ahead on the largest batches (docs/architecture.md, "The
MySQL / MariaDB sink", has the figures). What decides: asyncmy's protocol code is compiled and it is
released regularly, with type hints; aiomysql's latest release still imports, from PyMySQL
1.2, a placeholder left where a bytes escaper used to be, so any bytes parameter (every
payload) fails with ``TypeError`` unless PyMySQL is held below 1.2.

A batch is one multi-row ``INSERT ... ON DUPLICATE KEY UPDATE id = id`` inside ``BEGIN`` /
``COMMIT``. Not ``INSERT IGNORE``: in strict mode it turns *every* error into a warning, so a
value too long would be truncated and stored instead of refused. The no-op update counts 0
affected rows, so the affected-row count is the number of new ids.

Ids and rooms are ``VARBINARY`` (UTF-8 bytes): the comparisons and ``ORDER BY`` then follow
byte order, as the contract requires, with no collation and no trailing-space padding (under
``utf8mb4_bin`` ``'a'`` and ``'a '`` are the same key). The (room, id) index bounds their
lengths: an id of at most 255 bytes and a room name of at most 2,800 bytes of UTF-8 (any room
of up to 700 characters; longer ones only if mostly ASCII). A longer one is refused
(:class:`~roomrouter.SinkRefused`) and lands in the dead letters, as does a message that
could exceed the server's ``max_allowed_packet`` once escaped. Each connection runs in strict
mode (``STRICT_ALL_TABLES``), so a bad value is an error, never a silent truncation.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, TypeVar
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
    import asyncmy
    from asyncmy import errors as asyncmy_errors
except ImportError as exc:  # pragma: no cover - exercised in a test by hiding the module
    raise MissingDependency("mysql", "asyncmy") from exc

__all__ = ["MySQLSink"]

_T = TypeVar("_T")

_SQL_MODE: Final = "STRICT_ALL_TABLES,NO_ENGINE_SUBSTITUTION"

# Longest id and room, in bytes: together they fit InnoDB's 3,072-byte index key.
MAX_ID_BYTES: Final = 255
MAX_ROOM_BYTES: Final = 2800

# asyncmy groups the rows of executemany into statements of about this many bytes, so a row
# may share its statement with up to this much of others; plus the statement's own text.
_STATEMENT_SLACK: Final = 1_024_000 + 64 * 1024

# Server error numbers about the *values* of a row: retrying the same rows cannot succeed, a
# batch without them can. 1048 NULL in a NOT NULL column, 1153 a packet (a row) larger than
# max_allowed_packet, 1264 out of range, 1265 data truncated, 1292 / 1366 incorrect value
# (an invalid string for the column's character set), 1300 invalid character string, 1367
# illegal value for the type, 1406 data too long, 1690 value out of range, 3140 invalid JSON,
# 4025 a CHECK constraint. Everything else (connection lost or refused, 1205 lock wait
# timeout, 1213 deadlock, 1040 too many connections, a missing table) is an outage.
_REFUSED_ERRNOS: Final = frozenset(
    {1048, 1153, 1264, 1265, 1292, 1300, 1366, 1367, 1406, 1690, 3140, 4025}
)

# Everything the driver raises: server errors, client/protocol errors, and the OSError /
# TimeoutError / EOF of a connection that cannot be made or is lost. UnicodeError: a str
# holding a lone surrogate cannot be encoded as UTF-8.
_DRIVER_ERRORS: tuple[type[BaseException], ...] = (
    asyncmy_errors.MySQLError,
    OSError,
    TimeoutError,
    EOFError,
    UnicodeError,
)


class MySQLSink(Sink):
    """Stores envelopes in MySQL or MariaDB, in ``<table_prefix>_messages``, ``_meta`` and
    ``_dead_letters`` (InnoDB, utf8mb4).

    ``url`` is ``mysql://user:password@host:3306/database`` (``mariadb://`` too); the password
    and user are percent-decoded. ``table_prefix`` isolates independent stores in one database.
    ``connect_timeout`` bounds each connection attempt and ``command_timeout`` each statement's
    answer (``None`` for no limit); the pool holds ``min_pool_size`` to ``max_pool_size``
    connections.
    """

    name = "mysql"

    def __init__(
        self,
        url: str,
        *,
        table_prefix: str = DEFAULT_TABLE_PREFIX,
        min_pool_size: int = 1,
        max_pool_size: int = 4,
        connect_timeout: float = 10.0,
        command_timeout: float | None = 30.0,
    ) -> None:
        check_pool_sizes(min_pool_size, max_pool_size)
        self.url = url
        self._connect = _connect_options(url)
        self.table_prefix = check_table_prefix(table_prefix)
        self.min_pool_size = min_pool_size
        self.max_pool_size = max_pool_size
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self._messages = f"`{self.table_prefix}_messages`"
        self._meta = f"`{self.table_prefix}_meta`"
        self._dead = f"`{self.table_prefix}_dead_letters`"
        self._room_index_name = f"{self.table_prefix}_messages_room_id"
        self._pool: Any = None
        self._max_row = 0  # bytes; set by start() from the server's max_allowed_packet
        self._started = False
        self._closed = False

    def __repr__(self) -> str:
        return f"<MySQLSink {redact(self.url)} table_prefix={self.table_prefix!r}>"

    async def start(self) -> None:
        if self._closed or self._started:
            raise SinkError("MySQLSink.start() may be called once, before aclose()")
        self._started = True
        try:
            self._pool = await self._open()
        finally:
            self._started = self._pool is not None  # after a failure start() may try again

    async def _open(self) -> Any:
        try:
            pool = await asyncmy.create_pool(
                minsize=self.min_pool_size,
                maxsize=self.max_pool_size,
                connect_timeout=self.connect_timeout,
                read_timeout=self.command_timeout,
                charset="utf8mb4",
                autocommit=True,  # reads hold no snapshot; writes say BEGIN themselves
                # Strict: a bad value is an error (SinkRefused), never a truncation. Not
                # asyncmy's sql_mode=, which it sends unquoted.
                init_command=f"SET SESSION sql_mode = '{_SQL_MODE}'",
                **self._connect,
            )
        except _DRIVER_ERRORS as exc:
            host, port, user = (
                self._connect["host"],
                self._connect["port"],
                self._connect.get("user"),
            )
            raise unreachable("MySQL", host, port, exc, user=user, error=SinkError) from exc
        try:
            await self._with_connection(pool, self._ensure_schema)
        except BaseException as exc:
            pool.terminate()  # not close() + wait_closed(): this may be a cancellation
            if isinstance(exc, _DRIVER_ERRORS):
                raise SinkError(f"cannot set up MySQL tables: {_describe(exc)}") from exc
            raise
        return pool

    async def aclose(self) -> None:
        self._closed = True
        pool, self._pool = self._pool, None
        if pool is None:
            return
        # Shielded: a cancelled aclose() must still release the server connections.
        with anyio.CancelScope(shield=True):
            pool.close()
            try:
                await pool.wait_closed()
            except _DRIVER_ERRORS as exc:
                pool.terminate()
                raise SinkError(f"error closing the MySQL pool: {_describe(exc)}") from exc

    async def write(self, envelopes: Sequence[Envelope]) -> int:
        if not envelopes:
            return 0
        # First occurrence of an id wins, and the batch is sorted by id: concurrent writers
        # of overlapping batches then lock the same keys in the same order (no deadlock).
        unique: dict[str, Envelope] = {}
        for envelope in envelopes:
            unique.setdefault(envelope.id, envelope)
        batch = [unique[key] for key in sorted(unique)]
        sql = (
            f"INSERT INTO {self._messages} ({MESSAGE_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s) "
            "ON DUPLICATE KEY UPDATE id = id"
        )

        async def insert(conn: Any) -> int:
            rows = [
                (_utf8(e.id), _utf8(e.room), e.origin, e.ts, e.payload, encode_headers(e.headers))
                for e in batch
            ]
            self._check_sizes(rows)
            await conn.begin()
            async with conn.cursor() as cur:
                # The driver folds the rows into multi-row INSERTs (several if they would
                # exceed its statement size); one transaction makes them one write.
                inserted = await cur.executemany(sql, rows)
            await conn.commit()
            return int(inserted or 0)

        return await self._run(insert)

    def _check_sizes(self, rows: Sequence[tuple[Any, ...]]) -> None:
        """Refuse a row the server could never take: a statement larger than its
        ``max_allowed_packet`` fails, and past 16 MiB (several protocol packets) it fails as a
        broken connection, which would otherwise be retried for ever. The bound is the
        escaped worst case (binary doubles, UTF-8 text up to 8 bytes a character), so the
        verdict depends on the sizes only, never on the bytes."""
        for row in rows:
            id_, room, origin, _, payload, headers = row
            worst = 2 * (len(id_) + len(room) + len(payload)) + 8 * (len(origin) + len(headers))
            if worst + 64 > self._max_row:
                raise SinkRefused(
                    f"MySQL refused the data: message {id_.decode()!r} with a "
                    f"{len(payload):,}-byte payload may exceed the server's max_allowed_packet "
                    f"({self._max_row + _STATEMENT_SLACK:,} bytes) once escaped; raise it to "
                    "store such messages"
                )

    async def write_dead_letters(self, letters: Sequence[DeadLetter]) -> None:
        if not letters:
            return
        sql = f"INSERT INTO {self._dead} ({DEAD_LETTER_COLUMNS}) VALUES (%s, %s, %s, %s)"
        rows = [
            (d.frame, printable_reason(d.reason), printable_reason(d.worker, 200), d.at)
            for d in letters
        ]

        async def insert(conn: Any) -> None:
            await conn.begin()
            async with conn.cursor() as cur:
                await cur.executemany(sql, rows)
            await conn.commit()

        await self._run(insert)

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        check_history_limit(limit)
        sql = f"SELECT {DEAD_LETTER_COLUMNS} FROM {self._dead} ORDER BY seq LIMIT %s"
        rows = await self._fetch(sql, (limit,))
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
        rows = list(await self._fetch(sql, params))
        if after is None:
            rows.reverse()
        return [
            row_to_envelope(
                bytes(r[0]).decode(), bytes(r[1]).decode(), str(r[2]), float(r[3]), r[4], str(r[5])
            )
            for r in rows
        ]

    def _history_query(
        self, room: str, *, before: str | None, after: str | None, limit: int
    ) -> tuple[str, tuple[Any, ...]]:
        """The history statement and its parameters: one range of the (room, id) index, read
        in its order. ``ORDER BY room, id`` with the room fixed is the index's own order, so
        no sort; ``FORCE INDEX`` keeps that plan whatever the table statistics say (the
        alternative, walking the primary key in id order and filtering the other rooms out,
        reads up to the number of rooms times the rows asked; docs/architecture.md)."""
        where = ["room = %s"]
        params: list[Any] = [_utf8(room)]
        if after is not None:
            where.append("id > %s")
            params.append(_utf8(after))
        if before is not None:
            where.append("id < %s")
            params.append(_utf8(before))
        params.append(limit)
        # Without `after` we want the newest `limit` rows: read the range backwards, then put
        # the page back in ascending order.
        order = "room DESC, id DESC" if after is None else "room, id"
        sql = (
            f"SELECT {MESSAGE_COLUMNS} FROM {self._messages} "
            f"FORCE INDEX (`{self._room_index_name}`) WHERE {' AND '.join(where)} "
            f"ORDER BY {order} LIMIT %s"
        )
        return sql, tuple(params)

    async def count(self, room: str | None = None) -> int:
        if room is None:
            rows = await self._fetch(f"SELECT count(*) FROM {self._messages}", ())
        else:
            sql = f"SELECT count(*) FROM {self._messages} WHERE room = %s"
            rows = await self._fetch(sql, (_utf8(room),))
        return int(rows[0][0])

    async def latest_id(self, room: str) -> str | None:
        sql = (
            f"SELECT id FROM {self._messages} FORCE INDEX (`{self._room_index_name}`) "
            "WHERE room = %s ORDER BY room DESC, id DESC LIMIT 1"
        )
        rows = await self._fetch(sql, (_utf8(room),))
        return bytes(rows[0][0]).decode() if rows else None

    async def _fetch(self, sql: str, params: Sequence[Any]) -> Sequence[Sequence[Any]]:
        async def fetch(conn: Any) -> Sequence[Sequence[Any]]:
            async with conn.cursor() as cur:
                await cur.execute(sql, params)
                rows: Sequence[Sequence[Any]] = await cur.fetchall()
            return rows

        return await self._run(fetch)

    async def _run(self, work: Callable[[Any], Awaitable[_T]]) -> _T:
        """Run ``work(connection)`` on a pooled connection, mapping driver errors."""
        pool = self._pool
        if pool is None:
            raise SinkError("the MySQL sink is not started (or already closed)")
        try:
            return await self._with_connection(pool, work)
        except _DRIVER_ERRORS as exc:
            if _refused(exc):
                raise SinkRefused(f"MySQL refused the data: {_describe(exc)}") from exc
            raise SinkError(f"MySQL: {_describe(exc)}") from exc

    @staticmethod
    async def _with_connection(pool: Any, work: Callable[[Any], Awaitable[_T]]) -> _T:
        conn = await pool.acquire()
        try:
            return await work(conn)
        except BaseException:
            # Failed or cancelled mid-exchange: the connection may hold an open transaction
            # or an answer not yet read, so it is closed, never reused. The server rolls back
            # whatever was not committed: a cancelled write is either committed whole (COMMIT
            # was sent) or not at all.
            conn.close()
            raise
        finally:
            pool.release(conn)

    async def _ensure_schema(self, conn: Any) -> None:
        async with conn.cursor() as cur:
            # Serialises concurrent first starts (server-wide named lock, freed when the
            # connection ends). CREATE TABLE IF NOT EXISTS is safe, but the version row and
            # the index check-then-create are not.
            await cur.execute("SELECT GET_LOCK(%s, %s)", (f"roomrouter:{self.table_prefix}", 30))
            [(locked,)] = await cur.fetchall()
            if locked != 1:
                raise SinkError(f"timed out waiting for the schema lock of {self._meta}")
            # asyncmy logs every server note as a WARNING: "table already exists" on each
            # start is not one.
            await cur.execute("SET SESSION sql_notes = 0")
            try:
                await self._create_tables(cur)
            finally:
                await cur.execute("SET SESSION sql_notes = 1")
                await cur.execute("SELECT RELEASE_LOCK(%s)", (f"roomrouter:{self.table_prefix}",))

    async def _create_tables(self, cur: Any) -> None:
        await cur.execute("SELECT @@max_allowed_packet")
        [(max_packet,)] = await cur.fetchall()
        self._max_row = int(max_packet) - _STATEMENT_SLACK
        options = "ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin"
        await cur.execute(
            f"CREATE TABLE IF NOT EXISTS {self._meta} (`key` VARCHAR(64) NOT NULL PRIMARY KEY, "
            f"`value` TEXT NOT NULL) {options}"
        )
        # Outside the versioned layout, as on the other sinks: created on every start.
        await cur.execute(
            f"CREATE TABLE IF NOT EXISTS {self._dead} (seq BIGINT AUTO_INCREMENT PRIMARY KEY, "
            "frame LONGBLOB NOT NULL, reason TEXT NOT NULL, worker TEXT NOT NULL, "
            f"dead_at DOUBLE NOT NULL) {options}"
        )
        await cur.execute(f"SELECT `value` FROM {self._meta} WHERE `key` = 'schema_version'")
        found = await cur.fetchall()
        if found:
            check_schema_version(found[0][0], f"MySQL table {self._meta}")
        else:
            await cur.execute(
                f"CREATE TABLE IF NOT EXISTS {self._messages} ("
                f"id VARBINARY({MAX_ID_BYTES}) NOT NULL PRIMARY KEY, "
                f"room VARBINARY({MAX_ROOM_BYTES}) NOT NULL, origin TEXT NOT NULL, "
                "ts DOUBLE NOT NULL, payload LONGBLOB NOT NULL, headers LONGTEXT NOT NULL, "
                "stored_at TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6)) "
                f"{options}"
            )
        # On every start (MySQL has no CREATE INDEX IF NOT EXISTS): history reads need it,
        # and a database whose index was lost gets it back.
        await cur.execute(
            "SELECT 1 FROM information_schema.statistics WHERE table_schema = DATABASE() "
            "AND table_name = %s AND index_name = %s LIMIT 1",
            (f"{self.table_prefix}_messages", self._room_index_name),
        )
        if not await cur.fetchall():
            await cur.execute(
                f"CREATE INDEX `{self._room_index_name}` ON {self._messages} (room, id)"
            )
        if not found:
            await cur.execute(
                f"INSERT INTO {self._meta} (`key`, `value`) VALUES ('schema_version', %s)",
                (str(SCHEMA_VERSION),),
            )


def _connect_options(url: str) -> dict[str, Any]:
    """asyncmy's connection keywords from a ``mysql://`` URL (its query already removed)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigurationError(f"MySQL URL {redact(url)!r} is not valid: {exc}") from None
    if parts.scheme.lower() not in ("mysql", "mariadb"):
        raise ConfigurationError(f"not a MySQL URL: {redact(url)!r}")
    database = unquote(parts.path.lstrip("/"))
    if not database or "/" in database:
        raise ConfigurationError(
            f"MySQL URL {redact(url)!r} names no database: use mysql://user@host:3306/database"
        )
    if parts.query:
        raise ConfigurationError(
            f"MySQL URL {redact(url)!r}: the only option is table_prefix (give it to "
            "sink_from_url, or as MySQLSink's table_prefix=)"
        )
    return {
        "host": parts.hostname or "127.0.0.1",
        "port": port or 3306,
        "user": unquote(parts.username or "root"),
        "password": unquote(parts.password or ""),
        "db": database,
    }


def _utf8(text: str) -> bytes:
    """An id or room as stored (VARBINARY: its UTF-8 bytes). A lone surrogate has none: that
    value is refused, as the other sinks' drivers refuse it."""
    try:
        return text.encode()
    except UnicodeError as exc:
        raise SinkRefused(f"MySQL refused the data: {_describe(exc)}") from exc


def _refused(exc: BaseException) -> bool:
    if isinstance(exc, UnicodeError):
        return True
    if isinstance(exc, asyncmy_errors.MySQLError) and exc.args:
        return exc.args[0] in _REFUSED_ERRNOS
    return False


def _describe(exc: BaseException) -> str:
    if isinstance(exc, asyncio.IncompleteReadError):
        return "IncompleteReadError: the server closed the connection"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
