"""SQLite sink: the embedded default, no dependency beyond the standard library.

One dedicated :mod:`sqlite3` connection per sink, driven from worker threads through
:func:`anyio.to_thread.run_sync` with a capacity limiter of one, so calls on the connection
never overlap and each write runs as one function: ``BEGIN IMMEDIATE``, ``executemany``,
``COMMIT``. Thread calls are not abandoned on cancellation, so a cancelled write still runs to
its commit (or rollback) and never leaves the connection inside a transaction. The stdlib
driver is used instead of aiosqlite because it works on every anyio backend (aiosqlite is bound
to asyncio) and adds no dependency to the default install.

The database runs in WAL mode with ``synchronous=NORMAL``: readers never block the writer, and
a commit survives a crash of the process; after a power loss or an OS crash the last
transactions may be rolled back (the database stays consistent). Several processes may share
one file; a writer waits up to ``busy_timeout`` seconds for another one's lock.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import anyio
import anyio.to_thread

from .._envelope import Envelope
from .._errors import SinkError, SinkRefused
from ._base import (
    DEAD_LETTER_COLUMNS,
    DEFAULT_TABLE_PREFIX,
    MESSAGE_COLUMNS,
    SCHEMA_VERSION,
    DeadLetter,
    Sink,
    check_history_limit,
    check_schema_version,
    check_table_prefix,
    encode_headers,
    printable_reason,
    row_to_dead_letter,
    row_to_envelope,
)

__all__ = ["SQLiteSink"]

_T = TypeVar("_T")


class SQLiteSink(Sink):
    """Stores envelopes in the SQLite database at ``path`` (``":memory:"`` for a private one).

    ``table_prefix`` names the tables (``<prefix>_messages``, ``<prefix>_meta``), so several
    independent stores can share one file.
    """

    name = "sqlite"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        table_prefix: str = DEFAULT_TABLE_PREFIX,
        busy_timeout: float = 5.0,
    ) -> None:
        self.path = os.fspath(path)
        self.table_prefix = check_table_prefix(table_prefix)
        self.busy_timeout = busy_timeout
        self._messages = f"{self.table_prefix}_messages"
        self._meta = f"{self.table_prefix}_meta"
        self._dead = f"{self.table_prefix}_dead_letters"
        self._conn: sqlite3.Connection | None = None
        self._limiter: anyio.CapacityLimiter | None = None
        self._closed = False

    async def start(self) -> None:
        if self._closed or self._limiter is not None:
            raise SinkError("SQLiteSink.start() may be called once, before aclose()")
        self._limiter = limiter = anyio.CapacityLimiter(1)
        try:
            # Shielded: the thread cannot be stopped anyway, and a cancellation arriving while
            # it runs would otherwise drop the connection it opened without closing it.
            with anyio.CancelScope(shield=True):
                conn = await anyio.to_thread.run_sync(self._connect, limiter=limiter)
        except BaseException as exc:
            self._limiter = None  # not started: a later start() may try again
            if isinstance(exc, sqlite3.Error):
                raise SinkError(f"cannot open SQLite database {self.path!r}: {exc}") from exc
            raise
        self._conn = conn

    async def aclose(self) -> None:
        self._closed = True
        conn, self._conn = self._conn, None
        if conn is not None and self._limiter is not None:
            # Shielded: a cancelled aclose() must still close the file, and it waits for the
            # call in flight (the limiter) rather than closing the connection under it.
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(conn.close, limiter=self._limiter)

    async def write(self, envelopes: Sequence[Envelope]) -> int:
        if not envelopes:
            return 0
        try:
            return await self._run(lambda conn: self._insert(conn, envelopes))
        except SinkError as exc:
            # Errors about the values bound (a lone surrogate, a value SQLite cannot take)
            # belong to a row; locks, I/O and a full disk (OperationalError) are the
            # database's state and worth retrying.
            if isinstance(exc.__cause__, _REFUSED):
                raise SinkRefused(str(exc)) from exc.__cause__
            raise

    async def write_dead_letters(self, letters: Sequence[DeadLetter]) -> None:
        rows = [(d.frame, printable_reason(d.reason), d.worker, d.at) for d in letters]
        sql = f"INSERT INTO {self._dead} ({DEAD_LETTER_COLUMNS}) VALUES (?, ?, ?, ?)"

        def insert(conn: sqlite3.Connection) -> None:
            with _transaction(conn):
                conn.executemany(sql, rows)

        if rows:
            await self._run(insert)

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        check_history_limit(limit)
        sql = f"SELECT {DEAD_LETTER_COLUMNS} FROM {self._dead} ORDER BY seq LIMIT ?"
        rows = await self._run(lambda conn: conn.execute(sql, (limit,)).fetchall())
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
        rows = await self._run(lambda conn: conn.execute(sql, params).fetchall())
        if descending:
            rows.reverse()
        return [row_to_envelope(*row) for row in rows]

    def _history_query(
        self, room: str, *, before: str | None, after: str | None, limit: int
    ) -> tuple[str, list[Any]]:
        """The history statement and its parameters. SQLite's planner takes the (room, id)
        index for these (tests/storage/test_history_index.py checks its plan); the order is
        spelled ``room, id`` as in ``PostgresSink._history_query``, which is that index's."""
        where = ["room = ?"]
        params: list[Any] = [room]
        if after is not None:
            where.append("id > ?")
            params.append(after)
        if before is not None:
            where.append("id < ?")
            params.append(before)
        # Without `after` we want the newest `limit` rows: scan the index backwards, then put
        # the page back in ascending order.
        order = "room DESC, id DESC" if after is None else "room, id"
        sql = (
            f"SELECT {MESSAGE_COLUMNS} FROM {self._messages} WHERE {' AND '.join(where)} "
            f"ORDER BY {order} LIMIT ?"
        )
        params.append(limit)
        return sql, params

    async def count(self, room: str | None = None) -> int:
        sql = f"SELECT count(*) FROM {self._messages}"
        params: tuple[str, ...] = ()
        if room is not None:
            sql += " WHERE room = ?"
            params = (room,)
        row = await self._run(lambda conn: conn.execute(sql, params).fetchone())
        return int(row[0])

    async def latest_id(self, room: str) -> str | None:
        sql = f"SELECT id FROM {self._messages} WHERE room = ? ORDER BY id DESC LIMIT 1"
        row = await self._run(lambda conn: conn.execute(sql, (room,)).fetchone())
        return None if row is None else str(row[0])

    async def _run(self, func: Callable[[sqlite3.Connection], _T]) -> _T:
        conn = self._conn
        if conn is None or self._limiter is None:
            raise SinkError("the SQLite sink is not started (or already closed)")
        try:
            return await anyio.to_thread.run_sync(func, conn, limiter=self._limiter)
        except (sqlite3.Error, UnicodeError) as exc:
            # UnicodeError: a str holding a lone surrogate cannot be encoded for SQLite.
            raise SinkError(f"SQLite {self.path!r}: {exc}") from exc

    # The methods below run in a worker thread.

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: the module must not open transactions behind our back; every
        # transaction here is explicit. check_same_thread=False: successive calls run on
        # different worker threads, never at the same time (the limiter serialises them).
        conn = sqlite3.connect(
            self.path, timeout=self.busy_timeout, isolation_level=None, check_same_thread=False
        )
        try:
            self._enable_wal(conn)
            conn.execute("PRAGMA synchronous=NORMAL")
            self._ensure_schema(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _enable_wal(self, conn: sqlite3.Connection) -> None:
        # Switching a new file to WAL needs an exclusive lock, and SQLite fails that with
        # SQLITE_BUSY at once instead of calling the busy handler: when several processes open
        # a fresh file together, retry until the busy timeout is spent.
        deadline = time.monotonic() + self.busy_timeout
        while True:
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as exc:
                busy = exc.sqlite_errorcode & 0xFF == sqlite3.SQLITE_BUSY
                if not busy or time.monotonic() >= deadline:
                    raise
            time.sleep(0.005)

    @property
    def _room_index(self) -> str:
        return f"CREATE INDEX IF NOT EXISTS {self._messages}_room_id ON {self._messages} (room, id)"

    def _ensure_schema(self, conn: sqlite3.Connection) -> None:
        # IMMEDIATE takes the write lock up front, so two processes starting on a fresh file
        # cannot both decide the schema is missing.
        with _transaction(conn):
            # Outside the versioned layout: a table added later than version 1, created on
            # every start so databases made before it get it too (older code ignores it).
            conn.execute(
                f"CREATE TABLE IF NOT EXISTS {self._dead} (seq INTEGER PRIMARY KEY, "
                "frame BLOB NOT NULL, reason TEXT NOT NULL, worker TEXT NOT NULL, "
                "dead_at REAL NOT NULL)"
            )
            conn.execute(
                f"CREATE TABLE IF NOT EXISTS {self._meta} "
                "(key TEXT PRIMARY KEY NOT NULL, value TEXT NOT NULL)"
            )
            row = conn.execute(
                f"SELECT value FROM {self._meta} WHERE key = 'schema_version'"
            ).fetchone()
            if row is not None:
                check_schema_version(row[0], f"{self.path!r} ({self._meta})")
                # On every start: history reads need it, and a database whose index was lost
                # or never made gets it back.
                conn.execute(self._room_index)
                return
            conn.execute(
                f"CREATE TABLE IF NOT EXISTS {self._messages} ("
                "id TEXT PRIMARY KEY NOT NULL, room TEXT NOT NULL, origin TEXT NOT NULL, "
                "ts REAL NOT NULL, payload BLOB NOT NULL, headers TEXT NOT NULL, "
                "stored_at REAL NOT NULL)"
            )
            conn.execute(self._room_index)
            conn.execute(
                f"INSERT INTO {self._meta} (key, value) VALUES ('schema_version', ?)",
                (str(SCHEMA_VERSION),),
            )

    def _insert(self, conn: sqlite3.Connection, envelopes: Sequence[Envelope]) -> int:
        stored_at = time.time()
        # Sorted by id so concurrent writers of overlapping batches take row locks in one
        # order (it matters for PostgreSQL; here it keeps appends to the index sequential).
        rows = [
            (e.id, e.room, e.origin, e.ts, e.payload, encode_headers(e.headers), stored_at)
            for e in sorted(envelopes, key=lambda e: e.id)
        ]
        sql = (
            f"INSERT OR IGNORE INTO {self._messages} ({MESSAGE_COLUMNS}, stored_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)"
        )
        changes = conn.total_changes
        with _transaction(conn):
            conn.executemany(sql, rows)
        return conn.total_changes - changes


# What sqlite3 raises for a value it cannot bind or store (wrong type, too big, a str that
# cannot be encoded): the row's fault, not the database's.
_REFUSED: tuple[type[BaseException], ...] = (
    sqlite3.DataError,
    sqlite3.IntegrityError,
    sqlite3.InterfaceError,
    sqlite3.ProgrammingError,
    UnicodeError,
)


@contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``; ``ROLLBACK`` if the block or the commit fails."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        # SQLite has already rolled back after some errors (e.g. SQLITE_FULL); after a failed
        # COMMIT (SQLITE_BUSY) the transaction is still open and must not leak into the next call.
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
