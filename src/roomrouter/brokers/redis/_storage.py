"""The storage consumer of both Redis brokers: a member of the consumer group on the
namespace's storage stream (``rr:{<ns>}:store``), on a plain redis-py client of its own. On a
Redis Cluster the stream, its epoch and lost marks share the namespace's hash tag, so every
command goes to the one master that owns that slot (:class:`ClusterConsumer`)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import msgspec
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import RedisClusterException, ResponseError

from ..._errors import BrokerUnavailable, StorageQueueLost, describe, unreachable
from .. import StorageConsumer, StoredFrame
from ._common import NETWORK_ERRORS, address

__all__ = ["ClusterConsumer", "ConsumerSettings", "RedisConsumer"]

#: What loading or reading a slot map raises: redis-py's cluster errors (no node reachable,
#: a slot not covered) are not RedisErrors, and must not escape as if they were bugs.
SLOT_MAP_ERRORS = (*NETWORK_ERRORS, RedisClusterException)


@dataclass(frozen=True, slots=True)
class ConsumerSettings:
    """What a storage consumer takes from its broker: how to connect (redis-py's
    ``connection_class`` and keyword arguments; on a cluster, where to start and a factory of
    slot-map clients) and its timings."""

    connection_class: type[Any]
    kwargs: dict[str, Any]
    operation_timeout: float
    redelivery_after: float
    host: str = ""
    port: int = 0
    cluster_client: Callable[[], RedisCluster] | None = None


class RedisConsumer(StorageConsumer):
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

    def __init__(self, settings: ConsumerSettings, stream: bytes, name: str) -> None:
        self._settings = settings
        self._stream = stream
        self._epoch_key = stream + b":epoch"
        self._name = name.encode()
        self._claim_cursor = b"0-0"
        self._client: Any = None
        self._epoch: bytes | None = None

    async def start(self) -> None:
        from redis.asyncio import ConnectionPool, Redis

        pool = ConnectionPool(
            connection_class=self._settings.connection_class,
            client_name=f"roomrouter-worker-{self._name.decode(errors='replace')}",
            **self._settings.kwargs,
        )
        self._client = Redis(connection_pool=pool)
        try:
            self._epoch = await self._create_group()
        except NETWORK_ERRORS as exc:
            raise unreachable("Redis", *address(self._settings.kwargs), exc) from exc

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
        min_idle = int(self._settings.redelivery_after * 1000)
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
            with anyio.fail_after(wait + self._settings.operation_timeout):
                read = await self._client.xreadgroup(
                    self.GROUP, self._name, {self._stream: b">"},
                    count=max_frames, block=max(int(wait * 1000), 1),
                )  # fmt: skip
        except ResponseError as exc:
            if str(exc).startswith("NOGROUP"):
                try:
                    epoch = await self._create_group()
                    await self._replaced(str(exc), epoch)
                except NETWORK_ERRORS as again:
                    raise unreachable("Redis", *address(self._settings.kwargs), again) from again
                return []
            raise BrokerUnavailable(f"Redis storage fetch failed: {describe(exc)}") from exc
        except NETWORK_ERRORS as exc:
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
        except NETWORK_ERRORS as exc:
            raise BrokerUnavailable(f"Redis storage ack failed: {describe(exc)}") from exc

    async def pending(self) -> int:
        try:
            return int(await self._client.xlen(self._stream))
        except NETWORK_ERRORS as exc:
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


class ClusterConsumer(RedisConsumer):
    """The storage consumer on a Redis Cluster: a :class:`RedisConsumer` on the master that
    owns the storage stream's slot (the stream, its epoch and lost marks share the
    namespace's hash tag, so every command goes to that one node), on a plain client.

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
        settings = self._settings
        assert settings.cluster_client is not None, "a ClusterConsumer needs a cluster_client"
        self._cluster = settings.cluster_client()
        try:
            with anyio.fail_after(settings.operation_timeout):
                await self._cluster.initialize()
                self._follow_owner()
                self._epoch = await self._create_group()
        except (*SLOT_MAP_ERRORS, BrokerUnavailable) as exc:
            await self.aclose()
            if isinstance(exc, BrokerUnavailable):
                raise
            raise unreachable("Redis Cluster", settings.host, settings.port, exc) from exc

    def _follow_owner(self) -> Any:
        """Point the client at the current owner of the stream's slot (per the slot map);
        returns the client it replaced, to be closed (or None)."""
        from redis.asyncio import ConnectionPool, Redis

        assert self._cluster is not None
        settings = self._settings
        try:
            node = self._cluster.nodes_manager.get_node_from_slot(key_slot(self._stream)).name
        except SLOT_MAP_ERRORS as exc:
            raise BrokerUnavailable(f"Redis Cluster slot map: {describe(exc)}") from exc
        if node == self._node and self._client is not None:
            return None
        old, self._node = self._client, node
        host, _, port = node.rpartition(":")
        pool = ConnectionPool(
            connection_class=settings.connection_class, host=host, port=int(port),
            client_name=f"roomrouter-worker-{self._name.decode(errors='replace')}",
            **settings.kwargs,
        )  # fmt: skip
        self._client = Redis(connection_pool=pool)
        return old

    async def _refresh(self) -> None:
        assert self._cluster is not None
        settings = self._settings
        try:
            with anyio.fail_after(settings.operation_timeout):
                await self._cluster.nodes_manager.initialize()
        except SLOT_MAP_ERRORS as exc:
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
                except NETWORK_ERRORS:
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
        timeout = wait + 2 * self._settings.operation_timeout
        frames: list[StoredFrame] = await self._guarded(
            lambda: super(ClusterConsumer, self).fetch(max_frames, wait), timeout
        )
        return frames

    async def ack(self, frames: Sequence[StoredFrame]) -> None:
        await self._guarded(
            lambda: super(ClusterConsumer, self).ack(frames), self._settings.operation_timeout
        )

    async def pending(self) -> int:
        count: int = await self._guarded(
            lambda: super(ClusterConsumer, self).pending(), self._settings.operation_timeout
        )
        return count

    async def aclose(self) -> None:
        await super().aclose()
        if self._cluster is not None:
            cluster, self._cluster = self._cluster, None
            try:
                await cluster.aclose()
            except NETWORK_ERRORS:
                pass
