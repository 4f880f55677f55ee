"""Redis presence store.

Keys of namespace ``ns`` start with the Redis broker's :func:`~roomrouter.brokers.redis.key_prefix`
(``rr:{<ns>}:``), so one Redis serves broker and presence without collisions, and the hash tag
keeps one namespace's keys in one Redis Cluster slot:

* ``p:{room}`` — hash: member id -> entry (msgpack). Empty hashes vanish in Redis, so a room's
  state goes with its last member (room lifecycle).
* ``pn:{node}`` — the node's liveness: set with a TTL, refreshed every heartbeat.
* ``pr:{node}`` — the rooms the node wrote entries to, so a dead node's entries can be found.
* ``pe:{room}`` — pub/sub channel of the room's join and leave events.

A removal deletes the entry and publishes its leave event in one script, only if the entry was
there: when several nodes clean up a dead node at once, each leave is published once.

On a Redis Cluster (``redis://host:port/?cluster=1``) the same keys live in the namespace's
slot (the hash tag), so every MULTI and script stays on one shard; the client is redis-py's
``RedisCluster``, started from every node the URL lists (``redis://h1:7000,h2:7001/?cluster=1``)
so that one of them being down does not stop a start. Events stay on classic pub/sub, which
a cluster carries to every node, so a watcher may listen on any node; a join's event is
published by a one-line script that names its channel as a key, because a cluster transaction
must know the slot of every command.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio
import msgspec
from anyio.streams.memory import MemoryObjectSendStream
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError

from .._errors import BrokerUnavailable, ConfigurationError, describe, unreachable
from ..brokers import TaskStarter
from ..brokers.redis import glob_escape, key_prefix, parse_redis_url, split_seeds, url_flag
from ..brokers.transport import Backoff
from ._base import Presence, PresenceEntry, PresenceEvent, PresenceWrite

__all__ = ["RedisPresence"]

log = logging.getLogger("roomrouter.presence")

WATCH_BUFFER = 1000

# KEYS: room hash, event channel. ARGV: member, encoded leave event.
_REMOVE = """
if redis.call('HDEL', KEYS[1], ARGV[1]) == 1 then
  redis.call('PUBLISH', KEYS[2], ARGV[2])
  return 1
end
return 0
"""

# KEYS: event channel (named as a key only so a cluster knows its slot). ARGV: event.
_PUBLISH = "return redis.call('PUBLISH', KEYS[1], ARGV[1])"

_entry_decoder = msgspec.msgpack.Decoder(PresenceEntry)
_event_decoder = msgspec.msgpack.Decoder(PresenceEvent)
_encode = msgspec.msgpack.Encoder().encode


class RedisPresence(Presence):
    """``RedisPresence.from_url("redis://127.0.0.1:6379/0")``; connection keyword arguments
    are redis-py's. ``operation_timeout`` bounds every call."""

    name = "redis"

    def __init__(
        self,
        *,
        operation_timeout: float = 5.0,
        cluster: bool = False,
        seeds: Sequence[tuple[str, int]] = (),
        **connection_kwargs: Any,
    ) -> None:
        self.operation_timeout = operation_timeout
        self.cluster = cluster
        if seeds and not cluster:
            raise ConfigurationError("several Redis nodes are a Redis Cluster: add ?cluster=1")
        self.seeds = [(h, int(p)) for h, p in seeds]
        connection_kwargs.setdefault("socket_connect_timeout", operation_timeout)
        connection_kwargs.setdefault("socket_timeout", operation_timeout)
        self._kwargs = connection_kwargs
        self._client: Redis | None = None
        self._pubsub: PubSub | None = None
        self._watchers: dict[bytes, set[MemoryObjectSendStream[PresenceEvent]]] = {}
        self._tg: TaskStarter | None = None
        self._reader_running = False
        self._ttl_ms = 5000
        self._node = ""
        self._p = b""
        self.events_lost = 0
        self.dropped_decode = 0

    @classmethod
    def from_url(cls, url: str) -> RedisPresence:
        """``redis://[user:pass@]host[:port][/db][?operation_timeout=5][&cluster=1]``; a
        cluster's URL may list several seed nodes, ``redis://h1:7000,h2:7001/?cluster=1``."""
        first, seeds = split_seeds(url)
        kwargs, options = parse_redis_url(
            first, (("cluster", url_flag), ("operation_timeout", float))
        )
        return cls(**kwargs, **options, seeds=seeds)

    # -- names ------------------------------------------------------------------------------------

    def _room_key(self, room: str) -> bytes:
        return self._p + b"p:" + room.encode()

    def _events(self, room: str) -> bytes:
        return self._p + b"pe:" + room.encode()

    def _alive_key(self, node: str) -> bytes:
        return self._p + b"pn:" + node.encode()

    def _rooms_key(self, node: str) -> bytes:
        return self._p + b"pr:" + node.encode()

    @property
    def _r(self) -> Redis:
        if self._client is None:
            raise BrokerUnavailable("Redis presence store is not started")
        return self._client

    # -- lifecycle --------------------------------------------------------------------------------

    async def start(
        self, namespace: str, node_id: str, *, ttl: float, task_group: TaskStarter
    ) -> None:
        self._p = key_prefix(namespace)
        self._node = node_id
        self._ttl_ms = max(int(ttl * 1000), 1)
        self._tg = task_group
        self._client = self._new_client()
        try:
            await self.refresh()
        except BaseException:
            await self._disconnect()
            raise

    def _new_client(self) -> Redis:
        if not self.cluster:
            # No retries inside redis-py: by default it retries a refused connection for about
            # 4.5 s, which under load outlasts operation_timeout and turns "connection refused"
            # into "no answer in time". The refresh loop and the events reader retry themselves.
            return Redis(**{"retry": None, **self._kwargs}, protocol=2)
        kwargs = dict(self._kwargs)
        if kwargs.pop("db", 0) not in (0, "0"):
            raise ConfigurationError("Redis Cluster has only database 0")
        connection_class = kwargs.pop("connection_class", None)
        if connection_class is not None and connection_class.__name__ == "SSLConnection":
            kwargs["ssl"] = True
        seeds = [ClusterNode(host, port) for host, port in self.seeds] or None
        # Same commands as Redis for everything used here; typed as Redis for one code path.
        return RedisCluster(**kwargs, startup_nodes=seeds, protocol=2)  # type: ignore[return-value]

    async def aclose(self) -> None:
        if self._client is None:
            return
        with anyio.move_on_after(self.operation_timeout, shield=True):
            try:
                await self.forget_node(self._node)
                await self._r.delete(self._alive_key(self._node))
            except BrokerUnavailable as exc:
                log.info("presence: could not remove this node's entries on close: %s", exc)
            except RedisError as exc:
                log.info(
                    "presence: could not remove this node's entries on close: %s", describe(exc)
                )
        await self._disconnect()

    async def _disconnect(self) -> None:
        with anyio.CancelScope(shield=True):
            if self._pubsub is not None:
                try:
                    await self._pubsub.aclose()  # type: ignore[no-untyped-call]
                except (RedisError, OSError):
                    pass
                self._pubsub = None
            if self._client is not None:
                try:
                    await self._client.aclose()
                except (RedisError, OSError):
                    pass
                self._client = None
        for streams in self._watchers.values():
            for stream in streams:
                stream.close()
        self._watchers.clear()

    async def _call(self, what: str, coro: Any) -> Any:
        try:
            with anyio.fail_after(self.operation_timeout):
                return await coro
        except TimeoutError as exc:
            raise BrokerUnavailable(f"presence {what}: no answer from Redis in time") from exc
        except (RedisConnectionError, OSError, RedisClusterException) as exc:
            # RedisClusterException (no node reachable, slot not covered) is no RedisError.
            host, port = self._kwargs.get("path") or self._kwargs.get("host"), None
            if "path" not in self._kwargs:
                port = self._kwargs.get("port", 6379)
            raise unreachable("Redis", host, port, exc, purpose="presence") from exc
        except RedisError as exc:
            raise BrokerUnavailable(f"presence {what} failed: {describe(exc)}") from exc

    # -- entries ----------------------------------------------------------------------------------

    async def write(self, changes: Sequence[PresenceWrite]) -> None:
        r = self._r
        pipe = r.pipeline(transaction=True)
        rooms_key = self._rooms_key(self._node)
        for change in changes:
            if change.add:
                pipe.hset(self._room_key(change.room), change.entry.member, _encode(change.entry))
                pipe.sadd(rooms_key, change.room)
                event = PresenceEvent("join", change.room, change.entry)
                if self.cluster:
                    pipe.eval(_PUBLISH, 1, self._events(change.room), _encode(event))
                else:
                    pipe.publish(self._events(change.room), _encode(event))
            else:
                event = PresenceEvent("leave", change.room, change.entry)
                pipe.eval(
                    _REMOVE, 2, self._room_key(change.room), self._events(change.room),
                    change.entry.member, _encode(event),
                )  # fmt: skip
        pipe.set(self._alive_key(self._node), b"1", px=self._ttl_ms)
        pipe.pexpire(rooms_key, 10 * self._ttl_ms)
        await self._call("write", pipe.execute())

    async def members(self, room: str) -> list[PresenceEntry]:
        raw: dict[bytes, bytes] = await self._call("read", self._r.hgetall(self._room_key(room)))
        entries: list[PresenceEntry] = []
        for value in raw.values():
            try:
                entries.append(_entry_decoder.decode(value))
            except (msgspec.DecodeError, msgspec.ValidationError):
                self.dropped_decode += 1
        nodes = sorted({e.node for e in entries})
        if not nodes:
            return []
        flags = await self._call("read", self._r.mget([self._alive_key(n) for n in nodes]))
        dead = {node for node, flag in zip(nodes, flags, strict=True) if flag is None}
        if dead:
            # Their node died: nobody else may have noticed yet. Remove them (leave events).
            gone = [PresenceWrite(False, room, e) for e in entries if e.node in dead]
            await self._remove(gone)
        alive = [e for e in entries if e.node not in dead]
        alive.sort(key=lambda e: (e.since, e.member))
        return alive

    async def _remove(self, changes: Sequence[PresenceWrite]) -> None:
        if not changes:
            return
        pipe = self._r.pipeline(transaction=False)
        for change in changes:
            event = PresenceEvent("leave", change.room, change.entry)
            pipe.eval(
                _REMOVE, 2, self._room_key(change.room), self._events(change.room),
                change.entry.member, _encode(event),
            )  # fmt: skip
        await self._call("remove", pipe.execute())

    async def refresh(self) -> bool:
        """Mark this node alive; True if it had been presumed dead (its key had expired), so
        the router writes its entries again."""
        old = await self._call(
            "refresh", self._r.set(self._alive_key(self._node), b"1", px=self._ttl_ms, get=True)
        )
        return old is None

    async def forget_node(self, node_id: str) -> None:
        rooms_key = self._rooms_key(node_id)
        rooms: set[bytes] = await self._call("read", self._r.smembers(rooms_key))
        gone: list[PresenceWrite] = []
        for raw_room in rooms:
            room = raw_room.decode(errors="replace")
            raw = await self._call("read", self._r.hgetall(self._room_key(room)))
            for value in raw.values():
                try:
                    entry = _entry_decoder.decode(value)
                except (msgspec.DecodeError, msgspec.ValidationError):
                    self.dropped_decode += 1
                    continue
                if entry.node == node_id:
                    gone.append(PresenceWrite(False, room, entry))
        await self._remove(gone)
        await self._call("forget", self._r.delete(rooms_key))

    async def rooms(self) -> frozenset[str]:
        found: set[str] = set()
        pattern = glob_escape(self._p + b"p:") + b"*"
        async for key in self._r.scan_iter(match=pattern, count=1000):
            found.add(key[len(self._p) + 2 :].decode(errors="replace"))
        return frozenset(found)

    # -- events -----------------------------------------------------------------------------------

    @asynccontextmanager
    async def watch(self, room: str) -> AsyncIterator[AsyncIterator[PresenceEvent]]:
        channel = self._events(room)
        send, receive = anyio.create_memory_object_stream[PresenceEvent](WATCH_BUFFER)
        watchers = self._watchers.setdefault(channel, set())
        watchers.add(send)
        try:
            if len(watchers) == 1:
                await self._subscribe(channel)
            async with receive:
                yield receive
        finally:
            watchers.discard(send)
            send.close()
            if not watchers and self._watchers.get(channel) is watchers:
                del self._watchers[channel]
                if self._pubsub is not None:
                    with anyio.move_on_after(self.operation_timeout, shield=True):
                        try:
                            await self._pubsub.unsubscribe(channel)
                        except (RedisError, OSError):
                            pass

    async def _subscribe(self, channel: bytes) -> None:
        if self._pubsub is None:
            self._pubsub = self._r.pubsub(ignore_subscribe_messages=True)
        await self._call("watch", self._pubsub.subscribe(channel))
        if not self._reader_running and self._tg is not None:
            self._reader_running = True
            self._tg.start_soon(self._read_events, name="roomrouter presence events")

    async def _read_events(self) -> None:
        """Dispatch events to watchers. A lost connection is retried with the transport
        core's capped backoff; redis-py subscribes again to every channel when it reconnects
        (so this is no case for the reconnect template). On a cluster the subscription is
        pinned to one node, so after a failure it is moved: a fresh slot map, and a new
        subscription on a live node (classic pub/sub reaches every node of a cluster)."""
        backoff = Backoff(0.1, 5.0)
        try:
            while self._pubsub is not None:
                pubsub = self._pubsub
                if not pubsub.subscribed:
                    await anyio.sleep(0.1)
                    continue
                try:
                    message = await pubsub.get_message(timeout=1.0)
                    backoff.reset()
                except (RedisError, OSError) as exc:
                    delay = backoff.next()
                    log.info("presence events: connection lost (%s); retrying in %.2f s",
                             describe(exc), delay)  # fmt: skip
                    await anyio.sleep(delay)
                    if self.cluster:
                        await self._move_pubsub(pubsub)
                    continue
                if message is None or message.get("type") != "message":
                    continue
                self._dispatch(message["channel"], message["data"])
        finally:
            self._reader_running = False

    async def _move_pubsub(self, old: PubSub) -> None:
        """Cluster only: replace ``old`` (its node may be dead) by a subscription to every
        watched channel on a live node, if one answers; else keep ``old`` for the next try."""
        cluster: Any = self._r
        new = cluster.pubsub(ignore_subscribe_messages=True)
        try:
            await self._call("events", cluster.nodes_manager.initialize())
            if self._watchers:
                await self._call("watch", new.subscribe(*self._watchers))
        except BrokerUnavailable as exc:
            log.info("presence events: no node to subscribe on yet (%s)", exc)
            await _close_quietly(new)
            return
        if self._pubsub is not old:  # closed meanwhile
            await _close_quietly(new)
            return
        self._pubsub = new
        await _close_quietly(old)

    def _dispatch(self, channel: bytes, data: bytes) -> None:
        try:
            event = _event_decoder.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            self.dropped_decode += 1
            return
        for stream in list(self._watchers.get(channel, ())):
            try:
                stream.send_nowait(event)
            except anyio.WouldBlock:
                self.events_lost += 1
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass


async def _close_quietly(pubsub: PubSub) -> None:
    with anyio.move_on_after(1, shield=True):
        try:
            await pubsub.aclose()  # type: ignore[no-untyped-call]
        except (RedisError, OSError):
            pass
