"""Redis broker (``redis://``): one pub/sub channel per room, SUBSCRIBE/UNSUBSCRIBE on one
connection per node.

Names (see :mod:`roomrouter.brokers.redis` for the prefix): after ``rr:{<ns>}:`` come
``r:{room}`` (data channel), ``n:{node}`` (the node's own data channel, for direct publishing:
see :mod:`roomrouter.brokers._base`), ``c`` (control broadcast), ``d:{node}`` (control,
direct), ``store`` (storage stream) and ``recent:{room}`` (recent cache); a room or node is the
last part, so it needs no encoding. Plain SUBSCRIBE never interprets glob characters, so any
room name is literal. With ``sharded=True`` (``?sharded=1``) the same runs over
SPUBLISH/SSUBSCRIBE, the sharded pub/sub of Redis 7; note that the hash tag puts all of one
namespace's channels in one shard (spread load over shards with several namespaces).

Two raw connections per node, no pool: the *subscriber* connection (a
:class:`~._subscriber.Subscriber`) is read by one reader task that also confirms (S)SUBSCRIBE
batches, and reconnects through the transport core's reconnect template (connect, restore
every subscription, then tell the router: ``on_reconnect``); the *publisher* connection is one
:class:`~._pipeline.Lane`: everything queued while the previous round trip was in flight goes
as one pipeline, and the transport core's settle rule says what a failed publish was.

History reads (:meth:`RedisBroker.recent`) are the exception to "two": they run on up to
``READERS`` connections of their own (:class:`~._history.HistoryReaders`, shared with Redis
Cluster), opened on first use, so they never queue behind publishes nor share their timeout
(docs/architecture.md, "Recovery at scale").
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Collection
from typing import Any

import anyio
from redis.asyncio.connection import Connection

from ..._errors import BrokerUnavailable, describe, unreachable
from .. import Broker, BrokerContext, RecentFrames, StorageConsumer
from ..transport import Backoff, keep_connected
from ._common import (
    NETWORK_ERRORS,
    URL_OPTIONS,
    address,
    ask,
    glob_escape,
    key_prefix,
    open_connection,
    pack,
    pack_publish,
    parse_redis_url,
    quiet_disconnect,
    store_key,
    url_flag,
)
from ._history import HistoryReaders, scan_recent
from ._pipeline import Command, Lane
from ._storage import ConsumerSettings, RedisConsumer
from ._subscriber import Subscriber

__all__ = ["RedisBroker"]

log = logging.getLogger("roomrouter.redis")


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
        self._pub_cmd = b"SPUBLISH" if sharded else b"PUBLISH"
        self._address = address(self._conn_kwargs)
        self._ctx: BrokerContext | None = None
        self._rooms: set[str] = set()
        self._sub: Subscriber | None = None
        self._sub_scope: anyio.CancelScope | None = None  # the reader's, made in start()
        self._lane = Lane("Redis", self._connect_publisher, operation_timeout)
        self._closed = False
        self._readers = HistoryReaders(lambda: self._new_connection("read"), operation_timeout)

    @classmethod
    def from_url(cls, url: str, **options: Any) -> RedisBroker:
        """``redis://[user:pass@]host[:port][/db][?sharded=1&operation_timeout=5]``."""
        kwargs, found = parse_redis_url(url, (("sharded", url_flag), *URL_OPTIONS))
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
        self._sub_scope = anyio.CancelScope()
        first = await self._connect_subscriber()
        context.task_group.start_soon(
            self._read_loop, first, name=f"redis reader {context.node_id}"
        )
        context.task_group.start_soon(self._watchdog, name=f"redis watchdog {context.node_id}")
        context.task_group.start_soon(self._lane.run, name=f"redis publisher {context.node_id}")

    async def aclose(self) -> None:
        self._closed = True
        if self._sub_scope is not None:
            self._sub_scope.cancel()
        sub, self._sub = self._sub, None
        if sub is not None:
            await sub.close(BrokerUnavailable("broker closed"))
        await self._lane.close("broker closed")
        await self._readers.aclose()

    def _new_connection(self, role: str) -> Connection:
        return self._connection_class(
            client_name=f"{self._client_name}-{role}", **self._conn_kwargs
        )

    async def _connect_subscriber(self) -> Subscriber:
        """A subscriber connection holding control, the node's channels and every held room.
        Its confirmations are read here: the reader does not run yet (start, reconnect)."""
        conn = self._new_connection("sub")
        try:
            await open_connection(conn, self.operation_timeout)
        except NETWORK_ERRORS as exc:
            raise unreachable("Redis", *self._address, exc) from exc
        sub = Subscriber(f"{self._address[0]}", conn, sharded=self.sharded)
        channels = [self._control, self._direct, self._node_channel]
        channels += [self._room_channel(r) for r in self._rooms]
        try:
            with anyio.fail_after(self.operation_timeout):
                batch = await sub.send(True, channels, self.operation_timeout)
                while not batch.done.is_set():
                    sub.on_reply(await conn.read_response())
        except (*NETWORK_ERRORS, BrokerUnavailable) as exc:
            await quiet_disconnect(conn)
            raise BrokerUnavailable(f"cannot subscribe on Redis: {describe(exc)}") from exc
        self._sub = sub
        return sub

    # -- reader ---------------------------------------------------------------------------------

    async def _read_loop(self, first: Subscriber) -> None:
        """The subscriber connection's reader, through the reconnect template: read until the
        connection is lost, then connect again with backoff, restore every subscription
        (:meth:`_connect_subscriber`) and tell the router (``on_reconnect``)."""
        assert self._ctx is not None
        ctx = self._ctx
        start: Subscriber | None = first  # connected and subscribed by start()

        async def connect() -> Subscriber:
            nonlocal start
            sub, start = start or await self._connect_subscriber(), None
            return sub

        def restored() -> None:
            log.info("node %s: Redis subscriber reconnected, %d room(s) restored",
                     ctx.node_id, len(self._rooms))  # fmt: skip
            ctx.on_reconnect()

        assert self._sub_scope is not None
        with self._sub_scope:
            await keep_connected(
                connect, self._serve, on_restored=restored,
                backoff=Backoff(min(0.05, self.max_backoff), self.max_backoff),
                what=f"node {ctx.node_id}: Redis subscriber connection", errors=NETWORK_ERRORS,
            )  # fmt: skip

    async def _serve(self, sub: Subscriber) -> None:
        assert self._ctx is not None
        ctx = self._ctx
        try:
            while True:
                message = sub.on_reply(await sub.conn.read_response())
                if message is None:
                    continue
                channel, data = message
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
        except NETWORK_ERRORS as exc:
            if self._sub is sub:
                self._sub = None
            await sub.close(BrokerUnavailable(f"Redis connection lost: {describe(exc)}"))
            if self._closed:  # aclose() closed it: no loss to report, its cancellation follows
                await anyio.sleep_forever()
            raise

    async def _watchdog(self) -> None:
        """Detect a subscriber connection that went silent without closing (a half-open TCP
        connection never errors): PING it when idle, drop it if even that gets no answer. A
        timer task instead of a timeout on every read keeps the per-message path cheap."""
        while True:
            await anyio.sleep(self.health_interval)
            sub = self._sub
            if sub is None or anyio.current_time() - sub.last_read < self.health_interval:
                continue
            await sub.ping()
            await anyio.sleep(min(self.health_interval, self.operation_timeout))
            if self._sub is sub and anyio.current_time() - sub.last_read > self.health_interval:
                log.warning("node %s: Redis subscriber connection silent; reconnecting",
                            self._ctx.node_id if self._ctx else "?")  # fmt: skip
                await quiet_disconnect(sub.conn)

    # -- subscriptions --------------------------------------------------------------------------

    async def subscribe(self, rooms: Collection[str]) -> None:
        await self._command(True, rooms)
        self._rooms.update(rooms)

    async def unsubscribe(self, rooms: Collection[str]) -> None:
        self._rooms.difference_update(rooms)
        await self._command(False, rooms)

    async def _command(self, subscribe: bool, rooms: Collection[str]) -> None:
        sub = self._sub
        if sub is None:
            raise BrokerUnavailable("Redis subscriber connection is down")
        channels = [self._room_channel(r) for r in rooms]
        if not channels:
            return
        what = "SUBSCRIBE" if subscribe else "UNSUBSCRIBE"
        batch = await sub.send(subscribe, channels, self.operation_timeout)
        try:
            with anyio.fail_after(self.operation_timeout):
                await batch.done.wait()
        except TimeoutError as exc:
            batch.fail(exc)
            # The connection state is unknown now; drop it so the reader rebuilds a clean one
            # from the rooms we hold (the failed batch is not among them).
            await quiet_disconnect(sub.conn)
            raise BrokerUnavailable(f"Redis {what} failed: no answer in time") from exc
        if batch.error is not None:
            raise BrokerUnavailable(f"Redis {what} failed: {describe(batch.error)}")

    # -- publishing -----------------------------------------------------------------------------

    async def publish(self, room: str, frame: bytes, *, to: Collection[str] | None = None) -> None:
        await self._submit(self._pack_data(room, frame, to), 1 if to is None else len(to))

    def _pack_data(self, room: str, frame: bytes, to: Collection[str] | None) -> bytes:
        """The PUBLISH of a data frame: to the room channel, or to each of ``to``'s node
        channels (direct publishing)."""
        if to is None:
            return pack_publish(self._pub_cmd, self._room_channel(room), frame)
        return b"".join(
            pack_publish(self._pub_cmd, self._node_channel_of(node), frame) for node in to
        )

    async def publish_control(self, frame: bytes, *, to: str | None = None) -> int | None:
        channel = self._control if to is None else self._prefix + b"d:" + to.encode()
        return int(await self._submit(pack_publish(self._pub_cmd, channel, frame), 1))

    def _submit(self, packed: bytes, replies: int) -> asyncio.Future[Any]:
        # Takes its place in the lane's queue before the first await: call order is send
        # order. redis-py ties this backend to asyncio anyway: a bare future is the waiter.
        future: asyncio.Future[Any] = self._lane.submit(Command(packed, replies))
        return future

    async def _connect_publisher(self) -> Connection:
        """The publisher connection, made when a batch needs one (see ``Lane``)."""
        if self._closed:
            raise BrokerUnavailable("broker closed")
        conn = self._new_connection("pub")
        try:
            await open_connection(conn, self.operation_timeout)
        except NETWORK_ERRORS as exc:
            raise unreachable("Redis", *self._address, exc) from exc
        if self._closed:  # closed while connecting: aclose() could not see this one
            await quiet_disconnect(conn)
            raise BrokerUnavailable("broker closed")
        return conn

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
            pack(b"MULTI"),
            pack(b"XADD", self._store, b"*", b"f", frame),
            pack(b"XADD", recent, b"MAXLEN", b"%d" % self.recent_size, b"*", b"f", frame),
            pack(b"EXPIRE", recent, b"%d" % self.recent_ttl),
        ]
        if live:
            commands.append(self._pack_data(room, frame, to))
        commands.append(pack(b"EXEC"))
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
        settings = ConsumerSettings(
            self._connection_class, self._conn_kwargs, self.operation_timeout,
            self.redelivery_after,
        )  # fmt: skip
        return RedisConsumer(settings, store_key(namespace), consumer)

    # -- introspection (tests, inspect) ---------------------------------------------------------

    async def _ask(self, *commands: tuple[bytes, ...]) -> list[Any]:
        return await ask(self._new_connection("inspect"), self.operation_timeout, *commands)

    async def server_channels(self) -> dict[str, int]:
        """Rooms of this namespace with subscribers, and how many, as Redis reports them
        (``PUBSUB [SHARD]CHANNELS`` + ``[SHARD]NUMSUB``)."""
        pattern = glob_escape(self._room_prefix) + b"*"
        kind = b"SHARDCHANNELS" if self.sharded else b"CHANNELS"
        [channels] = await self._ask((b"PUBSUB", kind, pattern))
        if not channels:
            return {}
        kind = b"SHARDNUMSUB" if self.sharded else b"NUMSUB"
        [flat] = await self._ask((b"PUBSUB", kind, *channels))
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
        [listing] = await self._ask((b"CLIENT", b"LIST", b"TYPE", b"pubsub"))
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
