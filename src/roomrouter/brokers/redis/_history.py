"""History reads on connections of their own (:class:`HistoryReaders`, :func:`scan_recent`),
for the Redis and Redis Cluster brokers.

History reads never share a publisher's pipeline or its timeout: a storm of recoveries queued
behind publishes made them time out (and publishes held up by Redis delayed every recovery
queued behind them). Each node keeps up to :data:`READERS` read connections per server (per
shard master on a cluster), opened on first use, each round trip within the broker's
``operation_timeout`` (docs/architecture.md, "Recovery at scale").
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
from redis.asyncio.connection import Connection
from redis.exceptions import AskError, ResponseError

from ..._errors import BrokerUnavailable, describe
from .. import RecentFrames, RecentScan
from ._common import NETWORK_ERRORS, pack, quiet_disconnect

__all__ = ["READERS", "RECENT_CHUNK", "HistoryReaders", "Read", "field_of", "scan_recent"]

# History reads: connections per server, and stream entries per XREVRANGE round trip (small
# enough that one reply parses in well under a heartbeat, large enough that a full cache of
# 1,000 takes four round trips).
READERS = 4
RECENT_CHUNK = b"250"


#: ``read(*command, asking=False)``: one command's reply on a history-read connection
#: (``asking``: sent with ``ASKING`` in front, for a slot being migrated).
Read = Callable[..., Awaitable[Any]]


def field_of(fields: list[Any] | None, name: bytes) -> bytes | None:
    """Field ``name`` of a raw (RESP2) stream entry, or None if the entry has none."""
    if fields:
        for i in range(0, len(fields) - 1, 2):
            if fields[i] == name:
                value: bytes = fields[i + 1]
                return value
    return None


_ASKING = pack(b"ASKING")


class HistoryReaders:
    """Up to ``size`` history-read connections to one Redis server, made by ``connect`` on
    first use and kept idle between reads; each round trip within ``timeout``."""

    def __init__(
        self, connect: Callable[[], Connection], timeout: float, size: int = READERS
    ) -> None:
        self._connect = connect
        self.timeout = timeout
        self._size = size
        self._idle: list[Connection] = []
        self._slots: anyio.CapacityLimiter | None = None
        self._closed = False

    @asynccontextmanager
    async def reading(self) -> AsyncIterator[Read]:
        """One connection for the block, as a :data:`Read`. A refusal (``ResponseError``)
        raised out of the block is a plain ``BrokerUnavailable``; so is a network failure,
        after which the connection is dropped. A read is idempotent, so nothing here is
        ever "outcome unknown"."""
        if self._slots is None:
            self._slots = anyio.CapacityLimiter(self._size)
        async with self._slots:
            if self._closed:
                raise BrokerUnavailable("broker closed")
            conn = self._idle.pop() if self._idle else self._connect()

            async def read(*command: bytes, asking: bool = False) -> Any:
                with anyio.fail_after(self.timeout):
                    if not conn.is_connected:
                        await conn.connect()  # type: ignore[no-untyped-call]
                    packed = pack(*command)
                    await conn.send_packed_command(
                        _ASKING + packed if asking else packed, check_health=False
                    )
                    if asking:
                        await conn.read_response()  # ASKING's OK (an error raises here)
                    return await conn.read_response()

            try:
                yield read
            except ResponseError as exc:
                await self._park(conn)  # a refusal leaves the connection in sync
                raise BrokerUnavailable(f"Redis refused the history read: {describe(exc)}") from exc
            except BaseException as exc:  # cut short mid-reply: the connection is unusable
                with anyio.CancelScope(shield=True):  # closed even when cancelled
                    await quiet_disconnect(conn)
                if isinstance(exc, NETWORK_ERRORS):
                    raise BrokerUnavailable(f"Redis history read failed: {describe(exc)}") from exc
                raise
            await self._park(conn)

    async def _park(self, conn: Connection) -> None:
        """Keep a connection for the next read, or close it if closed meanwhile (aclose only
        sees the idle ones)."""
        if self._closed:
            await quiet_disconnect(conn)
        else:
            self._idle.append(conn)

    async def aclose(self) -> None:
        """Close the idle connections; one in use is closed when its read ends."""
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            await quiet_disconnect(conn)


async def scan_recent(
    read: Read, key: bytes, since: str | None, limit: int | None, recent_size: int
) -> RecentFrames:
    """A recent stream read backwards from its newest entry (XREVRANGE in chunks of
    :data:`RECENT_CHUNK`) until :class:`RecentScan` has reached ``since`` or ``limit``. A
    redirection (``AskError``/``MovedError``, Redis Cluster) propagates: the caller follows
    it and scans again."""
    scan = RecentScan(since, limit)
    top = b"+"
    while True:
        entries = await read(b"XREVRANGE", key, top, b"-", b"COUNT", RECENT_CHUNK)
        going = True
        for _, fields in entries:
            going = scan.add(field_of(fields, b"f"))
            if not going:
                break
        if not going or len(entries) < int(RECENT_CHUNK):
            break
        top = b"(" + entries[-1][0]
    evicted = False
    if not scan.reached and not scan.full and (scan.frames or scan.skipped):
        # The scan ran out of entries above `since`: whether older ones were trimmed away
        # decides `truncated` (entries-added counts every XADD the key had).
        try:
            info = await read(b"XINFO", b"STREAM", key)
        except AskError:
            raise
        except ResponseError:  # expired or replaced meanwhile: assume the worst
            evicted = True
        else:
            stream = dict(zip(info[::2], info[1::2], strict=False))
            added = stream.get(b"entries-added")
            length = int(stream.get(b"length", 0))
            evicted = length >= recent_size if added is None else int(added) > length
    return scan.result(evicted)
