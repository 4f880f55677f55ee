"""Redis Cluster broker (``redis://host:port/?cluster=1``): sharded pub/sub, one subscriber
connection per shard master the node needs.

Names. Room channels must spread over the shards, so in cluster mode the *room* is their hash
tag: ``rr:<ns>:r:{<room>}`` (data channel) and ``rr:<ns>:recent:{<room>}`` (recent cache, in
the room's slot so that cache and live publish share one MULTI). ``<ns>`` and ``<room>`` are
percent-encoded as in :func:`~roomrouter.brokers.redis.key_prefix` (``%``, ``:``, ``{``, ``}``),
so the first ``{`` is always the tag's and the room ends it; the namespace part holds no ``:``,
so no two namespaces share a name. Everything used together across rooms keeps the
*namespace* as its hash tag, exactly as on a single Redis: the control channels
``rr:{<ns>}:c`` and ``rr:{<ns>}:d:<node>``, the storage stream ``rr:{<ns>}:store`` (with its
epoch), and the presence keys. The single-Redis names (``redis://`` without ``cluster=1``) do
not change.

Storage. One storage stream per namespace, on the namespace's slot: the storage worker, its
consumer group, XAUTOCLAIM redelivery and queue-loss epoch work unchanged, and no worker has to
discover streams. The price: a persisted publish is two pipelined writes on (usually) two
shards — ``XADD`` to the storage stream, and ``MULTI XADD recent / EXPIRE / SPUBLISH EXEC`` on
the room's shard — sent at once and both awaited; ``publish_persistent`` returns only when
both succeeded (acknowledged ⇒ stored). A failed call says exactly what is known: plain
:class:`~roomrouter.BrokerUnavailable` ("not sent") only if neither write may have run (not
sent, refused, or redirected); once one was done or may have been (sent, then the connection
failed; one shard down while the other stored it), :class:`~roomrouter.PublishOutcomeUnknown`.
All persisted traffic of a namespace goes through one shard's stream; spread heavy load over
namespaces.

Connections. The slot map comes from redis-py's :class:`~redis.asyncio.cluster.RedisCluster`
(``nodes_manager``); the data plane runs on raw connections of our own, because redis-py's
cluster pub/sub confirms nothing and hides which node holds what. Per shard master in use:

* a *subscriber* connection (client name ``roomrouter-<node>-sub``) with its own reader task;
  SSUBSCRIBE takes only channels of one slot, so a batch is one SSUBSCRIBE per slot, all sent
  in one write and confirmed by the reader;
* a *publisher* connection with a flusher task: concurrent publishes are grouped by the owner
  of their slot and each group is sent as one pipeline, like :class:`RedisBroker`'s.
* once a history read went there, up to ``READERS`` *history-read* connections
  (:class:`~roomrouter.brokers._redis_common.HistoryReaders`, as on a single Redis), so that
  recoveries never wait behind the publisher pipeline nor share its timeout.

Following the cluster. A lost subscriber connection, an unsolicited ``sunsubscribe`` (the
server drops shard subscribers of slots it no longer owns, e.g. after a failover), a
``MOVED``/``ASK`` answer, or the periodic check every ``health_interval`` wakes the
maintenance task: it reloads the slot map, moves every subscription to its slot's current
owner (unsubscribing the old one), closes connections no longer needed, and then calls
``on_reconnect`` if subscriptions were restored. A publish answered ``MOVED`` is sent again to
the node the answer names, one answered ``ASK`` (its slot is being migrated) to the importing
node with ``ASKING`` in front (at most three redirections); either was not executed, so the
resend cannot do it twice.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import deque
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

import anyio
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import Connection, SSLConnection
from redis.crc import key_slot
from redis.exceptions import AskError, MovedError, RedisClusterException, ResponseError

from .._errors import (
    BrokerUnavailable,
    ConfigurationError,
    PublishOutcomeUnknown,
    describe,
    unreachable,
)
from .._urls import redact
from ._base import Broker, BrokerContext, RecentFrames, StorageConsumer, StoredFrame
from ._redis_common import NETWORK_ERRORS as _NETWORK_ERRORS
from ._redis_common import HistoryReaders, scan_recent
from ._redis_common import pack as _pack
from ._redis_common import quiet_disconnect as _quiet_disconnect
from .redis import (
    _ESCAPES,
    _URL_OPTIONS,
    RedisBroker,
    _Batch,
    _confirm,
    _fail_batches,
    _flag,
    _pack_publish,
    _parse_url,
    _RedisConsumer,
    key_prefix,
    store_key,
)

__all__ = ["RedisClusterBroker", "cluster_recent_key", "cluster_room_channel", "split_seeds"]

log = logging.getLogger("roomrouter.redis")

_MAX_REDIRECTS = 3

#: What loading or reading the slot map raises: redis-py's cluster errors (no node reachable,
#: a slot not covered) are not RedisErrors, and must not escape as if they were bugs.
_SLOT_MAP_ERRORS = (*_NETWORK_ERRORS, RedisClusterException)


def _ns(namespace: str) -> bytes:
    return namespace.translate(_ESCAPES).encode()


def cluster_room_channel(namespace: str, room: str) -> bytes:
    """``rr:<ns>:r:{<room>}``: the room is the hash tag, so rooms spread over the shards."""
    return b"rr:" + _ns(namespace) + b":r:{" + room.translate(_ESCAPES).encode() + b"}"


def cluster_recent_key(namespace: str, room: str) -> bytes:
    """``rr:<ns>:recent:{<room>}``: in the slot of the room's channel."""
    return b"rr:" + _ns(namespace) + b":recent:{" + room.translate(_ESCAPES).encode() + b"}"


def split_seeds(url: str) -> tuple[str, list[tuple[str, int]]]:
    """``redis://[auth@]h1:p1,h2:p2[,...]/...``: the URL with its first node only (for the
    usual parser), and the other seed nodes as ``(host, port)`` (port 6379 if left out)."""
    parts = urlsplit(url)
    auth, at, hosts = parts.netloc.rpartition("@")
    if "," not in hosts:
        return url, []
    first, *others = hosts.split(",")
    seeds: list[tuple[str, int]] = []
    for other in others:
        host, colon, port = other.rpartition(":")
        if not colon or host.endswith(":"):  # no port (an IPv6 address needs brackets)
            host, port = other, "6379"
        try:
            seeds.append((host.strip("[]"), int(port)))
        except ValueError:
            raise ConfigurationError(f"bad seed node {other!r} in {redact(url)!r}") from None
        if not seeds[-1][0]:
            raise ConfigurationError(f"empty seed node in {redact(url)!r}")
    return urlunsplit(parts._replace(netloc=auth + at + first)), seeds


def _redirect(reply: object) -> AskError | None:
    """The redirection a reply is, if any. redis-py parses ``-MOVED``/``-ASK`` into
    :class:`MovedError`/:class:`AskError` (a ``MovedError`` is an ``AskError``) and strips the
    prefix from the message, so the type says it, never the text."""
    return reply if isinstance(reply, AskError) else None


_ASKING = _pack(b"ASKING")


@dataclass(eq=False, slots=True)
class _Shard:
    """This node's subscriber connection to one shard master."""

    node: str
    conn: Connection
    #: Channels the server confirmed on this connection.
    channels: set[bytes] = field(default_factory=set)
    confirm: dict[bytes, deque[_Batch]] = field(default_factory=dict)
    unconfirm: dict[bytes, deque[_Batch]] = field(default_factory=dict)
    closing: bool = False
    last_read: float = 0.0
    #: When the maintenance task PINGed this idle connection (None: not waiting for a PONG).
    pinged_at: float | None = None

    def fail(self, error: BaseException) -> None:
        _fail_batches((self.confirm, self.unconfirm), error)


class _Item:
    """A queued publisher command: ``slot`` routes it, unless a redirection named the node to
    send it to (``target``; ``asking``: an ASK, so it goes with ``ASKING`` in front)."""

    __slots__ = ("asking", "future", "packed", "redirects", "replies", "slot", "target")

    def __init__(self, slot: int, packed: bytes, replies: int, future: asyncio.Future[Any]):
        self.slot = slot
        self.packed = packed
        self.replies = replies
        self.future = future
        self.redirects = 0
        self.target: str | None = None
        self.asking = False


@dataclass(eq=False, slots=True)
class _Lane:
    """The publisher connection to one shard master, and what waits to be sent on it."""

    node: str
    conn: Connection | None = None
    queue: list[_Item] = field(default_factory=list)
    wake: anyio.Event = field(default_factory=anyio.Event)


class RedisClusterBroker(Broker):
    """See the module docstring. ``host``/``port`` name any node of the cluster (the others
    are found from it), ``seeds`` more ``(host, port)`` to start from if that one is down
    (``redis://h1:7000,h2:7001/?cluster=1``); the other ``connection_kwargs`` go to every
    connection."""

    name = "redis-cluster"
    counts_receivers = True
    supports_storage = True

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 6379,
        operation_timeout: float = 5.0,
        max_backoff: float = 5.0,
        health_interval: float = 5.0,
        recent_size: int = 1000,
        recent_ttl: int = 86_400,
        redelivery_after: float = 30.0,
        seeds: Collection[tuple[str, int]] = (),
        **connection_kwargs: Any,
    ) -> None:
        self.host, self.port = host, port
        self.seeds = [(h, int(p)) for h, p in seeds]
        self.operation_timeout = operation_timeout
        self.max_backoff = max_backoff
        self.health_interval = health_interval
        self.recent_size = recent_size
        self.recent_ttl = recent_ttl
        self.redelivery_after = redelivery_after
        if connection_kwargs.pop("db", 0) not in (0, "0"):
            raise ConfigurationError("Redis Cluster has only database 0")
        self._connection_class: type[Connection] = connection_kwargs.pop(
            "connection_class", Connection
        )
        connection_kwargs.setdefault("socket_connect_timeout", operation_timeout)
        connection_kwargs["socket_timeout"] = None  # reads are bounded here
        connection_kwargs.setdefault("retry", None)
        connection_kwargs["protocol"] = 2  # pub/sub messages as plain replies
        self._conn_kwargs = connection_kwargs
        self._cluster: RedisCluster | None = None
        self._ctx: BrokerContext | None = None
        self._rooms: dict[bytes, str] = {}  # channel -> room, for every subscribed room
        self._shards: dict[str, _Shard] = {}
        self._lanes: dict[str, _Lane] = {}
        self._readers: dict[str, HistoryReaders] = {}  # history reads, per shard master
        self._lock = anyio.Lock()  # subscriptions: subscribe, unsubscribe, resync
        self._refresh_lock = anyio.Lock()
        self._resync_wake = anyio.Event()
        self._lost = False
        self._closed = False

    @classmethod
    def from_url(cls, url: str, **options: Any) -> RedisClusterBroker:
        """``redis://[user:pass@]host[:port][,host2:port2...]/?cluster=1[&operation_timeout=5...]``
        (every node listed is a seed: the client starts from whichever answers)."""
        first, seeds = split_seeds(url)
        if seeds:
            options.setdefault("seeds", seeds)
        kwargs, found = _parse_url(first, (("cluster", _flag), ("sharded", _flag), *_URL_OPTIONS))
        found.pop("cluster", None)
        if not found.pop("sharded", True):
            raise ConfigurationError(f"a Redis Cluster needs sharded pub/sub: {redact(url)!r}")
        return cls(**kwargs, **{**options, **found})

    # -- names ----------------------------------------------------------------------------------

    def _room_channel(self, room: str) -> bytes:
        assert self._ctx is not None
        return cluster_room_channel(self._ctx.namespace, room)

    def _wanted(self) -> list[bytes]:
        return [self._control, self._direct, *self._rooms]

    # -- the slot map ---------------------------------------------------------------------------

    def _cluster_client(self, **options: Any) -> RedisCluster:
        """A redis-py cluster client on the same address and credentials (slot map, storage)."""
        kwargs = {k: v for k, v in self._conn_kwargs.items() if k not in ("retry", "protocol")}
        if issubclass(self._connection_class, SSLConnection):
            kwargs["ssl"] = True
        kwargs.update(options)
        # Every seed: the first one listed may be the one that is down.
        seeds = [ClusterNode(host, port) for host, port in self.seeds] or None
        return RedisCluster(
            host=self.host, port=self.port, startup_nodes=seeds, protocol=2, **kwargs
        )

    def _owner(self, channel: bytes) -> str:
        assert self._cluster is not None
        try:
            node = self._cluster.nodes_manager.get_node_from_slot(key_slot(channel))
        except _SLOT_MAP_ERRORS as exc:
            raise BrokerUnavailable(f"Redis Cluster slot map: {describe(exc)}") from exc
        name: str = node.name
        return name

    async def _refresh_slots(self) -> None:
        """Reload the slot map (one reload at a time; a waiter gets the fresh one)."""
        assert self._cluster is not None
        async with self._refresh_lock:
            try:
                with anyio.fail_after(self.operation_timeout):
                    await self._cluster.nodes_manager.initialize()
            except _SLOT_MAP_ERRORS as exc:
                raise BrokerUnavailable(
                    f"cannot load the Redis Cluster slot map: {describe(exc)}"
                ) from exc

    def _request_resync(self, *, lost: bool = False) -> None:
        self._lost = self._lost or lost
        self._resync_wake.set()

    def _connection(self, node: str, role: str) -> Connection:
        host, _, port = node.rpartition(":")
        return self._connection_class(
            host=host, port=int(port), client_name=f"{self._client_name}-{role}",
            **self._conn_kwargs,
        )  # fmt: skip

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self, context: BrokerContext) -> None:
        self._ctx = context
        prefix = key_prefix(context.namespace)
        self._prefix = prefix
        self._store = store_key(context.namespace)
        self._control = prefix + b"c"
        self._direct = prefix + b"d:" + context.node_id.encode()
        self._client_name = "roomrouter-" + re.sub(r"[^A-Za-z0-9_.-]", "_", context.node_id)
        self._cluster = self._cluster_client()
        try:
            with anyio.fail_after(self.operation_timeout):
                await self._cluster.initialize()
            await self._ensure([self._control, self._direct])
        except (*_SLOT_MAP_ERRORS, BrokerUnavailable) as exc:
            await self.aclose()
            if isinstance(exc, BrokerUnavailable):
                raise
            raise unreachable("Redis Cluster", self.host, self.port, exc) from exc
        self._closed = False
        context.task_group.start_soon(self._maintain, name=f"redis-cluster {context.node_id}")

    async def aclose(self) -> None:
        self._closed = True
        error = BrokerUnavailable("broker closed")
        for shard in list(self._shards.values()):
            shard.closing = True
            shard.fail(error)
            await _quiet_disconnect(shard.conn)
        self._shards.clear()
        for lane in self._lanes.values():
            if lane.conn is not None:
                await _quiet_disconnect(lane.conn)
                lane.conn = None
            queued, lane.queue = lane.queue, []
            for item in queued:
                if not item.future.done():
                    item.future.set_exception(error)
        readers, self._readers = self._readers, {}
        for pool in readers.values():
            await pool.aclose()
        if self._cluster is not None:
            try:
                await self._cluster.aclose()
            except _NETWORK_ERRORS:
                pass
            self._cluster = None

    # -- subscriber connections -----------------------------------------------------------------

    async def _shard(self, node: str) -> _Shard:
        shard = self._shards.get(node)
        if shard is not None:
            return shard
        if self._closed:
            raise BrokerUnavailable("broker closed")
        conn = self._connection(node, "sub")
        try:
            with anyio.fail_after(self.operation_timeout):
                await conn.connect()  # type: ignore[no-untyped-call]
        except _NETWORK_ERRORS as exc:
            await _quiet_disconnect(conn)
            self._request_resync()  # the owner may have changed
            raise unreachable("Redis", node, None, exc) from exc
        shard = _Shard(node, conn, last_read=anyio.current_time())
        self._shards[node] = shard
        assert self._ctx is not None
        self._ctx.task_group.start_soon(
            self._read_shard, shard, name=f"redis-cluster reader {self._ctx.node_id} {node}"
        )
        return shard

    async def _read_shard(self, shard: _Shard) -> None:
        assert self._ctx is not None
        ctx = self._ctx
        while True:
            try:
                reply = await shard.conn.read_response()
            except ResponseError as exc:
                # An SSUBSCRIBE refused (MOVED: the slot map is stale). Its batch cannot be
                # told from the others in flight: fail them all; the caller retries.
                shard.last_read = anyio.current_time()
                shard.fail(BrokerUnavailable(f"Redis refused a subscription: {describe(exc)}"))
                self._request_resync()
                continue
            except _NETWORK_ERRORS as exc:
                if not shard.closing and not self._closed:
                    log.warning("node %s: Redis Cluster subscriber connection to %s lost: %s",
                                ctx.node_id, shard.node, describe(exc))  # fmt: skip
                    self._request_resync(lost=bool(shard.channels))
                self._drop_shard(
                    shard, BrokerUnavailable(f"Redis connection lost: {describe(exc)}")
                )
                await _quiet_disconnect(shard.conn)
                return
            shard.last_read = anyio.current_time()
            self._dispatch(shard, reply, ctx)

    def _drop_shard(self, shard: _Shard, error: BaseException) -> None:
        shard.closing = True
        shard.fail(error)
        if self._shards.get(shard.node) is shard:
            del self._shards[shard.node]

    def _dispatch(self, shard: _Shard, reply: Any, ctx: BrokerContext) -> None:
        if not isinstance(reply, list) or len(reply) < 3:
            return  # PONG and the like
        kind, channel, data = reply[0], reply[1], reply[2]
        if kind == b"smessage":
            try:
                if channel == self._control or channel == self._direct:
                    ctx.on_control(data)
                elif (room := self._rooms.get(channel)) is not None:
                    ctx.on_data(room, data)
                else:  # unsubscribed meanwhile
                    self.filtered += 1
            except Exception:  # a handler bug must not kill the reader
                log.exception("node %s: message handler raised", ctx.node_id)
        elif kind == b"ssubscribe":
            shard.channels.add(channel)
            _confirm(shard.confirm, channel)
        elif kind == b"sunsubscribe":
            shard.channels.discard(channel)
            if shard.unconfirm.get(channel):
                _confirm(shard.unconfirm, channel)
            else:  # the server dropped it: the slot moved away from this node
                log.info("node %s: %s dropped a shard channel; following the slot",
                         ctx.node_id, shard.node)  # fmt: skip
                self._request_resync(lost=True)

    async def _send(self, shard: _Shard, command: bytes, channels: list[bytes]) -> _Batch:
        """Send ``command`` for ``channels`` (one command per slot, one write) and return the
        batch the reader confirms."""
        table = shard.confirm if command == b"SSUBSCRIBE" else shard.unconfirm
        batch = _Batch(len(channels))
        by_slot: dict[int, list[bytes]] = {}
        for channel in channels:
            by_slot.setdefault(key_slot(channel), []).append(channel)
            table.setdefault(channel, deque()).append(batch)
        packed = b"".join(_pack(command, *group) for group in by_slot.values())
        try:
            with anyio.fail_after(self.operation_timeout):
                await shard.conn.send_packed_command(packed, check_health=False)
        except _NETWORK_ERRORS as exc:
            batch.fail(exc)
            await _quiet_disconnect(shard.conn)  # the reader notices and drops the shard
            raise BrokerUnavailable(f"Redis {command.decode()} failed: {describe(exc)}") from exc
        return batch

    async def _ensure(self, channels: Iterable[bytes]) -> int:
        """Subscribe ``channels`` on their slots' owners (those not there yet); returns how
        many were subscribed. Follows MOVED up to three times. All or nothing."""
        pending = list(channels)
        done: list[tuple[_Shard, bytes]] = []
        try:
            for attempt in range(_MAX_REDIRECTS + 1):
                groups: dict[str, list[bytes]] = {}
                for channel in pending:
                    node = self._owner(channel)
                    shard = self._shards.get(node)
                    if shard is None or channel not in shard.channels:
                        groups.setdefault(node, []).append(channel)
                failed: list[bytes] = []
                error: BaseException | None = None
                for node, group in groups.items():
                    shard = await self._shard(node)
                    batch = await self._send(shard, b"SSUBSCRIBE", group)
                    try:
                        with anyio.fail_after(self.operation_timeout):
                            await batch.done.wait()
                    except TimeoutError as exc:
                        batch.fail(exc)
                    if batch.error is None:
                        done.extend((shard, c) for c in group)
                    else:
                        failed.extend(group)
                        error = batch.error
                if not failed:
                    return len(done)
                if attempt == _MAX_REDIRECTS:
                    raise BrokerUnavailable(f"Redis SSUBSCRIBE failed: {error}")
                await self._refresh_slots()
                pending = failed
        except BaseException:
            # All or nothing: take back what this call subscribed (best effort; the next
            # resync drops whatever is left).
            taken: dict[_Shard, list[bytes]] = {}
            for shard, channel in done:
                shard.channels.discard(channel)
                taken.setdefault(shard, []).append(channel)
            with anyio.CancelScope(shield=True), anyio.move_on_after(1):
                for shard, group in taken.items():
                    try:
                        await self._send(shard, b"SUNSUBSCRIBE", group)
                    except BrokerUnavailable:
                        pass
            raise
        raise AssertionError("unreachable")

    # -- maintenance: follow the cluster --------------------------------------------------------

    async def _maintain(self) -> None:
        assert self._ctx is not None
        ctx = self._ctx
        while not self._closed:
            with anyio.move_on_after(self.health_interval) as tick:
                await self._resync_wake.wait()
            self._resync_wake = anyio.Event()
            if tick.cancelled_caught:
                await self._ping_idle()
            delay = 0.05
            while not self._closed:
                try:
                    await self._refresh_slots()
                    async with self._lock:
                        restored = await self._resync()
                    break
                except BrokerUnavailable as exc:
                    log.info("node %s: Redis Cluster resync failed (%s); retry in %.2fs",
                             ctx.node_id, exc, delay)  # fmt: skip
                    await anyio.sleep(delay)
                    delay = min(delay * 2, self.max_backoff)
            else:
                return
            if self._lost or restored:
                self._lost = False
                log.info("node %s: Redis Cluster subscriptions restored (%d room(s))",
                         ctx.node_id, len(self._rooms))  # fmt: skip
                ctx.on_reconnect()

    async def _resync(self) -> int:
        """Put every subscription on its slot's current owner; close unneeded connections."""
        wanted = self._wanted()
        owners = {channel: self._owner(channel) for channel in wanted}
        for shard in list(self._shards.values()):
            stale = [c for c in shard.channels if owners.get(c) != shard.node]
            if stale:
                shard.channels.difference_update(stale)
                try:
                    await self._send(shard, b"SUNSUBSCRIBE", stale)
                except BrokerUnavailable:
                    pass  # the connection is gone: so are its subscriptions
        restored = await self._ensure(wanted)
        needed = set(owners.values())
        for shard in list(self._shards.values()):
            if shard.node not in needed and not shard.confirm:
                self._drop_shard(shard, BrokerUnavailable("connection no longer needed"))
                await _quiet_disconnect(shard.conn)
        assert self._cluster is not None
        masters = {node.name for node in self._cluster.get_primaries()}
        for node in [n for n in self._readers if n not in masters]:
            await self._readers.pop(node).aclose()
        return restored

    async def _ping_idle(self) -> None:
        """A half-open connection never errors: PING idle ones on one tick, and drop those
        that did not answer by the next (the reader then sees the error and the resync
        restores their channels). Never waits, so a resync is never held up by it."""
        now = anyio.current_time()
        for shard in list(self._shards.values()):
            if shard.pinged_at is not None and shard.last_read < shard.pinged_at:
                log.warning("node %s: Redis Cluster subscriber connection to %s silent; "
                            "reconnecting", self._ctx.node_id if self._ctx else "?",
                            shard.node)  # fmt: skip
                await _quiet_disconnect(shard.conn)
                continue
            shard.pinged_at = None
            if now - shard.last_read > self.health_interval:
                shard.pinged_at = now
                try:
                    await shard.conn.send_packed_command(_pack(b"PING"), check_health=False)
                except _NETWORK_ERRORS:
                    pass

    # -- subscriptions --------------------------------------------------------------------------

    async def subscribe(self, rooms: Collection[str]) -> None:
        channels = {self._room_channel(room): room for room in rooms}
        async with self._lock:
            await self._ensure(channels)
            self._rooms.update(channels)

    async def unsubscribe(self, rooms: Collection[str]) -> None:
        channels = [self._room_channel(room) for room in rooms]
        async with self._lock:
            for channel in channels:
                self._rooms.pop(channel, None)
            by_shard: dict[_Shard, list[bytes]] = {}
            for shard in self._shards.values():
                mine = [c for c in channels if c in shard.channels]
                if mine:
                    by_shard[shard] = mine
            for shard, group in by_shard.items():
                try:
                    batch = await self._send(shard, b"SUNSUBSCRIBE", group)
                    with anyio.move_on_after(self.operation_timeout):
                        await batch.done.wait()
                except BrokerUnavailable:
                    pass  # best effort: forgotten either way

    # -- publishing -----------------------------------------------------------------------------

    async def publish(self, room: str, frame: bytes, *, to: Collection[str] | None = None) -> None:
        channel = self._room_channel(room)
        await self._submit(channel, _pack_publish(b"SPUBLISH", channel, frame), 1)

    async def publish_control(self, frame: bytes, *, to: str | None = None) -> int | None:
        channel = self._control if to is None else self._prefix + b"d:" + to.encode()
        return int(await self._submit(channel, _pack_publish(b"SPUBLISH", channel, frame), 1))

    def _submit(self, key: bytes, packed: bytes, replies: int) -> asyncio.Future[Any]:
        # Takes its place in its owner's queue before any await: call order is send order.
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if self._closed or self._cluster is None:
            future.set_exception(BrokerUnavailable("broker closed"))
            return future
        item = _Item(key_slot(key), packed, replies, future)
        try:
            self._enqueue(item)
        except BrokerUnavailable as exc:
            future.set_exception(exc)
        return future

    def _enqueue(self, item: _Item) -> None:
        assert self._cluster is not None
        node = item.target
        if node is None:
            try:
                node = self._cluster.nodes_manager.get_node_from_slot(item.slot).name
            except _SLOT_MAP_ERRORS as exc:
                raise BrokerUnavailable(f"Redis Cluster slot map: {describe(exc)}") from exc
        lane = self._lanes.get(node)
        if lane is None:
            lane = self._lanes[node] = _Lane(node)
            assert self._ctx is not None
            self._ctx.task_group.start_soon(
                self._flush_loop, lane, name=f"redis-cluster flusher {self._ctx.node_id} {node}"
            )
        lane.queue.append(item)
        lane.wake.set()

    async def _flush_loop(self, lane: _Lane) -> None:
        while True:
            await lane.wake.wait()
            lane.wake = anyio.Event()
            while lane.queue:
                batch, lane.queue = lane.queue, []
                await self._flush(lane, batch)

    async def _flush(self, lane: _Lane, batch: list[_Item]) -> None:
        results: list[Any] = []
        redirected: list[tuple[_Item, AskError]] = []
        sent = False
        try:
            conn = await self._publisher(lane)
            with anyio.fail_after(self.operation_timeout):
                sent = True  # from here on Redis may run what it read
                await conn.send_packed_command(
                    b"".join(_ASKING + q.packed if q.asking else q.packed for q in batch),
                    check_health=False,
                )
                for item in batch:
                    replies: list[Any] = []
                    for _ in range(item.replies + item.asking):
                        try:
                            replies.append(await conn.read_response())
                        except ResponseError as exc:  # a refusal: the stream stays in sync
                            replies.append(exc)
                    if item.asking:
                        del replies[0]  # ASKING's OK
                    # A redirection is an answer without effect: a MULTI holding one is
                    # discarded (EXECABORT), so sending the item again cannot do it twice.
                    moved = next((m for r in replies if (m := _redirect(r)) is not None), None)
                    if moved is not None:
                        redirected.append((item, moved))
                        results.append(None)
                        continue
                    reply = replies[-1]
                    if item.replies > 1 and isinstance(reply, list):  # MULTI ... EXEC
                        # The transaction ran: an error inside it did not undo the others.
                        inner = next((r for r in reply if isinstance(r, Exception)), None)
                        reply = reply[-1] if inner is None else PublishOutcomeUnknown(
                            f"Redis ran the transaction with an error: {inner}"
                        )  # fmt: skip
                    elif item.replies > 1:
                        reply = next((r for r in replies if isinstance(r, Exception)), reply)
                    if isinstance(reply, Exception) and not isinstance(reply, BrokerUnavailable):
                        reply = BrokerUnavailable(f"Redis refused the command: {reply}")
                    results.append(reply)
        except (*_NETWORK_ERRORS, BrokerUnavailable) as exc:
            if lane.conn is not None:
                await _quiet_disconnect(lane.conn)
                lane.conn = None
            self._request_resync()  # a shard that fails may have failed over
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
        again = {id(item) for item, _ in redirected}
        for item, result in zip(batch, results, strict=True):
            if item.future.done() or id(item) in again:
                continue
            if isinstance(result, BaseException):
                item.future.set_exception(result)
            else:
                item.future.set_result(result)
        if redirected:
            self._redirect(redirected)

    def _redirect(self, items: list[tuple[_Item, AskError]]) -> None:
        """Send again what the server answered MOVED/ASK, to the node the answer names (not
        the slot map's owner: the map may be older than the answer). ``MOVED`` also wakes the
        maintenance task, which reloads the map and moves the subscriptions of the slot;
        ``ASK`` (a slot being migrated) is for this one command, sent with ``ASKING``."""
        for item, redirection in items:
            item.redirects += 1
            if item.future.done():
                continue
            if item.redirects > _MAX_REDIRECTS:
                item.future.set_exception(BrokerUnavailable("Redis Cluster kept redirecting"))
                continue
            item.target = f"{redirection.host}:{redirection.port}"
            item.asking = not isinstance(redirection, MovedError)
            if not item.asking:
                self._request_resync()
            try:
                self._enqueue(item)
            except BrokerUnavailable as exc:
                item.future.set_exception(exc)

    async def _publisher(self, lane: _Lane) -> Connection:
        if self._closed:
            raise BrokerUnavailable("broker closed")
        if lane.conn is None:
            conn = self._connection(lane.node, "pub")
            try:
                with anyio.fail_after(self.operation_timeout):
                    await conn.connect()  # type: ignore[no-untyped-call]
            except _NETWORK_ERRORS as exc:
                await _quiet_disconnect(conn)
                raise unreachable("Redis", lane.node, None, exc) from exc
            lane.conn = conn
        return lane.conn

    # -- persistence (see the module docstring) -------------------------------------------------

    def _recent_key(self, room: str) -> bytes:
        assert self._ctx is not None
        return cluster_recent_key(self._ctx.namespace, room)

    async def publish_persistent(
        self, room: str, frame: bytes, *, live: bool, to: Collection[str] | None = None
    ) -> None:
        recent = self._recent_key(room)
        stored = self._submit(self._store, _pack(b"XADD", self._store, b"*", b"f", frame), 1)
        commands = [
            _pack(b"MULTI"),
            _pack(b"XADD", recent, b"MAXLEN", b"%d" % self.recent_size, b"*", b"f", frame),
            _pack(b"EXPIRE", recent, b"%d" % self.recent_ttl),
        ]
        if live:
            commands.append(_pack_publish(b"SPUBLISH", self._room_channel(room), frame))
        commands.append(_pack(b"EXEC"))
        cached = self._submit(recent, b"".join(commands), len(commands))
        results = await asyncio.gather(stored, cached, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if not errors:
            return
        for error in errors:
            if not isinstance(error, BrokerUnavailable) or isinstance(error, PublishOutcomeUnknown):
                raise error
        if len(errors) == len(results):
            raise errors[0]  # neither part left this node (or either was refused): not sent
        # One part was done and the other not: the call did happen in part (stored without
        # the recent cache and live publish, or the reverse), so it must not say "not sent",
        # or a retry under a new id would store or deliver it twice.
        done, failed = (
            ("stored", "the recent cache and live publish")
            if isinstance(results[1], BaseException)
            else ("cached and published live", "the storage append")
        )
        raise PublishOutcomeUnknown(f"{done}, but {failed} failed: {errors[0]}") from errors[0]

    async def recent(
        self, room: str, *, since: str | None = None, limit: int | None = None
    ) -> RecentFrames:
        """Like ``RedisBroker.recent``: XREVRANGE in chunks from the newest entry until the
        scan reached ``since`` or ``limit``, on history-read connections of their own to the
        room's shard master (never the shard's publisher pipeline, nor its timeout). A
        ``MOVED``/``ASK`` answer sends the scan again to the node it names (``ASK``: each
        command with ``ASKING``; a read has no effect, so a scan cut short is simply redone);
        a failed read wakes the resync, which follows a failover."""
        key = self._recent_key(room)
        target: str | None = None
        asking = False
        for _ in range(_MAX_REDIRECTS + 1):
            readers = self._readers_of(target or self._owner(key))
            redirection: AskError | None = None
            try:
                async with readers.reading() as read:
                    scan_read = partial(read, asking=True) if asking else read
                    try:
                        return await scan_recent(scan_read, key, since, limit, self.recent_size)
                    except AskError as exc:  # answered without effect: the connection is fine
                        redirection = exc
            except BrokerUnavailable:
                self._request_resync()  # the shard may have failed over, or the slot moved
                raise
            assert redirection is not None
            target = f"{redirection.host}:{redirection.port}"
            asking = not isinstance(redirection, MovedError)
            if not asking:
                self._request_resync()
        raise BrokerUnavailable("Redis Cluster kept redirecting the history read")

    def _readers_of(self, node: str) -> HistoryReaders:
        """This node's history-read connections to shard master ``node`` (made on first use;
        the resync closes those of nodes that are no longer masters)."""
        if self._closed:
            raise BrokerUnavailable("broker closed")
        readers = self._readers.get(node)
        if readers is None:
            readers = self._readers[node] = HistoryReaders(
                partial(self._connection, node, "read"), self.operation_timeout
            )
        return readers

    def storage_consumer(self, namespace: str, consumer: str) -> StorageConsumer:
        return _ClusterConsumer(cast(RedisBroker, self), store_key(namespace), consumer)

    # -- introspection (tests, inspect) ---------------------------------------------------------

    async def _masters(self) -> list[str]:
        await self._refresh_slots()
        assert self._cluster is not None
        return sorted(n.name for n in self._cluster.get_primaries())

    async def _ask(self, node: str, *command: bytes) -> Any:
        conn = self._connection(node, "inspect")
        try:
            with anyio.fail_after(self.operation_timeout):
                await conn.connect()  # type: ignore[no-untyped-call]
                await conn.send_command(*command)
                return await conn.read_response()
        except _NETWORK_ERRORS as exc:
            raise BrokerUnavailable(f"Redis {command[0].decode()} failed: {describe(exc)}") from exc
        finally:
            await _quiet_disconnect(conn)

    async def server_channels(self, node: str | None = None) -> dict[str, int]:
        """Rooms of this namespace with subscribers, and how many, as the shard masters report
        them (``PUBSUB SHARDCHANNELS`` + ``SHARDNUMSUB`` on each one, or only on ``node``)."""
        assert self._ctx is not None
        prefix = b"rr:" + _ns(self._ctx.namespace) + b":r:{"
        pattern = re.sub(rb"([*?\[\]\\])", rb"\\\1", prefix) + b"*"
        result: dict[str, int] = {}
        for master in [node] if node else await self._masters():
            channels = await self._ask(master, b"PUBSUB", b"SHARDCHANNELS", pattern)
            if not channels:
                continue
            flat = await self._ask(master, b"PUBSUB", b"SHARDNUMSUB", *channels)
            for channel, count in zip(flat[::2], flat[1::2], strict=True):
                if count and channel.endswith(b"}"):
                    room = _unescape(channel[len(prefix) : -1])
                    result[room] = result.get(room, 0) + int(count)
        return result

    async def server_subscriber_connections(self) -> dict[str, int]:
        """Per shard master: how many room channels this node's subscriber connection there
        holds (``CLIENT LIST``; control channels not counted). Masters where this node has no
        subscriber connection are left out."""
        name = f"name={self._client_name}-sub".encode()
        out: dict[str, int] = {}
        for master in await self._masters():
            listing = await self._ask(master, b"CLIENT", b"LIST", b"TYPE", b"pubsub")
            for line in listing.splitlines():
                fields = line.split()
                if name in fields:
                    if master in out:
                        raise BrokerUnavailable(f"two subscriber connections on {master}")
                    ssub = next(int(f[5:]) for f in fields if f.startswith(b"ssub="))
                    control = sum(self._owner(c) == master for c in (self._control, self._direct))
                    out[master] = ssub - control
        return out

    async def server_subscription_count(self) -> int:
        """Room channels this node holds over all shards, per ``CLIENT LIST``."""
        return sum((await self.server_subscriber_connections()).values())

    def client_name(self, role: str = "sub") -> str:
        """The ``CLIENT SETNAME`` of this node's connections (``sub`` or ``pub``), the same on
        every shard."""
        return f"{self._client_name}-{role}"

    def shard_of(self, room: str) -> str:
        """``host:port`` of the master that owns ``room``'s slot now."""
        return self._owner(self._room_channel(room))


_UNESCAPE = re.compile(rb"%(25|3A|7B|7D)")


def _unescape(value: bytes) -> str:
    return _UNESCAPE.sub(lambda m: bytes([int(m.group(1), 16)]), value).decode(errors="replace")


class _ClusterConsumer(_RedisConsumer):
    """The storage consumer of :class:`RedisBroker`, on the master that owns the storage
    stream's slot: the stream, its epoch and lost marks share the namespace's hash tag, so
    every command goes to that one node, on a plain client of its own.

    Not through redis-py's cluster client: that one finds the keys of XREADGROUP (a command
    with "movable keys") by asking ``COMMAND GETKEYS`` of the node it started from, before
    (and outside) its retry loop, so once that seed node dies every fetch fails forever even
    though the stream's master is healthy. Here the slot is computed locally; after any
    failure the slot map is reloaded from any node known (the seeds and every node the last
    map listed) and the client moved to the slot's current owner."""

    _cluster: RedisCluster | None = None
    _node: str | None = None
    _stale = False

    async def start(self) -> None:
        broker = cast(RedisClusterBroker, self._broker)
        self._cluster = broker._cluster_client()
        try:
            with anyio.fail_after(broker.operation_timeout):
                await self._cluster.initialize()
                self._follow_owner()
                self._epoch = await self._create_group()
        except (*_SLOT_MAP_ERRORS, BrokerUnavailable) as exc:
            await self.aclose()
            if isinstance(exc, BrokerUnavailable):
                raise
            raise unreachable("Redis Cluster", broker.host, broker.port, exc) from exc

    def _follow_owner(self) -> Any:
        """Point the client at the current owner of the stream's slot (per the slot map);
        returns the client it replaced, to be closed (or None)."""
        from redis.asyncio import ConnectionPool, Redis

        assert self._cluster is not None
        broker = cast(RedisClusterBroker, self._broker)
        try:
            node = self._cluster.nodes_manager.get_node_from_slot(key_slot(self._stream)).name
        except _SLOT_MAP_ERRORS as exc:
            raise BrokerUnavailable(f"Redis Cluster slot map: {describe(exc)}") from exc
        if node == self._node and self._client is not None:
            return None
        old, self._node = self._client, node
        host, _, port = node.rpartition(":")
        pool = ConnectionPool(
            connection_class=broker._connection_class, host=host, port=int(port),
            client_name=f"roomrouter-worker-{self._name.decode(errors='replace')}",
            **broker._conn_kwargs,
        )  # fmt: skip
        self._client = Redis(connection_pool=pool)
        return old

    async def _refresh(self) -> None:
        assert self._cluster is not None
        broker = cast(RedisClusterBroker, self._broker)
        try:
            with anyio.fail_after(broker.operation_timeout):
                await self._cluster.nodes_manager.initialize()
        except _SLOT_MAP_ERRORS as exc:
            raise BrokerUnavailable(
                f"cannot load the Redis Cluster slot map: {describe(exc)}"
            ) from exc
        old = self._follow_owner()
        self._stale = False
        if old is not None:
            # Bounded: closing sockets to a dead node must not hold up the next fetch.
            with anyio.move_on_after(1, shield=True):
                try:
                    await old.aclose(close_connection_pool=True)
                except _NETWORK_ERRORS:
                    pass

    async def _guarded(self, call: Any, seconds: float) -> Any:
        if self._stale:
            await self._refresh()
        try:
            with anyio.fail_after(seconds):
                return await call()
        except TimeoutError as exc:
            self._stale = True
            raise BrokerUnavailable(f"no answer from Redis node {self._node} in time") from exc
        except BrokerUnavailable:
            self._stale = True  # the node died, failed over, or the slot moved: look again
            raise

    async def fetch(self, max_frames: int, wait: float) -> list[StoredFrame]:
        timeout = wait + 2 * self._broker.operation_timeout
        frames: list[StoredFrame] = await self._guarded(
            lambda: super(_ClusterConsumer, self).fetch(max_frames, wait), timeout
        )
        return frames

    async def ack(self, frames: Sequence[StoredFrame]) -> None:
        await self._guarded(
            lambda: super(_ClusterConsumer, self).ack(frames), self._broker.operation_timeout
        )

    async def pending(self) -> int:
        count: int = await self._guarded(
            lambda: super(_ClusterConsumer, self).pending(), self._broker.operation_timeout
        )
        return count

    async def aclose(self) -> None:
        await super().aclose()
        if self._cluster is not None:
            cluster, self._cluster = self._cluster, None
            try:
                await cluster.aclose()
            except _NETWORK_ERRORS:
                pass
