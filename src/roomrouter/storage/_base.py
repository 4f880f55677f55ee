"""The contract between storage workers (and history readers) and a persistence sink.

A sink is the durable end of the storage path: a worker takes a batch of envelopes from the
storage queue, calls :meth:`Sink.write`, and acks the queue only after it returned. Transport
is at-least-once, so the same envelope may be written many times; the sink makes that harmless
by being idempotent by envelope id. Readers use :meth:`Sink.history` to page through a room.

Guarantees every backend gives (``tests/storage/test_sinks.py`` checks them for each one):

1. **Atomic and durable write.** One :meth:`~Sink.write` call is one transaction. When it
   returns, every envelope of the batch is committed (a new connection sees it); when it raises,
   none of them was written by this call.
2. **Idempotent by id.** An id that is already stored is skipped, whatever the rest of the
   envelope holds (the first write wins). The return value counts the rows this call inserted,
   so across all calls the sum of the returns is the number of distinct ids stored.
3. **Order.** Messages of a room are ordered by id, compared as plain strings (code point /
   byte order, never a locale collation): for UUIDv7 ids that is time order.
4. **Errors.** Every driver failure is raised as :class:`~roomrouter.SinkError` with the driver's
   exception as ``__cause__``; bad arguments raise ``ValueError``. :meth:`Sink.write` raises
   the subclass :class:`~roomrouter.SinkRefused` when the database refuses the *data* of some
   row (retrying the same batch cannot help; a smaller one without that row can), and plain
   ``SinkError`` when it is unavailable (worth retrying as is).
5. **Dead letters.** Frames a worker cannot store (undecodable, wrong shape, refused) are kept
   by :meth:`Sink.write_dead_letters` in a table beside the messages, ``<prefix>_dead_letters``,
   as raw bytes with their reason, to be inspected and replayed (:meth:`Sink.dead_letters`).

Stored envelopes keep every field except ``persist``: what comes back from :meth:`Sink.history`
was persisted, so it comes back with ``persist=True``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Final, Self

import msgspec

from .._envelope import Envelope
from .._errors import ConfigurationError, SinkError

__all__ = [
    "DEAD_LETTER_COLUMNS",
    "DEFAULT_TABLE_PREFIX",
    "MAX_HISTORY_LIMIT",
    "MESSAGE_COLUMNS",
    "SCHEMA_VERSION",
    "DeadLetter",
    "Sink",
    "check_history_limit",
    "check_pool_sizes",
    "check_schema_version",
    "check_table_prefix",
    "decode_headers",
    "encode_headers",
    "printable_reason",
    "row_to_dead_letter",
    "row_to_envelope",
]

#: The version of the table layout this code writes. A sink refuses to start on a database
#: whose recorded version is higher: an older roomrouter must not write into a layout it does
#: not know.
SCHEMA_VERSION: Final = 1
MAX_HISTORY_LIMIT: Final = 10_000
DEFAULT_TABLE_PREFIX: Final = "roomrouter"

# Lowercase only, so the name means the same quoted and unquoted; 40 characters leaves room for
# the longest suffix this package appends ("_messages_room_id") within PostgreSQL's 63 bytes.
_MAX_PREFIX_LENGTH: Final = 40


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A storage-queue frame that could not be stored, as the worker found it.

    ``frame`` is the raw bytes from the queue (an envelope's wire form if it decodes);
    ``reason`` says why it was set aside; ``worker`` names the worker; ``at`` is Unix time.
    """

    frame: bytes
    reason: str
    worker: str = ""
    at: float = 0.0


class Sink(ABC):
    """A durable store of envelopes, one table of messages indexed by (room, id).

    Use it as an async context manager, or call :meth:`start` and :meth:`aclose`::

        async with SQLiteSink("messages.db") as sink:
            await sink.write(batch)
            page = await sink.history("lobby", after=last_seen_id)

    Methods other than :meth:`start` and :meth:`aclose` raise :class:`~roomrouter.SinkError`
    when the sink is not started. A sink may be shared by tasks of one event loop; calls may
    run concurrently.
    """

    #: Short backend name (``"sqlite"``, ``"postgresql"``, ``"mysql"``).
    name: str

    @abstractmethod
    async def start(self) -> None:
        """Connect; on first use create the tables and record :data:`SCHEMA_VERSION`.

        Safe to run from several processes against one database at once. Raises
        :class:`~roomrouter.SinkError` if the database cannot be reached or holds a schema
        version newer than this code knows.
        """

    @abstractmethod
    async def aclose(self) -> None:
        """Release connections. Idempotent; a sink cannot be started again after it."""

    @abstractmethod
    async def write(self, envelopes: Sequence[Envelope]) -> int:
        """Store ``envelopes`` in one transaction; return how many ids were new.

        Ids already stored (by an earlier call, or earlier in this batch) are skipped. The batch
        is committed when this returns, so the caller may ack the queue then. If the call is
        cancelled, the batch is either fully committed or not written at all.
        """

    @abstractmethod
    async def history(
        self,
        room: str,
        *,
        before: str | None = None,
        after: str | None = None,
        limit: int = 50,
    ) -> list[Envelope]:
        """Return at most ``limit`` envelopes of ``room``, always in ascending id order.

        * ``after`` given: the *first* ``limit`` envelopes with ``id > after`` (and
          ``id < before`` if ``before`` is given too). Pass ``after=""`` to start at the oldest.
        * otherwise: the *last* ``limit`` envelopes with ``id < before`` (all ids when
          ``before`` is ``None``).

        Paging: forwards, pass the last id of a page as the next ``after``; backwards, pass the
        first id of a page as the next ``before``. A short page means there is no more.
        ``limit`` must be an int in ``1..MAX_HISTORY_LIMIT``, else ``ValueError``.
        """

    @abstractmethod
    async def count(self, room: str | None = None) -> int:
        """Number of stored envelopes of ``room``, or of all rooms when ``room`` is ``None``."""

    @abstractmethod
    async def latest_id(self, room: str) -> str | None:
        """The highest stored id of ``room``, or ``None`` if the room has no stored message."""

    async def write_dead_letters(self, letters: Sequence[DeadLetter]) -> None:
        """Keep ``letters`` (one transaction). Raises :class:`~roomrouter.SinkError` if the
        sink is unavailable. A sink without a dead-letter table raises ``NotImplementedError``;
        the worker then logs the frame instead."""
        raise NotImplementedError(f"the {self.name} sink keeps no dead letters")

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """The oldest ``limit`` dead letters kept, oldest first."""
        raise NotImplementedError(f"the {self.name} sink keeps no dead letters")

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


def printable_reason(reason: str, limit: int = 2000) -> str:
    """``reason`` made safe for any text column: no NUL or surrogates (PostgreSQL refuses
    them, and a refused row's reason often quotes the offending value), bounded in length."""
    cleaned = reason.replace("\x00", "\\x00").encode("utf-8", "backslashreplace").decode()
    return cleaned[:limit]


def check_history_limit(limit: object) -> int:
    """Return ``limit`` if it is an int in ``1..MAX_HISTORY_LIMIT``, else raise ``ValueError``."""
    # bool is an int subclass; history(limit=True) is a bug, not a request for one message.
    if not isinstance(limit, int) or isinstance(limit, bool):
        raise ValueError(f"limit must be an int, not {type(limit).__name__}")
    if not 1 <= limit <= MAX_HISTORY_LIMIT:
        raise ValueError(f"limit must be between 1 and {MAX_HISTORY_LIMIT}, not {limit}")
    return limit


def check_pool_sizes(min_pool_size: int, max_pool_size: int) -> None:
    """Raise ConfigurationError unless a pool of ``min_pool_size`` to ``max_pool_size``
    connections can exist: ``0 <= min_pool_size <= max_pool_size`` and ``max_pool_size >= 1``."""
    if not 0 <= min_pool_size <= max_pool_size or max_pool_size < 1:
        raise ConfigurationError(
            f"need 0 <= min_pool_size <= max_pool_size and max_pool_size >= 1, got "
            f"min_pool_size={min_pool_size}, max_pool_size={max_pool_size}"
        )


def check_table_prefix(prefix: object) -> str:
    """Return ``prefix`` if it is a safe SQL identifier prefix, else raise ConfigurationError.

    Table names are built from the prefix and interpolated into SQL (identifiers cannot be bound
    as parameters), so only ``[a-z_][a-z0-9_]*`` of at most 40 characters is accepted.
    """
    if not isinstance(prefix, str):
        raise ConfigurationError(f"table_prefix must be a str, not {type(prefix).__name__}")
    valid = (
        0 < len(prefix) <= _MAX_PREFIX_LENGTH
        and prefix.isascii()
        and (prefix[0].islower() or prefix[0] == "_")
        and all(ch.islower() or ch.isdigit() or ch == "_" for ch in prefix)
    )
    if not valid:
        raise ConfigurationError(
            f"table_prefix {prefix!r} is not valid: use 1 to {_MAX_PREFIX_LENGTH} characters "
            "of a-z, 0-9 and _, not starting with a digit"
        )
    return prefix


# Headers are stored as JSON text rather than msgpack so they stay readable from a database shell
# (and queryable with PostgreSQL's json operators after a cast). Plain text, not jsonb: jsonb
# rejects "\u0000", which a header value may legally contain.
_headers_decoder: Final = msgspec.json.Decoder(dict[str, str])


def encode_headers(headers: dict[str, str]) -> str:
    """The stored (JSON) form of an envelope's headers."""
    return msgspec.json.encode(headers).decode()


def decode_headers(text: str) -> dict[str, str]:
    """Inverse of :func:`encode_headers`."""
    return _headers_decoder.decode(text)


#: The columns of the messages table that hold an envelope, in the order every sink writes
#: and selects them and :func:`row_to_envelope` takes them.
MESSAGE_COLUMNS: Final = "id, room, origin, ts, payload, headers"

#: The columns of the dead-letter table that hold a :class:`DeadLetter`, in the order every
#: sink writes and selects them and :func:`row_to_dead_letter` takes them.
DEAD_LETTER_COLUMNS: Final = "frame, reason, worker, dead_at"


def row_to_envelope(
    msg_id: str, room: str, origin: str, ts: float, payload: bytes, headers: str
) -> Envelope:
    """Build the envelope of a stored row (columns in the order of :data:`MESSAGE_COLUMNS`)."""
    try:
        decoded = decode_headers(headers)
    except msgspec.MsgspecError as exc:
        # Only a row written by something else than a sink can get here.
        raise SinkError(f"stored message {msg_id!r} has unreadable headers: {exc}") from exc
    return Envelope(
        id=msg_id,
        room=room,
        origin=origin,
        ts=ts,
        payload=bytes(payload),
        headers=decoded,
        persist=True,
    )


def row_to_dead_letter(frame: bytes, reason: str, worker: str, dead_at: float) -> DeadLetter:
    """Build the dead letter of a stored row (columns in the order of
    :data:`DEAD_LETTER_COLUMNS`), whatever types the driver hands the values in."""
    return DeadLetter(bytes(frame), str(reason), str(worker), float(dead_at))


def check_schema_version(value: object, where: str) -> None:
    """Raise SinkError unless ``value`` (as read from the meta table) is a version we can use.

    Older versions would be migrated here; there is only version 1 so far.
    """
    try:
        version = int(str(value))
    except ValueError:
        raise SinkError(f"{where} records an unreadable schema version {value!r}") from None
    if version > SCHEMA_VERSION:
        raise SinkError(
            f"{where} holds schema version {version}, but this roomrouter knows versions up "
            f"to {SCHEMA_VERSION} only: upgrade roomrouter to use this database"
        )
    if version < 1:
        raise SinkError(f"{where} records an invalid schema version {version}")
