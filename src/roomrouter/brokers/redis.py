"""Redis broker: one pub/sub channel per room, SUBSCRIBE/UNSUBSCRIBE on one connection per node.

Names. Every channel and key of a namespace starts with ``rr:{<ns>}:``, where ``<ns>`` is the
namespace with ``%``, ``:``, ``{`` and ``}`` percent-encoded (``%25``, ``%3A``, ``%7B``,
``%7D``); see :func:`key_prefix`. So the namespace part never holds the separator and always
ends at the first ``:``, and no two namespaces share a name whatever rooms and nodes they have.
The braces are a Redis Cluster *hash tag*: every key of a namespace hashes to one slot, as the
MULTI of a persisted publish (storage stream, recent stream, publish) requires there. After the
prefix come ``r:{room}`` (data channel), ``n:{node}`` (the node's own data channel, for direct
publishing: see :mod:`roomrouter.brokers._base`), ``c`` (control broadcast), ``d:{node}``
(control, direct), ``store`` (storage stream) and ``recent:{room}`` (recent cache); a room or
node is the last part, so it needs no encoding. Plain SUBSCRIBE never interprets glob characters, so
any room name is literal. With ``sharded=True`` (``?sharded=1``) the same runs over
SPUBLISH/SSUBSCRIBE, the sharded pub/sub of Redis 7; note that the hash tag puts all of one
namespace's channels in one shard (spread load over shards with several namespaces).

Two raw connections per node, no pool: the *subscriber* connection is read by one reader task
that also confirms (S)SUBSCRIBE batches; the *publisher* connection is written by one flusher
task that sends everything queued while the previous round trip was in flight as one pipeline
(auto-pipelining), so concurrent publishers reach the pipelined rate instead of one round trip
each. Both reconnect on their own; the subscriber connection, once back, restores every
subscription before it tells the router (``on_reconnect``).

History reads (:meth:`RedisBroker.recent`) are the exception to "two": they run on up to
``READERS`` connections of their own (:class:`~roomrouter.brokers._redis_common.HistoryReaders`,
shared with Redis Cluster), opened on first use, so they never queue behind publishes nor
share their timeout (docs/architecture.md, "Recovery at scale").
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections import deque
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import anyio
import msgspec
from redis.asyncio.connection import Connection, parse_url
from redis.exceptions import ResponseError

from .._errors import (
    BrokerUnavailable,
    ConfigurationError,
    PublishOutcomeUnknown,
    StorageQueueLost,
    describe,
    unreachable,
)
from .._urls import pop_options, redact
from ._base import (
    Broker,
    BrokerContext,
    RecentFrames,
    StorageConsumer,
    StoredFrame,
)
from ._redis_common import NETWORK_ERRORS as _NETWORK_ERRORS
from ._redis_common import HistoryReaders, address, scan_recent
from ._redis_common import pack as _pack
from ._redis_common import quiet_disconnect as _quiet_disconnect

__all__ = ["RedisBroker", "key_prefix", "store_key"]

log = logging.getLogger("roomrouter.redis")


def _flag(value: str) -> bool:
    return value.lower() in {"1", "true", "yes", "on"}


#: The broker options a Redis URL's query may set (the cluster broker takes the same).
_URL_OPTIONS: tuple[tuple[str, Callable[[str], Any]], ...] = (
    ("operation_timeout", float),
    ("max_backoff", float),
    ("health_interval", float),
    ("recent_size", int),
    ("recent_ttl", int),
    ("redelivery_after", float),
)


def _parse_url(
    url: str, options: Iterable[tuple[str, Callable[[str], Any]]]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a Redis URL into redis-py's connection keyword arguments (``parse_url`` of what
    is left) and the ``options`` its query sets, converted; a bad value is a
    :class:`ConfigurationError` naming the URL without its password."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    found = pop_options(url, query, options)
    rest = urlunsplit(parts._replace(query=urlencode(query)))
    try:
        kwargs: dict[str, Any] = dict(parse_url(rest))
    except ValueError as exc:
        raise ConfigurationError(f"bad Redis URL {redact(url)!r}: {exc}") from exc
    return kwargs, found


def _fail_batches(tables: Iterable[dict[bytes, deque[_Batch]]], error: BaseException) -> None:
    """Fail every (un)subscribe batch waiting in ``tables`` and empty them."""
    for table in tables:
        for waiters in table.values():
            for batch in waiters:
                batch.fail(error)
        table.clear()


@dataclass(slots=True)
class _Batch:
    """A (S)SUBSCRIBE or (S)UNSUBSCRIBE batch waiting for the server's confirmations."""

    remaining: int
    done: anyio.Event = field(default_factory=anyio.Event)
    error: BaseException | None = None

    def confirm(self) -> None:
        self.remaining -= 1
        if self.remaining <= 0:
            self.done.set()

    def fail(self, error: BaseException) -> None:
        if not self.done.is_set():
            self.error = error
            self.done.set()


# -- names (see the module docstring); the broker and its storage consumers use only these ------

_ESCAPES = str.maketrans({"%": "%25", ":": "%3A", "{": "%7B", "}": "%7D"})


def key_prefix(namespace: str) -> bytes:
    """``rr:{<namespace, percent-encoded>}:``, the start of every name of ``namespace``."""
    return b"rr:{" + namespace.translate(_ESCAPES).encode() + b"}:"


def store_key(namespace: str) -> bytes:
    """The storage stream of ``namespace``."""
    return key_prefix(namespace) + b"store"


def _pack_publish(command: bytes, channel: bytes, frame: bytes) -> bytes:
    """RESP encoding of ``command channel frame``: done here because redis-py's generic packer
    was a third of the publisher's CPU time."""
    return b"*3\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n" % (
        len(command), command, len(channel), channel, len(frame), frame,
    )  # fmt: skip


class _Queued:
    """One entry of the publisher queue: pre-encoded command(s), how many replies they produce,
    and the future of the caller (resolved with the last reply)."""

    __slots__ = ("future", "packed", "replies")

    def __init__(self, packed: bytes, replies: int, future: asyncio.Future[Any]) -> None:
        self.packed = packed
        self.replies = replies
        self.future = future


class RedisBroker(Broker):
    """See the module docstring. ``connection_kwargs`` go to ``redis.asyncio.Connection``."""

    name = "redis"
    counts_receivers = True
    supports_storage = True
    #: One publisher and one subscriber connection per node on one server: a node's publishes
    #: reach each subscriber in send order whichever channel they went to (guarantee 3).
    supports_direct = True

    def __init__(
        self,
        *,
        sharded: bool = False,
        operation_timeout: float = 5.0,
        max_backoff: float = 5.0,
        health_interval: float = 5.0,
        recent_size: int = 1000,
        recent_ttl: int = 86_400,
        redelivery_after: float = 30.0,
        **connection_kwargs: Any,
    ) -> None:
        self.sharded = sharded
        self.recent_size = recent_size
        self.recent_ttl = recent_ttl
        self.redelivery_after = redelivery_after
        self.operation_timeout = operation_timeout
        self.max_backoff = max_backoff
        self.health_interval = health_interval
        # parse_url picks SSLConnection for rediss:// and UnixDomainSocketConnection for unix://
        self._connection_class: type[Connection] = connection_kwargs.pop(
            "connection_class", Connection
        )
        self._conn_kwargs = connection_kwargs
        self._conn_kwargs.setdefault("socket_connect_timeout", operation_timeout)
        self._conn_kwargs["socket_timeout"] = None  # reads are bounded here, not by redis-py
        self._conn_kwargs.setdefault("retry", None)
        # RESP2: pub/sub messages arrive as plain replies on the subscriber connection (RESP3
        # would route them through redis-py's push handler).
        self._conn_kwargs["protocol"] = 2
        if sharded:
            self._pub_cmd, self._sub_cmd, self._unsub_cmd = (
                b"SPUBLISH",
                b"SSUBSCRIBE",
                b"SUNSUBSCRIBE",
            )
        else:
            self._pub_cmd, self._sub_cmd, self._unsub_cmd = b"PUBLISH", b"SUBSCRIBE", b"UNSUBSCRIBE"
        self._ctx: BrokerContext | None = None
        self._rooms: set[str] = set()
        self._sub: Connection | None = None
        self._sub_ready = False
        self._pub: Connection | None = None
        self._confirm: dict[bytes, deque[_Batch]] = {}
        self._unconfirm: dict[bytes, deque[_Batch]] = {}
        self._queue: list[_Queued] = []
        self._flush_wake = anyio.Event()
        self._closed = False
        self._last_read = 0.0
        self._readers = HistoryReaders(lambda: self._new_connection("read"), operation_timeout)

    @classmethod
    def from_url(cls, url: str, **options: Any) -> RedisBroker:
        """``redis://[user:pass@]host[:port][/db][?sharded=1&operation_timeout=5]``."""
        kwargs, found = _parse_url(url, (("sharded", _flag), *_URL_OPTIONS))
        return cls(**kwargs, **{**options, **found})

    # -- channels -------------------------------------------------------------------------------

    def _room_channel(self, room: str) -> bytes:
        return self._prefix + b"r:" + room.encode()

    def _node_channel_of(self, node: str) -> bytes:
        return self._prefix + b"n:" + node.encode()

    def _room_of(self, channel: bytes) -> str | None:
        # Channels come from _room_channel (UTF-8 of a str), so the decode is exact.
        if channel.startswith(self._room_prefix):
            return channel[len(self._room_prefix) :].decode(errors="replace")
        return None

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self, context: BrokerContext) -> None:
        self._ctx = context
        self._prefix = key_prefix(context.namespace)
        self._store = store_key(context.namespace)
        self._room_prefix = self._prefix + b"r:"
        self._control = self._prefix + b"c"
        self._direct = self._prefix + b"d:" + context.node_id.encode()
        self._node_channel = self._node_channel_of(context.node_id)
        self._client_name = "roomrouter-" + re.sub(r"[^A-Za-z0-9_.-]", "_", context.node_id)
        await self._connect_subscriber()
        context.task_group.start_soon(self._read_loop, name=f"redis reader {context.node_id}")
        context.task_group.start_soon(self._watchdog, name=f"redis watchdog {context.node_id}")
        context.task_group.start_soon(self._flush_loop, name=f"redis flusher {context.node_id}")

    async def aclose(self) -> None:
        self._closed = True
        for conn in (self._sub, self._pub):
            if conn is not None:
                try:
                    await conn.disconnect()
                except _NETWORK_ERRORS:
                    pass
        self._sub = self._pub = None
        await self._readers.aclose()
        self._fail_batches(BrokerUnavailable("broker closed"))
        self._fail_queue(BrokerUnavailable("broker closed"))

    def _new_connection(self, role: str) -> Connection:
        return self._connection_class(
            client_name=f"{self._client_name}-{role}", **self._conn_kwargs
        )

    async def _connect_subscriber(self) -> None:
        """Connect the subscriber connection and subscribe control + every held room."""
        conn = self._new_connection("sub")
        try:
            with anyio.fail_after(self.operation_timeout):
                await conn.connect()  # type: ignore[no-untyped-call]
        except _NETWORK_ERRORS as exc:
            await _quiet_disconnect(conn)
            raise unreachable("Redis", *address(self._conn_kwargs), exc) from exc
        self._sub = conn
        channels = [self._control, self._direct, self._node_channel]
        channels += [self._room_channel(r) for r in self._rooms]
        # Confirmations are read by the reader loop, which is not running yet during start and
        # reconnect: read them here.
        try:
            with anyio.fail_after(self.operation_timeout):
                for chunk in _chunks(channels, 1000):
                    await conn.send_command(self._sub_cmd, *chunk)
                remaining = len(channels)
                while remaining:
                    reply = await conn.read_response()
                    if (
                        isinstance(reply, list)
                        and reply
                        and reply[0]
                        in (
                            b"subscribe",
                            b"ssubscribe",
                        )
                    ):
                        remaining -= 1
        except _NETWORK_ERRORS as exc:
            self._sub = None
            await _quiet_disconnect(conn)
            raise BrokerUnavailable(f"cannot subscribe on Redis: {describe(exc)}") from exc
        self._sub_ready = True
        self._last_read = anyio.current_time()

    # -- reader ---------------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        assert self._ctx is not None
        ctx = self._ctx
        while True:
            conn = self._sub
            if conn is None or not self._sub_ready:
                await self._reconnect_subscriber()
                continue
            try:
                while True:
                    reply = await conn.read_response()
                    self._last_read = anyio.current_time()
                    self._dispatch(reply, ctx)
            except _NETWORK_ERRORS as exc:
                if self._closed:
                    return
                log.warning(
                    "node %s: Redis subscriber connection lost: %s", ctx.node_id, describe(exc)
                )
                self._sub_ready = False
                self._sub = None
                self._fail_batches(BrokerUnavailable(f"Redis connection lost: {describe(exc)}"))
                await _quiet_disconnect(conn)

    async def _watchdog(self) -> None:
        """Detect a subscriber connection that went silent without closing (a half-open TCP
        connection never errors): PING it when idle, drop it if even that gets no answer. A
        timer task instead of a timeout on every read keeps the per-message path cheap."""
        while True:
            await anyio.sleep(self.health_interval)
            conn = self._sub
            idle = anyio.current_time() - self._last_read
            if conn is None or not self._sub_ready or idle < self.health_interval:
                continue
            try:
                await conn.send_command(b"PING")
            except _NETWORK_ERRORS:
                pass
            await anyio.sleep(min(self.health_interval, self.operation_timeout))
            if self._sub is conn and anyio.current_time() - self._last_read > self.health_interval:
                log.warning("node %s: Redis subscriber connection silent; reconnecting",
                            self._ctx.node_id if self._ctx else "?")  # fmt: skip
                await _quiet_disconnect(conn)

    def _dispatch(self, reply: Any, ctx: BrokerContext) -> None:
        if not isinstance(reply, list) or len(reply) < 3:
            return  # PONG and the like
        kind, channel, data = reply[0], reply[1], reply[2]
        if kind in (b"message", b"smessage"):
            try:
                if (room := self._room_of(channel)) is not None:
                    ctx.on_data(room, data)
                elif channel == self._node_channel:
                    ctx.on_direct(data)
                elif channel == self._control or channel == self._direct:
                    ctx.on_control(data)
                else:  # not a channel of this node's namespace: never subscribed, or stale
                    self.filtered += 1
            except Exception:  # a handler bug must not kill the reader
                log.exception("node %s: message handler raised", ctx.node_id)
        elif kind in (b"subscribe", b"ssubscribe"):
            _confirm(self._confirm, channel)
        elif kind in (b"unsubscribe", b"sunsubscribe"):
            _confirm(self._unconfirm, channel)

    async def _reconnect_subscriber(self) -> None:
        assert self._ctx is not None
        delay = 0.05
        while not self._closed:
            try:
                await self._connect_subscriber()
            except BrokerUnavailable as exc:
                log.info("node %s: Redis reconnect failed (%s); retry in %.2fs",
                         self._ctx.node_id, exc, delay)  # fmt: skip
                await anyio.sleep(delay)
                delay = min(delay * 2, self.max_backoff)
                continue
            log.info("node %s: Redis subscriber reconnected, %d room(s) restored",
                     self._ctx.node_id, len(self._rooms))  # fmt: skip
            self._ctx.on_reconnect()
            return

    def _fail_batches(self, error: BaseException) -> None:
        _fail_batches((self._confirm, self._unconfirm), error)

    # -- subscriptions --------------------------------------------------------------------------

    async def subscribe(self, rooms: Collection[str]) -> None:
        await self._command(self._sub_cmd, rooms, self._confirm)
        self._rooms.update(rooms)

    async def unsubscribe(self, rooms: Collection[str]) -> None:
        self._rooms.difference_update(rooms)
        await self._command(self._unsub_cmd, rooms, self._unconfirm)

    async def _command(
        self, command: bytes, rooms: Collection[str], table: dict[bytes, deque[_Batch]]
    ) -> None:
        conn = self._sub
        if conn is None or not self._sub_ready:
            raise BrokerUnavailable("Redis subscriber connection is down")
        channels = [self._room_channel(r) for r in rooms]
        if not channels:
            return
        batch = _Batch(len(channels))
        for channel in channels:
            table.setdefault(channel, deque()).append(batch)
        try:
            with anyio.fail_after(self.operation_timeout):
                await conn.send_command(command, *channels)
                await batch.done.wait()
        except _NETWORK_ERRORS as exc:
            batch.fail(exc)
            # The connection state is unknown now; drop it so the reader rebuilds a clean one
            # from the rooms we hold (the failed batch is not among them).
            await _quiet_disconnect(conn)
            raise BrokerUnavailable(f"Redis {command.decode()} failed: {describe(exc)}") from exc
        if batch.error is not None:
            raise BrokerUnavailable(f"Redis {command.decode()} failed: {batch.error}")

    # -- publishing -----------------------------------------------------------------------------

    async def publish(self, room: str, frame: bytes, *, to: Collection[str] | None = None) -> None:
        await self._submit(self._pack_data(room, frame, to), 1 if to is None else len(to))

    def _pack_data(self, room: str, frame: bytes, to: Collection[str] | None) -> bytes:
        """The PUBLISH of a data frame: to the room channel, or to each of ``to``'s node
        channels (direct publishing)."""
        if to is None:
            return _pack_publish(self._pub_cmd, self._room_channel(room), frame)
        return b"".join(
            _pack_publish(self._pub_cmd, self._node_channel_of(node), frame) for node in to
        )

    async def publish_control(self, frame: bytes, *, to: str | None = None) -> int | None:
        channel = self._control if to is None else self._prefix + b"d:" + to.encode()
        return await self._enqueue(channel, frame)

    async def _enqueue(self, channel: bytes, frame: bytes) -> int:
        # Takes its place in the queue before the first await: call order is send order.
        # redis-py ties this backend to asyncio anyway; a bare future is the cheapest waiter.
        return int(await self._submit(_pack_publish(self._pub_cmd, channel, frame), 1))

    def _submit(self, packed: bytes, replies: int) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append(_Queued(packed, replies, future))
        self._flush_wake.set()
        return future

    # -- persistence ----------------------------------------------------------------------------
    # Storage queue: the stream ``rr:{<ns>}:store`` read by a consumer group. Recent cache: the
    # stream ``rr:{<ns>}:recent:{room}`` capped at ``recent_size`` entries and expiring
    # ``recent_ttl`` seconds after the room's last message. Both are written in one MULTI/EXEC
    # with the PUBLISH, so a frame is either stored, cached and published, or none of these.

    def _recent_key(self, room: str) -> bytes:
        return self._prefix + b"recent:" + room.encode()

    async def publish_persistent(
        self, room: str, frame: bytes, *, live: bool, to: Collection[str] | None = None
    ) -> None:
        recent = self._recent_key(room)
        commands = [
            _pack(b"MULTI"),
            _pack(b"XADD", self._store, b"*", b"f", frame),
            _pack(b"XADD", recent, b"MAXLEN", b"%d" % self.recent_size, b"*", b"f", frame),
            _pack(b"EXPIRE", recent, b"%d" % self.recent_ttl),
        ]
        if live:
            commands.append(self._pack_data(room, frame, to))
        commands.append(_pack(b"EXEC"))
        queued = len(commands) + (len(to) - 1 if live and to is not None else 0)
        await self._submit(b"".join(commands), queued)

    async def recent(
        self, room: str, *, since: str | None = None, limit: int | None = None
    ) -> RecentFrames:
        """The room's recent stream read backwards from its newest entry (XREVRANGE in chunks
        of ``RECENT_CHUNK``) until :class:`RecentScan` has reached ``since`` or ``limit``.

        History reads never share the publisher's pipeline or its timeout: they run on a few
        connections of their own (``READERS``), each round trip within ``operation_timeout``,
        so a storm of recoveries cannot make publishes time out, nor the reverse. A read is
        idempotent: any failure is a plain ``BrokerUnavailable``.
        """
        async with self._readers.reading() as read:
            return await scan_recent(read, self._recent_key(room), since, limit, self.recent_size)

    def storage_consumer(self, namespace: str, consumer: str) -> StorageConsumer:
        return _RedisConsumer(self, store_key(namespace), consumer)

    async def _flush_loop(self) -> None:
        while True:
            await self._flush_wake.wait()
            self._flush_wake = anyio.Event()
            while self._queue:
                batch, self._queue = self._queue, []
                await self._flush(batch)

    async def _flush(self, batch: list[_Queued]) -> None:
        results: list[Any] = []
        sent = False
        try:
            conn = await self._publisher()
            with anyio.fail_after(self.operation_timeout):
                # From here on bytes may reach Redis, which runs what it read: a failure now
                # leaves the commands without a reply ambiguous, not undone.
                sent = True
                await conn.send_packed_command(
                    b"".join(q.packed for q in batch), check_health=False
                )
                for item in batch:
                    reply: Any = None
                    refused: ResponseError | None = None
                    for _ in range(item.replies):
                        try:
                            reply = await conn.read_response()
                        except ResponseError as exc:  # a refusal: the stream stays in sync
                            reply = refused = refused or exc
                    if refused is not None:
                        reply = refused
                    if item.replies > 1 and isinstance(reply, list):  # MULTI ... EXEC
                        reply = next((r for r in reply if isinstance(r, Exception)), reply[-1])
                    if isinstance(reply, Exception):
                        reply = BrokerUnavailable(f"Redis refused the command: {reply}")
                    results.append(reply)
        except (*_NETWORK_ERRORS, BrokerUnavailable) as exc:
            if self._pub is not None:
                await _quiet_disconnect(self._pub)
                self._pub = None
            error: BrokerUnavailable
            if isinstance(exc, BrokerUnavailable):
                error = exc
            elif sent:
                error = PublishOutcomeUnknown(
                    f"Redis connection failed after the command was sent: {describe(exc)}"
                )
            else:
                error = BrokerUnavailable(f"Redis publish failed: {describe(exc)}")
            results.extend([error] * (len(batch) - len(results)))
        for item, result in zip(batch, results, strict=True):
            if item.future.done():  # the publisher was cancelled meanwhile
                continue
            if isinstance(result, BaseException):
                item.future.set_exception(result)
            else:
                item.future.set_result(result)

    async def _publisher(self) -> Connection:
        if self._closed:
            raise BrokerUnavailable("broker closed")
        if self._pub is None:
            conn = self._new_connection("pub")
            try:
                with anyio.fail_after(self.operation_timeout):
                    await conn.connect()  # type: ignore[no-untyped-call]
            except _NETWORK_ERRORS as exc:
                await _quiet_disconnect(conn)
                raise unreachable("Redis", *address(self._conn_kwargs), exc) from exc
            except BaseException:  # cancelled mid-connect: the socket may be open already
                with anyio.CancelScope(shield=True):
                    await _quiet_disconnect(conn)
                raise
            if self._closed:  # closed while connecting: aclose() could not see this one
                await _quiet_disconnect(conn)
                raise BrokerUnavailable("broker closed")
            self._pub = conn
        return self._pub

    def _fail_queue(self, error: BaseException) -> None:
        batch, self._queue = self._queue, []
        for item in batch:
            if not item.future.done():
                item.future.set_exception(error)

    # -- introspection (tests, inspect) ---------------------------------------------------------

    async def server_channels(self) -> dict[str, int]:
        """Rooms of this namespace with subscribers, and how many, as Redis reports them
        (``PUBSUB [SHARD]CHANNELS`` + ``[SHARD]NUMSUB``)."""
        conn = self._new_connection("inspect")
        try:
            with anyio.fail_after(self.operation_timeout):
                await conn.connect()  # type: ignore[no-untyped-call]
                pattern = _glob_escape(self._room_prefix) + b"*"
                kind = b"SHARDCHANNELS" if self.sharded else b"CHANNELS"
                await conn.send_command(b"PUBSUB", kind, pattern)
                channels = await conn.read_response()
                if not channels:
                    return {}
                kind = b"SHARDNUMSUB" if self.sharded else b"NUMSUB"
                await conn.send_command(b"PUBSUB", kind, *channels)
                flat = await conn.read_response()
        except _NETWORK_ERRORS as exc:
            raise BrokerUnavailable(f"Redis PUBSUB failed: {describe(exc)}") from exc
        finally:
            await _quiet_disconnect(conn)
        counts = dict(zip(flat[::2], flat[1::2], strict=True))
        result: dict[str, int] = {}
        for channel, count in counts.items():
            room = self._room_of(channel)
            if room is not None and count:
                result[room] = int(count)
        return result

    async def server_subscription_count(self) -> int:
        """Number of room channels this node's subscriber connection holds, per ``CLIENT LIST``
        (the control channels and the node channel are not counted)."""
        conn = self._new_connection("inspect")
        try:
            with anyio.fail_after(self.operation_timeout):
                await conn.connect()  # type: ignore[no-untyped-call]
                await conn.send_command(b"CLIENT", b"LIST", b"TYPE", b"pubsub")
                listing = await conn.read_response()
        except _NETWORK_ERRORS as exc:
            raise BrokerUnavailable(f"Redis CLIENT LIST failed: {describe(exc)}") from exc
        finally:
            await _quiet_disconnect(conn)
        name = f"name={self._client_name}-sub".encode()
        key = b"ssub=" if self.sharded else b"sub="
        for line in listing.splitlines():
            fields = line.split()
            if name in fields:
                for f in fields:
                    if f.startswith(key):
                        return int(f[len(key) :]) - 3
        raise BrokerUnavailable("this node's subscriber connection is not connected")

    def client_name(self, role: str = "sub") -> str:
        """The ``CLIENT SETNAME`` of this node's connection (``sub`` or ``pub``)."""
        return f"{self._client_name}-{role}"


class _RedisConsumer(StorageConsumer):
    """A member of the consumer group ``roomrouter-workers`` on the storage stream.

    New entries come from XREADGROUP; entries another consumer fetched and did not acknowledge
    for ``redelivery_after`` seconds (it crashed) are taken over with XAUTOCLAIM first.
    Acknowledged entries are deleted from the stream (XACK + XDEL in one MULTI), so the stream
    holds only what is not stored yet.

    A stream or group that vanished (Redis restarted without persistence, FLUSHALL, expiry)
    answers NOGROUP; the consumer then recreates the group (MKSTREAM, from id 0, so entries
    published since are read). The group's *epoch* (``rr:{ns}:store:epoch``, a random token
    set by whoever creates the group, read with every XAUTOCLAIM) also shows a replacement
    made by a consumer that started after the loss. The first consumer to notice a loss marks
    the old epoch lost (``SET NX``) and raises :class:`~roomrouter.StorageQueueLost`; the
    others adopt the new group silently, so one loss is one report.
    An entry without the frame field is handed on with a ``defect``, to be dead-lettered.
    """

    GROUP = b"roomrouter-workers"

    def __init__(self, broker: RedisBroker, stream: bytes, name: str) -> None:
        self._broker = broker
        self._stream = stream
        self._epoch_key = stream + b":epoch"
        self._name = name.encode()
        self._claim_cursor = b"0-0"
        self._client: Any = None
        self._epoch: bytes | None = None

    async def start(self) -> None:
        from redis.asyncio import ConnectionPool, Redis

        pool = ConnectionPool(
            connection_class=self._broker._connection_class,
            client_name=f"roomrouter-worker-{self._name.decode(errors='replace')}",
            **self._broker._conn_kwargs,
        )
        self._client = Redis(connection_pool=pool)
        try:
            self._epoch = await self._create_group()
        except _NETWORK_ERRORS as exc:
            raise unreachable("Redis", *address(self._broker._conn_kwargs), exc) from exc

    async def _create_group(self) -> bytes | None:
        """Create the group (and the stream) if missing; return the group's *epoch*.

        The epoch is a random token set, in the same atomic step, by whoever creates the group.
        A consumer that finds it changed knows that the group it read was lost and replaced,
        even when a consumer that started later (which cannot tell a loss from a new
        namespace) replaced it. A group without an epoch (made by an older roomrouter) gets
        one here.
        """
        try:
            _, epoch = await self._client.eval(
                _CREATE_GROUP, 2, self._stream, self._epoch_key, self.GROUP,
                os.urandom(8).hex().encode(),
            )  # fmt: skip
        except ResponseError as exc:
            raise BrokerUnavailable(f"cannot create the consumer group: {describe(exc)}") from exc
        return epoch  # type: ignore[no-any-return]

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose(close_connection_pool=True)
            self._client = None

    async def fetch(self, max_frames: int, wait: float) -> list[StoredFrame]:
        min_idle = int(self._broker.redelivery_after * 1000)
        try:
            # The epoch rides along with XAUTOCLAIM: the check costs no round trip.
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.get(self._epoch_key)
                pipe.xautoclaim(
                    self._stream, self.GROUP, self._name, min_idle, self._claim_cursor,
                    count=max_frames,
                )  # fmt: skip
                epoch, reply = await pipe.execute(raise_on_error=False)
            if isinstance(reply, Exception):
                raise reply
            if epoch != self._epoch:
                await self._replaced("its epoch changed: another consumer recreated it", epoch)
                return []
            self._claim_cursor = reply[0]
            claimed = reply[1]
            if claimed:
                return _frames(claimed)
            with anyio.fail_after(wait + self._broker.operation_timeout):
                read = await self._client.xreadgroup(
                    self.GROUP, self._name, {self._stream: b">"},
                    count=max_frames, block=max(int(wait * 1000), 1),
                )  # fmt: skip
        except ResponseError as exc:
            if str(exc).startswith("NOGROUP"):
                try:
                    epoch = await self._create_group()
                    await self._replaced(str(exc), epoch)
                except _NETWORK_ERRORS as again:
                    raise unreachable(
                        "Redis", *address(self._broker._conn_kwargs), again
                    ) from again
                return []
            raise BrokerUnavailable(f"Redis storage fetch failed: {describe(exc)}") from exc
        except _NETWORK_ERRORS as exc:
            raise BrokerUnavailable(f"Redis storage fetch failed: {describe(exc)}") from exc
        return _frames(read[0][1]) if read else []

    async def _replaced(self, answer: str, epoch: bytes | None) -> None:
        """The group this consumer read is gone (and now recreated with ``epoch``): adopt the
        new one, and raise StorageQueueLost if this is the first consumer to notice."""
        old, self._epoch, self._claim_cursor = self._epoch, epoch, b"0-0"
        # One report per loss across all workers: the first to mark the old epoch lost.
        lost_key = self._stream + b":lost:" + (old or b"-")
        if not await self._client.set(lost_key, b"1", nx=True, ex=86_400):
            return
        stream = self._stream.decode(errors="replace")
        raise StorageQueueLost(
            f"storage stream {stream!r} or its consumer group vanished ({answer}): frames it "
            "held that no worker had stored yet are lost (Redis restarted without persistence, "
            "flushed, or the key expired?); recreated it, storing what is published from now on"
        )

    async def ack(self, frames: Sequence[StoredFrame]) -> None:
        ids = [f.token for f in frames]
        if not ids:
            return
        try:
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.xack(self._stream, self.GROUP, *ids)
                pipe.xdel(self._stream, *ids)
                await pipe.execute()
        except _NETWORK_ERRORS as exc:
            raise BrokerUnavailable(f"Redis storage ack failed: {describe(exc)}") from exc

    async def pending(self) -> int:
        try:
            return int(await self._client.xlen(self._stream))
        except _NETWORK_ERRORS as exc:
            raise BrokerUnavailable(f"Redis XLEN failed: {describe(exc)}") from exc


# KEYS: stream, epoch key; ARGV: group, a new epoch. Returns {created (0/1), epoch}. One
# script, so the group and its epoch appear together: no consumer can see the one without
# the other (except a group made by an older roomrouter, which gets an epoch here).
_CREATE_GROUP = """
local ok = redis.pcall('XGROUP', 'CREATE', KEYS[1], ARGV[1], '0', 'MKSTREAM')
if type(ok) == 'table' and ok.err then
    if string.find(ok.err, 'BUSYGROUP') then
        redis.call('SET', KEYS[2], ARGV[2], 'NX')
        return {0, redis.call('GET', KEYS[2])}
    end
    return redis.error_reply(ok.err)
end
redis.call('SET', KEYS[2], ARGV[2])
return {1, ARGV[2]}
"""


def _frames(entries: list[Any]) -> list[StoredFrame]:
    # An entry whose fields were deleted meanwhile comes back as (id, None): nothing to store.
    out = []
    for entry_id, fields in entries:
        if not fields:
            continue
        frame = fields.get(b"f")
        if frame is None:
            # Not written by a roomrouter node: keep what it held, for the dead letter.
            held = msgspec.msgpack.encode({bytes(k): bytes(v) for k, v in fields.items()})
            names = sorted(bytes(k) for k in fields)[:8]
            defect = f"stream entry {entry_id!r} has no frame field b'f' (fields {names})"
            out.append(StoredFrame(held, entry_id, defect))
        else:
            out.append(StoredFrame(frame, entry_id))
    return out


def _confirm(table: dict[bytes, deque[_Batch]], channel: bytes) -> None:
    waiters = table.get(channel)
    if waiters:
        waiters.popleft().confirm()
        if not waiters:
            del table[channel]


def _chunks(items: list[bytes], size: int) -> list[list[bytes]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _glob_escape(value: bytes) -> bytes:
    return re.sub(rb"([*?\[\]\\])", rb"\\\1", value)
