"""Redis Cluster broker (``redis://host:port/?cluster=1``): sharded pub/sub, one subscriber
connection per shard master the node needs.

Names (see :mod:`roomrouter.brokers.redis`). Room channels must spread over the shards, so
the *room* is their hash tag: ``rr:<ns>:r:{<room>}`` and ``rr:<ns>:recent:{<room>}`` (the
room's recent cache, in its slot so that cache and live publish share one MULTI). Everything
used together across rooms keeps the *namespace* as its hash tag, exactly as on a single
Redis: the control channels, the storage stream (with its epoch) and the presence keys.

Storage. One storage stream per namespace, on the namespace's slot: the storage worker, its
consumer group, XAUTOCLAIM redelivery and queue-loss epoch work unchanged, and no worker has to
discover streams. The price: a persisted publish is two pipelined writes on (usually) two
shards — ``XADD`` to the storage stream, and ``MULTI XADD recent / EXPIRE / SPUBLISH EXEC`` on
the room's shard — sent at once and both awaited; ``publish_persistent`` returns only when
both succeeded (acknowledged ⇒ stored). A failed call is "not sent" only if neither write
may have run; once one was done or may have been, :class:`~roomrouter.PublishOutcomeUnknown`.
A namespace's persisted traffic goes through one shard's stream (spread load: namespaces).

Connections. The slot map comes from redis-py's :class:`~redis.asyncio.cluster.RedisCluster`
(``nodes_manager``); the data plane runs on raw connections of our own, because redis-py's
cluster pub/sub confirms nothing and hides which node holds what. Per shard master in use:

* a *subscriber* connection (``roomrouter-<node>-sub``, a :class:`~._subscriber.Subscriber`
  as on a single Redis) with its own reader task; a batch is one SSUBSCRIBE per slot (it
  takes only channels of one slot), all in one write, confirmed by the reader;
* a publisher *lane* (:class:`~._pipeline.Lane`, the single Redis's pipeline and settle rule),
  which takes the publishes of the slots the master owns;
* once a history read went there, up to ``READERS`` *history-read* connections
  (:class:`~._history.HistoryReaders`), so that recoveries never wait behind a lane.

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
from collections.abc import Collection, Iterable
from functools import partial
from typing import Any

import anyio
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import Connection, SSLConnection
from redis.crc import key_slot
from redis.exceptions import AskError, MovedError, ResponseError

from ..._errors import (
    BrokerUnavailable,
    ConfigurationError,
    PublishOutcomeUnknown,
    describe,
    unreachable,
)
from ..._urls import redact
from .. import Broker, BrokerContext, RecentFrames, StorageConsumer
from ..transport import Backoff, Send
from ._common import (
    NETWORK_ERRORS,
    URL_OPTIONS,
    ask,
    cluster_recent_key,
    cluster_room_channel,
    glob_escape,
    key_prefix,
    open_connection,
    pack,
    pack_publish,
    parse_redis_url,
    quiet_disconnect,
    split_seeds,
    store_key,
    unescape,
    url_flag,
)
from ._history import HistoryReaders, scan_recent
from ._pipeline import Command, Lane
from ._storage import SLOT_MAP_ERRORS, ClusterConsumer, ConsumerSettings
from ._subscriber import Subscriber

__all__ = ["RedisClusterBroker"]

log = logging.getLogger("roomrouter.redis")

_MAX_REDIRECTS = 3


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
        self._shards: dict[str, Subscriber] = {}
        self._lanes: dict[str, Lane] = {}
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
        kwargs, found = parse_redis_url(
            first, (("cluster", url_flag), ("sharded", url_flag), *URL_OPTIONS)
        )
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
        except SLOT_MAP_ERRORS as exc:
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
            except SLOT_MAP_ERRORS as exc:
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
        except (*SLOT_MAP_ERRORS, BrokerUnavailable) as exc:
            await self.aclose()
            if isinstance(exc, BrokerUnavailable):
                raise
            raise unreachable("Redis Cluster", self.host, self.port, exc) from exc
        self._closed = False
        context.task_group.start_soon(self._maintain, name=f"redis-cluster {context.node_id}")

    async def aclose(self) -> None:
        self._closed = True
        error = BrokerUnavailable("broker closed")
        shards, self._shards = list(self._shards.values()), {}
        for shard in shards:
            await shard.close(error)
        for lane in self._lanes.values():
            await lane.close("broker closed")
        readers, self._readers = self._readers, {}
        for pool in readers.values():
            await pool.aclose()
        if self._cluster is not None:
            try:
                await self._cluster.aclose()
            except NETWORK_ERRORS:
                pass
            self._cluster = None

    # -- subscriber connections -----------------------------------------------------------------

    async def _shard(self, node: str) -> Subscriber:
        shard = self._shards.get(node)
        if shard is not None:
            return shard
        if self._closed:
            raise BrokerUnavailable("broker closed")
        try:
            conn = await open_connection(self._connection(node, "sub"), self.operation_timeout)
        except NETWORK_ERRORS as exc:
            self._request_resync()  # the owner may have changed
            raise unreachable("Redis", node, None, exc) from exc
        shard = Subscriber(node, conn, sharded=True, slotted=True, on_dropped=self._dropped)
        self._shards[node] = shard
        assert self._ctx is not None
        self._ctx.task_group.start_soon(
            self._read_shard, shard, name=f"redis-cluster reader {self._ctx.node_id} {node}"
        )
        return shard

    async def _read_shard(self, shard: Subscriber) -> None:
        assert self._ctx is not None
        ctx = self._ctx
        while True:
            try:
                message = shard.on_reply(await shard.conn.read_response())
            except ResponseError as exc:
                # An SSUBSCRIBE refused (MOVED: the slot map is stale). Its batch cannot be
                # told from the others in flight: fail them all; the caller retries.
                shard.last_read = anyio.current_time()
                shard.fail(BrokerUnavailable(f"Redis refused a subscription: {describe(exc)}"))
                self._request_resync()
                continue
            except NETWORK_ERRORS as exc:
                if not shard.closing and not self._closed:
                    log.warning("node %s: Redis Cluster subscriber connection to %s lost: %s",
                                ctx.node_id, shard.node, describe(exc))  # fmt: skip
                    self._request_resync(lost=bool(shard.channels))
                self._forget_shard(shard)
                await shard.close(BrokerUnavailable(f"Redis connection lost: {describe(exc)}"))
                return
            if message is None:
                continue
            channel, data = message
            try:
                if channel == self._control or channel == self._direct:
                    ctx.on_control(data)
                elif (room := self._rooms.get(channel)) is not None:
                    ctx.on_data(room, data)
                else:  # unsubscribed meanwhile
                    self.filtered += 1
            except Exception:  # a handler bug must not kill the reader
                log.exception("node %s: message handler raised", ctx.node_id)

    def _dropped(self, shard: Subscriber, channel: bytes) -> None:
        """The server dropped a shard channel unasked: its slot moved away from that node."""
        log.info("node %s: %s dropped a shard channel; following the slot",
                 self._ctx.node_id if self._ctx else "?", shard.node)  # fmt: skip
        self._request_resync(lost=True)

    def _forget_shard(self, shard: Subscriber) -> None:
        shard.closing = True
        if self._shards.get(shard.node) is shard:
            del self._shards[shard.node]

    async def _ensure(self, channels: Iterable[bytes]) -> int:
        """Subscribe ``channels`` on their slots' owners (those not there yet); returns how
        many were subscribed. Follows MOVED up to three times. All or nothing."""
        pending = list(channels)
        done: list[tuple[Subscriber, bytes]] = []
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
                    batch = await shard.send(True, group, self.operation_timeout)
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
                    reason = describe(error) if error is not None else "?"
                    raise BrokerUnavailable(f"Redis SSUBSCRIBE failed: {reason}")
                await self._refresh_slots()
                pending = failed
        except BaseException:
            # All or nothing: take back what this call subscribed (best effort; the next
            # resync drops whatever is left).
            taken: dict[Subscriber, list[bytes]] = {}
            for shard, channel in done:
                shard.channels.discard(channel)
                taken.setdefault(shard, []).append(channel)
            with anyio.CancelScope(shield=True), anyio.move_on_after(1):
                for shard, group in taken.items():
                    try:
                        await shard.send(False, group, self.operation_timeout)
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
            backoff = Backoff(min(0.05, self.max_backoff), self.max_backoff)
            while not self._closed:
                try:
                    await self._refresh_slots()
                    async with self._lock:
                        restored = await self._resync()
                    break
                except BrokerUnavailable as exc:
                    delay = backoff.next()
                    log.info("node %s: Redis Cluster resync failed (%s); retry in %.2fs",
                             ctx.node_id, exc, delay)  # fmt: skip
                    await anyio.sleep(delay)
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
                    await shard.send(False, stale, self.operation_timeout)
                except BrokerUnavailable:
                    pass  # the connection is gone: so are its subscriptions
        restored = await self._ensure(wanted)
        needed = set(owners.values())
        for shard in list(self._shards.values()):
            if shard.node not in needed and not shard.confirming:
                self._forget_shard(shard)
                await shard.close(BrokerUnavailable("connection no longer needed"))
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
                await quiet_disconnect(shard.conn)
                continue
            shard.pinged_at = None
            if now - shard.last_read > self.health_interval:
                shard.pinged_at = now
                await shard.ping()

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
            by_shard: dict[Subscriber, list[bytes]] = {}
            for shard in self._shards.values():
                mine = [c for c in channels if c in shard.channels]
                if mine:
                    by_shard[shard] = mine
            for shard, group in by_shard.items():
                try:
                    batch = await shard.send(False, group, self.operation_timeout)
                    with anyio.move_on_after(self.operation_timeout):
                        await batch.done.wait()
                except BrokerUnavailable:
                    pass  # best effort: forgotten either way

    # -- publishing -----------------------------------------------------------------------------

    async def publish(self, room: str, frame: bytes, *, to: Collection[str] | None = None) -> None:
        channel = self._room_channel(room)
        await self._submit(channel, pack_publish(b"SPUBLISH", channel, frame), 1)

    async def publish_control(self, frame: bytes, *, to: str | None = None) -> int | None:
        channel = self._control if to is None else self._prefix + b"d:" + to.encode()
        return int(await self._submit(channel, pack_publish(b"SPUBLISH", channel, frame), 1))

    def _submit(self, key: bytes, packed: bytes, replies: int) -> asyncio.Future[Any]:
        """Queue a publish on the lane of its slot's owner, before any await: call order is
        send order (per shard)."""
        if self._closed or self._cluster is None:
            future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            future.set_exception(BrokerUnavailable("broker closed"))
            return future
        command = Command(packed, replies, key_slot(key))
        try:
            node = self._cluster.nodes_manager.get_node_from_slot(command.slot).name
        except SLOT_MAP_ERRORS as exc:
            future = asyncio.get_running_loop().create_future()
            future.set_exception(BrokerUnavailable(f"Redis Cluster slot map: {describe(exc)}"))
            return future
        future = self._lane(node).submit(command)
        return future

    def _lane(self, node: str) -> Lane:
        """The publisher lane of shard master ``node`` (made, and its sender started, on first
        use)."""
        lane = self._lanes.get(node)
        if lane is None:
            assert self._ctx is not None
            lane = self._lanes[node] = Lane(
                node, partial(self._connect_publisher, node), self.operation_timeout,
                service="Redis Cluster", on_failure=self._request_resync,
                redirect=self._redirect,
            )  # fmt: skip
            self._ctx.task_group.start_soon(
                lane.run, name=f"redis-cluster publisher {self._ctx.node_id} {node}"
            )
        return lane

    def _redirect(self, send: Send[Command], redirection: AskError) -> None:
        """Send again what the server answered MOVED/ASK (an answer without effect), to the
        node the answer names (not the slot map's owner: the map may be older than the
        answer). ``MOVED`` also wakes the maintenance task, which reloads the map and moves the
        subscriptions of the slot; ``ASK`` (a slot being migrated) is for this one command,
        sent with ``ASKING``."""
        command = send.item
        command.redirects += 1
        if command.redirects > _MAX_REDIRECTS:
            send.refuse(BrokerUnavailable("Redis Cluster kept redirecting the publish"))
            return
        command.target = f"{redirection.host}:{redirection.port}"
        command.asking = not isinstance(redirection, MovedError)
        if not command.asking:
            self._request_resync()
        if self._closed:
            send.fail("Redis Cluster", "broker closed")
            return
        self._lane(command.target).outbox.requeue([send])

    async def _connect_publisher(self, node: str) -> Connection:
        if self._closed:
            raise BrokerUnavailable("broker closed")
        try:
            conn = await open_connection(self._connection(node, "pub"), self.operation_timeout)
        except NETWORK_ERRORS as exc:
            raise unreachable("Redis", node, None, exc) from exc
        if self._closed:  # closed while connecting: aclose() could not see this one
            await quiet_disconnect(conn)
            raise BrokerUnavailable("broker closed")
        return conn

    # -- persistence (see the module docstring) -------------------------------------------------

    def _recent_key(self, room: str) -> bytes:
        assert self._ctx is not None
        return cluster_recent_key(self._ctx.namespace, room)

    async def publish_persistent(
        self, room: str, frame: bytes, *, live: bool, to: Collection[str] | None = None
    ) -> None:
        recent = self._recent_key(room)
        stored = self._submit(self._store, pack(b"XADD", self._store, b"*", b"f", frame), 1)
        commands = [
            pack(b"MULTI"),
            pack(b"XADD", recent, b"MAXLEN", b"%d" % self.recent_size, b"*", b"f", frame),
            pack(b"EXPIRE", recent, b"%d" % self.recent_ttl),
        ]
        if live:
            commands.append(pack_publish(b"SPUBLISH", self._room_channel(room), frame))
        commands.append(pack(b"EXEC"))
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
        settings = ConsumerSettings(
            self._connection_class, self._conn_kwargs, self.operation_timeout,
            self.redelivery_after, self.host, self.port, self._cluster_client,
        )  # fmt: skip
        return ClusterConsumer(settings, store_key(namespace), consumer)

    # -- introspection (tests, inspect) ---------------------------------------------------------

    async def _masters(self) -> list[str]:
        await self._refresh_slots()
        assert self._cluster is not None
        return sorted(n.name for n in self._cluster.get_primaries())

    async def _ask(self, node: str, *command: bytes) -> Any:
        conn = self._connection(node, "inspect")
        return (await ask(conn, self.operation_timeout, command))[0]

    async def server_channels(self, node: str | None = None) -> dict[str, int]:
        """Rooms of this namespace with subscribers, and how many, as the shard masters report
        them (``PUBSUB SHARDCHANNELS`` + ``SHARDNUMSUB`` on each one, or only on ``node``)."""
        assert self._ctx is not None
        prefix = cluster_room_channel(self._ctx.namespace, "")[:-1]  # rr:<ns>:r:{
        pattern = glob_escape(prefix) + b"*"
        result: dict[str, int] = {}
        for master in [node] if node else await self._masters():
            channels = await self._ask(master, b"PUBSUB", b"SHARDCHANNELS", pattern)
            if not channels:
                continue
            flat = await self._ask(master, b"PUBSUB", b"SHARDNUMSUB", *channels)
            for channel, count in zip(flat[::2], flat[1::2], strict=True):
                if count and channel.endswith(b"}"):
                    room = unescape(channel[len(prefix) : -1])
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
