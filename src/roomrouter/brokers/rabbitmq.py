"""RabbitMQ broker: one topic exchange per namespace, one exclusive queue per node, bound per room.

Exchanges (durable, declared by every node): ``rr.{ns}.data`` (topic) carries room frames
with the room's *routing key*; ``rr.{ns}.control`` (fanout) carries control broadcasts;
``rr.{ns}.direct`` (direct) carries control frames to one node, keyed by node id. Each node
declares one exclusive, auto-delete queue, binds it to the control and direct exchanges, and
binds/unbinds it on the data exchange per room: dynamic subscription is RabbitMQ's own routing,
and ``broker_subscriptions`` reads the bindings back through the management HTTP API.

Names (:func:`amqp_name`). Exchange and queue names are ``rr.`` and dot-separated parts: the
namespace, a kind (``data``, ``store``, ``node``, ...) and, for some, a node id or a room key.
Every part keeps ``A-Za-z0-9_-`` and writes any other byte of its UTF-8 as ``+`` and two hex
digits, so no part holds a ``.``, a namespace can never pose as another namespace plus a
kind, and every name uses only what AMQP clients accept in names. A name longer than the limit
(127 bytes for exchanges, 255 for queues) becomes ``rr.#`` + the hex SHA-256 of the long name
(``#`` never occurs in an encoded name).

Routing keys. A topic exchange reads ``.`` as a word separator and ``*``/``#`` as wildcards,
and keys are at most 255 bytes. A room's key is therefore one word: the unpadded base64url of
its UTF-8 name (alphabet ``A-Za-z0-9-_``), or, when that would exceed 200 bytes, ``~`` followed
by the hex SHA-256 of the name (``~`` is outside the base64url alphabet, so the two forms never
collide). Bindings are always exact keys, never patterns. The node maps the routing key a frame
arrived with back to the held room it was bound for, and hands that room to the router (which
drops an envelope claiming another room); a key it holds no room for (a frame still queued
from a room just unbound) is counted in :attr:`filtered`.

Two connections per node, as RabbitMQ recommends (flow control throttles a publishing
connection, which must not stall consumption): the *subscriber* connection holds the queue, its
bindings and the consumer; the *publisher* connection has one channel in confirm mode.
``publish`` returns once RabbitMQ confirmed the frame (a nack or a lost connection raises
:class:`~roomrouter.BrokerUnavailable`); many publishes are outstanding at once on the channel,
in call order. Each connection is watched by a task that reconnects with capped exponential
backoff; the subscriber side redeclares the queue (under a new name: the old exclusive queue may
linger until the server notices the dead connection), rebinds every held room and the control
plane, consumes again, and only then calls ``on_reconnect``.

Persistence. A persisted frame is *one* confirmed publish on the data exchange, with delivery
mode 2 and a ``BCC`` header (RabbitMQ's sender-selected distribution: extra routing keys,
stripped before delivery) naming ``~store`` and ``~recent.{room key}``. Its routing key is the
room's key when other nodes host the room (their queues get it, as with ``publish``), else
``~store``. RabbitMQ routes one message as a unit, so there is no state in which a frame was
delivered live but not stored, and the publisher confirm comes only once every queue took it.
Call order is send order, since it is the same confirm channel and outbox as ``publish``.

* The *storage queue* ``rr.{ns}.store`` is a durable **quorum** queue bound to the data
  exchange by ``~store`` (so it receives every persisted frame of every room, and no live-only
  one). Quorum rather than classic: it is the one place a confirmed message must survive, and
  a quorum queue replicates it across a RabbitMQ cluster, always writes to disk and confirms
  only after a majority has it; classic queues are single-node (mirroring is deprecated). Nodes
  declare it on every publisher (re)connect, workers on start.
* The *recent cache* of a room is a durable classic queue ``rr.{ns}.recent.{room key}`` bound
  by ``~recent.{room key}``, capped at ``recent_size + 1`` frames (``x-overflow: drop-head``)
  and deleted after ``recent_ttl`` seconds unused. The publisher declares and binds it with
  no-wait methods on its confirm channel just before the first persisted frame of the room
  (and again every ``recent_ttl / 4``), so it costs no round trip and the frame behind it is
  routed to it. It is read without being consumed; see :meth:`RabbitMQBroker.recent`. Classic,
  not quorum: it is a cache, requeued frames must keep their places, and it is one per room.
  (A stream per namespace would avoid a queue per room, but RabbitMQ < 3.13 cannot filter a
  stream by room, so every read would scan the namespace's whole retained traffic.)
* *Storage workers* consume the storage queue with manual acks (``_RabbitMQConsumer``). A dead
  worker's unacknowledged frames are requeued by RabbitMQ the moment its connection closes, so
  ``redelivery_after`` has nothing to do here.

The client is aiormq, the AMQP layer under aio-pika (the ``rabbitmq`` extra). aio-pika's
``Exchange.publish`` holds the channel lock until each frame is written, and even aiormq's
``basic_publish`` costs one writer round and one ``send`` syscall per message; publishes are
therefore framed here and written in batches on aiormq's connection, with aiormq's own
confirmation bookkeeping (``_send``). aio-pika's robust connection restores what *it* declared,
on its schedule; the node must restore *its* held rooms and then tell the router, so the
reconnect is managed here, as in the Redis backend.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import struct
import time
import uuid
from collections import deque
from collections.abc import Collection, Sequence
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

import aiormq
import anyio
import anyio.abc
from aiormq.abc import AbstractChannel, AbstractConnection, ChannelFrame, DeliveredMessage
from aiormq.exceptions import (
    AMQPError,
    ChannelAccessRefused,
    ChannelInvalidStateError,
    ChannelLockedResource,
    ChannelNotFoundEntity,
    DeliveryError,
)
from pamqp import commands as pamqp_commands
from pamqp import frame as pamqp_frame

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
    RecentScan,
    StorageConsumer,
    StoredFrame,
)

__all__ = ["RabbitMQBroker", "amqp_name", "routing_key"]

log = logging.getLogger("roomrouter.rabbitmq")

_ERRORS = (AMQPError, ChannelInvalidStateError, OSError, TimeoutError, EOFError, RuntimeError)
_MAX_PLAIN_KEY = 200
_MAX_WRITE = 256 * 1024
_HASH_MARK = "~"
# Persistence keys on the data exchange. Room keys are one word of base64url or ``~`` + 64 hex
# digits, so neither of these can ever equal one.
_STORE_KEY = b"~store"
_SENTINEL = "roomrouter-recent-sentinel"


def _recent_key(room_key: str) -> bytes:
    """The binding key of a room's recent queue (two words: never a room key)."""
    return b"~recent." + room_key.encode()


def routing_key(name: str) -> str:
    """The single-word routing key of a room (or node) name; see the module docstring."""
    raw = name.encode()
    key = base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")
    if len(key) <= _MAX_PLAIN_KEY:
        return key
    return _HASH_MARK + hashlib.sha256(raw).hexdigest()


# AMQP 0-9-1 framing of basic.publish: a method frame, a content header frame and body frames,
# each ``type(1) channel(2) size(4) payload 0xCE``. Built here with struct (the method frame
# of a publish is a constant prefix plus two short strings), which is several times cheaper
# than marshalling frame objects per message; tests compare it byte for byte with pamqp.
_FRAME_HEAD = struct.Struct(">BHI").pack
_CONTENT_HEADER = struct.Struct(">HHQH").pack  # class 60, weight 0, body size, no properties
_PUBLISH_METHOD = b"\x00\x3c\x00\x28\x00\x00"  # class 60 (basic), method 40 (publish), ticket 0


def _publish_frames(
    channel: int, exchange: bytes, key: bytes, body: bytes, max_body: int, properties: bytes = b""
) -> bytes:
    """Wire bytes of one ``basic.publish`` (mandatory and immediate off). ``properties`` is the
    encoded property list after the flags (see :func:`_persistent_properties`); empty: none."""
    method = b"".join(
        (_PUBLISH_METHOD, bytes((len(exchange),)), exchange, bytes((len(key),)), key, b"\x00")
    )
    if properties:
        header = _CONTENT_HEADER(60, 0, len(body), _PERSISTENT_FLAGS) + properties
    else:
        header = _CONTENT_HEADER(60, 0, len(body), 0)
    parts = [
        _FRAME_HEAD(1, channel, len(method)),
        method,
        b"\xce",
        _FRAME_HEAD(2, channel, len(header)),
        header,
        b"\xce",
    ]
    for start in range(0, len(body), max_body):
        chunk = body[start : start + max_body]
        parts += (_FRAME_HEAD(3, channel, len(chunk)), chunk, b"\xce")
    return b"".join(parts)


# Persisted frames carry two properties: ``headers`` = {"BCC": [store key, recent key]} and
# ``delivery-mode`` = 2 (persistent). Flags: bit 13 headers, bit 12 delivery mode.
_PERSISTENT_FLAGS = 0x2000 | 0x1000
_LONG = struct.Struct(">I").pack


def _persistent_properties(bcc: list[bytes]) -> bytes:
    """The property list of a persisted frame: a field table ``{"BCC": [keys...]}`` (RabbitMQ's
    sender-selected distribution: extra routing keys, stripped before delivery), then delivery
    mode 2. Tests compare it with pamqp's marshalling."""
    items = b"".join(b"S" + _LONG(len(k)) + k for k in bcc)
    entry = b"\x03BCC" + b"A" + _LONG(len(items)) + items
    return _LONG(len(entry)) + entry + b"\x02"


def _room_of_key(key: str) -> str | None:
    """Decode a plain routing key back to its room; ``None`` for hashed or foreign keys."""
    if key.startswith(_HASH_MARK):
        return None
    try:
        return base64.urlsafe_b64decode(key + "=" * (-len(key) % 4)).decode()
    except ValueError:
        return None


_NAME_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")


def _name_part(part: str) -> str:
    if _NAME_SAFE.issuperset(part):
        return part
    return "".join(
        ch if ch in _NAME_SAFE else "".join(f"+{b:02x}" for b in ch.encode()) for ch in part
    )


def amqp_name(namespace: str, *parts: str, exchange: bool = False) -> str:
    """The exchange (``exchange=True``) or queue name of ``namespace`` made of ``parts``; see
    "Names" in the module docstring. The nodes and the storage consumers use only this."""
    name = ".".join(["rr", _name_part(namespace), *(_name_part(p) for p in parts)])
    # pamqp refuses exchange names over 127 characters and queue names over 256.
    if len(name) <= (127 if exchange else 255):
        return name
    return "rr.#" + hashlib.sha256(name.encode()).hexdigest()


def _unreachable(url: str, exc: BaseException) -> BrokerUnavailable:
    """The one wording of a failed connect (roomrouter._errors.unreachable) for ``url``."""
    parts = urlsplit(url)
    port = parts.port or (5671 if parts.scheme == "amqps" else 5672)
    user = unquote(parts.username or "guest")
    return unreachable("RabbitMQ", parts.hostname, port, exc, user=user)


def _really_cancelled() -> bool:
    """aiormq hands out ``CancelledError`` as the *result* of a future when it closes a channel;
    only a cancel request on our own task is a real cancellation."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class RabbitMQBroker(Broker):
    """See the module docstring.

    Options:
        url: ``amqp://user:pass@host:port/vhost`` (``amqps://`` for TLS); aiormq's own query
            options (``heartbeat``, ``cafile``, ...) pass through.
        prefetch: unacknowledged deliveries RabbitMQ may push to this node before it waits for
            an ack (the node acks in batches of half that, after handing frames to the router).
        operation_timeout: bound of every connect, bind, unbind and publish confirmation.
        max_backoff: cap of the reconnect backoff, in seconds.
        queue_max_length: bound of the node's queue at RabbitMQ; when a node falls that far
            behind, the oldest frames are dropped (live delivery is at-most-once).
        management_url: the management HTTP API (``broker_subscriptions``, storage
            ``pending``); defaults to ``http://{host}:15672`` with the AMQP credentials.
        recent_size: frames kept per room in its recent-messages queue. Every node of a
            namespace must use the same value (and ``recent_ttl``): RabbitMQ refuses to redeclare
            a queue with other arguments.
        recent_ttl: seconds after which an unused room's recent-messages queue is deleted
            (``x-expires``; publishers redeclare it well before).
        redelivery_after: accepted for symmetry with the other backends and ignored: RabbitMQ
            hands a dead storage consumer's unacknowledged frames to another one as soon as its
            connection closes (or its heartbeat times out).
        storage_prefetch: unacknowledged frames one storage consumer may hold; it should be at
            least the storage worker's batch size.
        stats_interval: RabbitMQ's ``collect_statistics_interval`` in seconds (management API
            figures are that old at most); see :meth:`StorageConsumer.pending`.
    """

    name = "rabbitmq"
    counts_receivers = False
    supports_storage = True

    def __init__(
        self,
        url: str = "amqp://guest:guest@127.0.0.1:5672/",
        *,
        prefetch: int = 512,
        operation_timeout: float = 5.0,
        max_backoff: float = 5.0,
        queue_max_length: int = 100_000,
        management_url: str | None = None,
        recent_size: int = 1000,
        recent_ttl: int = 86_400,
        redelivery_after: float = 30.0,
        storage_prefetch: int = 1000,
        stats_interval: float = 5.0,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("amqp", "amqps"):
            raise ConfigurationError(f"not an amqp:// or amqps:// URL: {redact(url)!r}")
        if (
            min(prefetch, queue_max_length, recent_size, recent_ttl, storage_prefetch) < 1
            or min(operation_timeout, max_backoff, stats_interval) <= 0
        ):
            raise ConfigurationError(
                "prefetch, queue_max_length, recent_size, recent_ttl and storage_prefetch must "
                "be >= 1; timeouts must be > 0"
            )
        query = dict(parse_qsl(parts.query))
        # A dead TCP connection is noticed after three missed heartbeats; aiormq's 60 s default
        # would leave a node deaf for three minutes.
        query.setdefault("heartbeat", "10")
        self._url = urlunsplit(parts._replace(query=urlencode(query)))
        self.prefetch = prefetch
        self.operation_timeout = operation_timeout
        self.max_backoff = max_backoff
        self.queue_max_length = queue_max_length
        self.vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
        self._user = unquote(parts.username or "guest")
        self._password = unquote(parts.password or "guest")
        self.management_url = (
            management_url or f"http://{parts.hostname or '127.0.0.1'}:15672"
        ).rstrip("/")
        self.filtered = 0
        self.recent_size = recent_size
        self.recent_ttl = recent_ttl
        self.redelivery_after = redelivery_after
        self.storage_prefetch = storage_prefetch
        self.stats_interval = stats_interval

        self._ctx: BrokerContext | None = None
        self._closed = False
        self._rooms: set[str] = set()
        self._key_rooms: dict[str, str] = {}  # routing key -> room, for held rooms only
        # Subscriber side. ``_epoch`` changes the moment a loss is noticed, so a subscribe that
        # straddles it knows its bindings died with the old queue.
        self._sub_conn: AbstractConnection | None = None
        self._sub_ch: AbstractChannel | None = None
        self._sub_ready = False
        self._sub_broken: asyncio.Future[None] | None = None
        self._epoch = 0
        self._queue = ""
        self._unacked = 0
        self._ack_every = max(1, prefetch // 2)
        # Publisher side.
        self._pub_conn: AbstractConnection | None = None
        self._pub_ch: aiormq.Channel | None = None
        self._pub_broken: asyncio.Future[None] | None = None
        self._pub_up = anyio.Event()
        self._max_body = 0
        # Wire bytes of publishes registered on ``_outbox_channel`` and not yet written, each
        # with its delivery tag (0: a declare or bind, no confirmation).
        self._outbox: list[tuple[bytes, int]] = []
        self._outbox_channel: aiormq.Channel | None = None
        # The highest delivery tag handed to ``_written_channel``'s connection: a publish at or
        # below it may have reached RabbitMQ, one above it has not left this node.
        self._written_channel: aiormq.Channel | None = None
        self._written_tag = 0
        self._flush_wake = anyio.Event()
        # Recent-messages queues declared on ``_declared_channel``: room key -> when (monotonic).
        self._declared: dict[str, float] = {}
        self._declared_channel: aiormq.Channel | None = None

    def __repr__(self) -> str:
        return f"<RabbitMQBroker {redact(self._url)}>"

    @classmethod
    def from_url(cls, url: str, **options: Any) -> RabbitMQBroker:
        """``amqp[s]://user:pass@host:port/vhost?prefetch=512&operation_timeout=5&max_backoff=5
        &queue_max_length=100000&management_url=http://host:15672&recent_size=1000
        &recent_ttl=86400&redelivery_after=30&storage_prefetch=1000&stats_interval=5``."""
        parts = urlsplit(url)
        query = dict(parse_qsl(parts.query))
        found = pop_options(
            url,
            query,
            (
                ("prefetch", int),
                ("operation_timeout", float),
                ("max_backoff", float),
                ("queue_max_length", int),
                ("management_url", str),
                ("recent_size", int),
                ("recent_ttl", int),
                ("redelivery_after", float),
                ("storage_prefetch", int),
                ("stats_interval", float),
            ),
        )
        rest = urlunsplit(parts._replace(query=urlencode(query)))
        return cls(rest, **{**options, **found})

    # -- names ----------------------------------------------------------------------------------

    @property
    def data_exchange(self) -> str:
        return self._data_x

    @property
    def queue_name(self) -> str:
        """This node's current queue (it changes on every reconnect)."""
        return self._queue

    def connection_name(self, role: str = "sub") -> str:
        """The client-provided name of this node's ``sub`` or ``pub`` connection, as the
        management API and ``rabbitmqctl list_connections`` show it."""
        assert self._ctx is not None
        return f"roomrouter {self._ctx.namespace} {self._ctx.node_id} {role}"

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self, context: BrokerContext) -> None:
        self._ctx = context
        ns = context.namespace
        self._data_x = amqp_name(ns, "data", exchange=True)
        self._store_q = amqp_name(ns, "store")
        self._control_x = amqp_name(ns, "control", exchange=True)
        self._direct_x = amqp_name(ns, "direct", exchange=True)
        self._nodes_q = amqp_name(ns, "nodes")
        self._node_key = routing_key(context.node_id)
        self._data_xb = self._data_x.encode()
        self._control_xb = self._control_x.encode()
        self._direct_xb = self._direct_x.encode()
        await self._connect_publisher()
        try:
            await self._connect_subscriber()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._close_publisher()
            raise
        context.task_group.start_soon(self._watch_publisher, name=f"amqp pub {context.node_id}")
        context.task_group.start_soon(self._flush_loop, name=f"amqp flusher {context.node_id}")
        context.task_group.start_soon(self._watch_subscriber, name=f"amqp sub {context.node_id}")

    async def aclose(self) -> None:
        self._closed = True
        self._sub_ready = False
        conns = (self._sub_conn, self._pub_conn)
        self._sub_conn = self._sub_ch = self._pub_conn = self._pub_ch = None
        for conn in conns:
            if conn is not None:
                await self._quiet_close(conn)

    async def _open(self, role: str) -> AbstractConnection:
        url = (
            self._url
            + ("&" if "?" in self._url else "?")
            + urlencode({"name": self.connection_name(role)})
        )
        conn = aiormq.Connection(url)
        try:
            with anyio.fail_after(self.operation_timeout):
                await conn.connect()
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await self._quiet_close(conn)
            if isinstance(exc, _ERRORS):
                raise _unreachable(self._url, exc) from exc
            raise
        return conn

    async def _quiet_close(self, conn: AbstractConnection) -> None:
        with anyio.move_on_after(self.operation_timeout):
            try:
                await conn.close()
            except (*_ERRORS, asyncio.CancelledError):
                if _really_cancelled():
                    raise

    # -- publisher connection -------------------------------------------------------------------

    async def _connect_publisher(self) -> None:
        conn = await self._open("pub")
        try:
            with anyio.fail_after(self.operation_timeout):
                channel = await conn.channel(publisher_confirms=True)
                # The storage queue exists before the first persisted frame can be confirmed:
                # a frame routed to no storage queue would be confirmed and lost.
                await _declare_storage(channel, self._data_x, self._store_q)
            # The concrete class: _send registers confirmations on it directly.
            assert isinstance(channel, aiormq.Channel) and channel.publisher_confirms
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await self._quiet_close(conn)
            if isinstance(exc, _ERRORS):
                raise BrokerUnavailable(f"cannot open a RabbitMQ channel: {describe(exc)}") from exc
            raise
        self._pub_conn, self._pub_ch = conn, channel
        self._pub_broken = asyncio.get_running_loop().create_future()
        self._max_body = conn.connection_tune.frame_max - 8  # frame header (7) + frame end (1)
        self._pub_up.set()

    async def _close_publisher(self) -> None:
        conn, self._pub_conn, self._pub_ch = self._pub_conn, None, None
        if conn is not None:
            await self._quiet_close(conn)

    async def _watch_publisher(self) -> None:
        assert self._ctx is not None
        while not self._closed:
            conn, channel, broken = self._pub_conn, self._pub_ch, self._pub_broken
            if conn is not None and channel is not None and broken is not None:
                await _first_closed(conn, channel, broken)
                if self._closed:
                    return
                log.warning("node %s: RabbitMQ publisher connection lost", self._ctx.node_id)
                self._pub_up = anyio.Event()
                await self._close_publisher()
            delay = 0.05
            while not self._closed:
                try:
                    await self._connect_publisher()
                    break
                except BrokerUnavailable as exc:
                    log.info("node %s: RabbitMQ publisher reconnect failed (%s); retry in %.2fs",
                             self._ctx.node_id, exc, delay)  # fmt: skip
                    await anyio.sleep(delay)
                    delay = min(delay * 2, self.max_backoff)

    # -- subscriber connection ------------------------------------------------------------------

    async def _connect_subscriber(self) -> None:
        """Connect, declare, bind the control plane and every held room, consume."""
        assert self._ctx is not None
        conn = await self._open("sub")
        self._epoch += 1
        queue = amqp_name(self._ctx.namespace, "node", self._ctx.node_id, str(self._epoch))
        try:
            with anyio.fail_after(self.operation_timeout):
                channel = await conn.channel(publisher_confirms=False)
                await channel.basic_qos(prefetch_count=self.prefetch)
                await channel.exchange_declare(self._data_x, exchange_type="topic", durable=True)
                await channel.exchange_declare(
                    self._control_x, exchange_type="fanout", durable=True
                )
                await channel.exchange_declare(self._direct_x, exchange_type="direct", durable=True)
                await channel.queue_declare(
                    queue,
                    exclusive=True,
                    auto_delete=True,
                    arguments={"x-max-length": self.queue_max_length, "x-overflow": "drop-head"},
                )
                await channel.queue_bind(queue, self._control_x, routing_key="")
                await channel.queue_bind(queue, self._direct_x, routing_key=self._node_key)
                # Counted as a node only from here on, with the control plane bound: a node
                # that counts the consumers and then says Hello is heard by every one it
                # counted (count_nodes; docs/architecture.md, "The cluster view", rule 2).
                await channel.queue_declare(
                    self._nodes_q, durable=True, arguments={"x-expires": _NODES_EXPIRE_MS}
                )
                await channel.basic_consume(self._nodes_q, _ignore, no_ack=True)
            # Rooms may come and go while the held ones are rebound (unsubscribe works while
            # disconnected): repeat until the bindings match the held set.
            bound: set[str] = set()
            while True:
                add = [r for r in self._rooms if r not in bound]
                drop = [r for r in bound if r not in self._rooms]
                if not add and not drop:
                    break
                with anyio.fail_after(self.operation_timeout + len(add) / 1000):
                    await _bind(channel, queue, self._data_x, [routing_key(r) for r in add])
                    bound.update(add)
                with anyio.fail_after(self.operation_timeout + len(drop) / 100):
                    for room in drop:
                        await channel.queue_unbind(
                            queue, self._data_x, routing_key=routing_key(room)
                        )
                        bound.discard(room)
            with anyio.fail_after(self.operation_timeout):
                self._unacked = 0
                # The server cancels the consumer if the queue is deleted under us: rebuild.
                channel.on_consumer_cancel_callbacks.add(lambda _: self._break_subscriber())
                await channel.basic_consume(queue, self._on_message, no_ack=False)
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await self._quiet_close(conn)
            if isinstance(exc, (*_ERRORS, asyncio.CancelledError)) and not _really_cancelled():
                raise BrokerUnavailable(
                    f"cannot set up the RabbitMQ queue: {describe(exc)}"
                ) from exc
            raise
        self._sub_conn, self._sub_ch, self._queue = conn, channel, queue
        self._sub_broken = asyncio.get_running_loop().create_future()
        self._sub_ready = True

    def _break_subscriber(self) -> None:
        """Give up the subscriber connection whose state is unknown (a failed or cancelled bind
        or unbind): the watcher closes it and rebuilds exactly the held rooms."""
        if self._sub_ready:
            self._sub_ready = False
            self._epoch += 1
        if self._sub_broken is not None and not self._sub_broken.done():
            self._sub_broken.set_result(None)

    async def _watch_subscriber(self) -> None:
        assert self._ctx is not None
        ctx = self._ctx
        while not self._closed:
            conn, channel, broken = self._sub_conn, self._sub_ch, self._sub_broken
            if conn is None or channel is None or broken is None:
                return  # closed
            await _first_closed(conn, channel, broken)
            if self._closed:
                return
            # Synchronously, before any await: a subscribe in flight now sees a new epoch.
            if self._sub_ready:
                self._sub_ready = False
                self._epoch += 1
            log.warning("node %s: RabbitMQ subscriber connection lost", ctx.node_id)
            self._sub_conn = self._sub_ch = None
            await self._quiet_close(conn)
            delay = 0.05
            while not self._closed:
                try:
                    await self._connect_subscriber()
                    break
                except BrokerUnavailable as exc:
                    log.info("node %s: RabbitMQ reconnect failed (%s); retry in %.2fs",
                             ctx.node_id, exc, delay)  # fmt: skip
                    await anyio.sleep(delay)
                    delay = min(delay * 2, self.max_backoff)
            if self._closed:
                return
            # The router answers a reconnect with control frames: let the publisher come back
            # first (it was most likely cut at the same time), but do not wait forever.
            with anyio.move_on_after(self.operation_timeout):
                await self._pub_up.wait()
            log.info("node %s: RabbitMQ reconnected, %d room(s) restored",
                     ctx.node_id, len(self._rooms))  # fmt: skip
            ctx.on_reconnect()

    async def _on_message(self, message: DeliveredMessage) -> None:
        # aiormq runs this in one task per delivery, created in delivery order; everything up to
        # the ack runs in the task's first step, so handlers see frames in broker order.
        ctx = self._ctx
        if ctx is None:
            return
        body = message.body
        try:
            if message.exchange == self._data_x:
                room = self._key_rooms.get(message.routing_key or "")
                if room is None:
                    self.filtered += 1
                else:
                    ctx.on_data(room, body)
            else:
                ctx.on_control(body)
        except Exception:  # a handler bug must not kill the consumer
            log.exception("node %s: message handler raised", ctx.node_id)
        # Ack in batches of half the prefetch: the broker never runs out of credit, and the
        # ack traffic stays small.
        self._unacked += 1
        if self._unacked >= self._ack_every and message.channel is self._sub_ch:
            self._unacked = 0
            tag = getattr(message.delivery, "delivery_tag", None)
            if tag is not None:
                try:
                    await message.channel.basic_ack(tag, multiple=True, wait=False)
                except (*_ERRORS, asyncio.CancelledError):
                    if _really_cancelled():
                        raise
                    # The channel is gone; the watcher rebuilds it.

    # -- subscriptions --------------------------------------------------------------------------

    async def subscribe(self, rooms: Collection[str]) -> None:
        new = [r for r in rooms if r not in self._rooms]
        if not new:
            return
        channel, epoch = self._sub_ch, self._epoch
        if channel is None or not self._sub_ready:
            raise BrokerUnavailable("RabbitMQ subscriber connection is down")
        keys = [routing_key(r) for r in new]
        try:
            with anyio.fail_after(self.operation_timeout + len(keys) / 1000):
                await _bind(channel, self._queue, self._data_x, keys)
        except BaseException as exc:
            self._break_subscriber()
            if isinstance(exc, (*_ERRORS, asyncio.CancelledError)) and not _really_cancelled():
                raise BrokerUnavailable(f"RabbitMQ queue.bind failed: {describe(exc)}") from exc
            raise
        if epoch != self._epoch:
            raise BrokerUnavailable("RabbitMQ connection lost while subscribing")
        self._rooms.update(new)
        for room, key in zip(new, keys, strict=True):
            self._key_rooms[key] = room

    async def unsubscribe(self, rooms: Collection[str]) -> None:
        gone = [r for r in rooms if r in self._rooms]
        self._rooms.difference_update(gone)
        for room in gone:
            self._key_rooms.pop(routing_key(room), None)
        channel = self._sub_ch
        if not gone or channel is None or not self._sub_ready:
            return  # not restored on reconnect: forgotten either way
        # queue.unbind has no no-wait form in AMQP 0-9-1: one round trip each.
        try:
            with anyio.fail_after(self.operation_timeout + len(gone) / 100):
                for room in gone:
                    await channel.queue_unbind(
                        self._queue, self._data_x, routing_key=routing_key(room)
                    )
        except BaseException as exc:
            self._break_subscriber()
            if isinstance(exc, (*_ERRORS, asyncio.CancelledError)) and not _really_cancelled():
                raise BrokerUnavailable(f"RabbitMQ queue.unbind failed: {describe(exc)}") from exc
            raise

    async def count_nodes(self) -> int | None:
        """The other consumers of the namespace's ``nodes`` queue: every node consumes it on
        its subscriber connection once its control plane is bound, and nothing is ever routed
        to it. A passive ``queue.declare`` answers with the queue's consumer count, as the
        queue itself holds it when it answers (docs/architecture.md, "The cluster view")."""
        channel = self._sub_ch
        if channel is None or not self._sub_ready:
            raise BrokerUnavailable("RabbitMQ subscriber connection is down")
        try:
            with anyio.fail_after(self.operation_timeout):
                declared = await channel.queue_declare(self._nodes_q, passive=True)
        except BaseException as exc:
            self._break_subscriber()
            if isinstance(exc, (*_ERRORS, asyncio.CancelledError)) and not _really_cancelled():
                raise BrokerUnavailable(
                    f"cannot count the nodes on RabbitMQ: {describe(exc)}"
                ) from exc
            raise
        return max((declared.consumer_count or 0) - 1, 0)

    # -- publishing -----------------------------------------------------------------------------

    async def publish(self, room: str, frame: bytes, *, to: Collection[str] | None = None) -> None:
        await self._publish(self._data_xb, routing_key(room), frame)

    async def publish_control(self, frame: bytes, *, to: str | None = None) -> int | None:
        if to is None:
            await self._publish(self._control_xb, "", frame)
        else:
            await self._publish(self._direct_xb, routing_key(to), frame)
        return None

    async def _publish(
        self, exchange: bytes, key: str, frame: bytes, persist_key: str | None = None
    ) -> None:
        channel = self._pub_ch
        confirmation = self._send(exchange, key, frame, persist_key)
        tag = channel.delivery_tag if channel is not None else 0
        try:
            async with asyncio.timeout(self.operation_timeout):
                await confirmation
        except DeliveryError as exc:
            raise BrokerUnavailable(
                f"RabbitMQ refused the publish (nack): {describe(exc)}"
            ) from exc
        except TimeoutError as exc:
            # No confirmation in time: the connection is as good as dead; do not let later
            # publishes queue behind it until the heartbeat notices.
            self._break_publisher()
            reason = f"RabbitMQ did not confirm the publish within {self.operation_timeout}s"
            raise self._failed(channel, tag, reason) from exc
        except (*_ERRORS, asyncio.CancelledError) as exc:
            if _really_cancelled():
                raise
            raise self._failed(channel, tag, f"RabbitMQ publish failed: {describe(exc)}") from exc

    def _failed(self, channel: aiormq.Channel | None, tag: int, reason: str) -> BrokerUnavailable:
        """The error of a publish that got no confirmation: ambiguous if its bytes were handed to
        the connection (RabbitMQ may have routed it and the confirm was lost), else not sent."""
        if channel is not None and channel is self._written_channel and tag <= self._written_tag:
            return PublishOutcomeUnknown(f"{reason}; it was sent, so it may have been published")
        return BrokerUnavailable(f"{reason}; it was not sent")

    def _send(
        self, exchange: bytes, key: str, frame: bytes, persist_key: str | None = None
    ) -> asyncio.Future[Any]:
        """Register one publish on the confirm channel and queue its wire bytes; no await.

        With ``persist_key`` (a room's routing key) the frame is persistent and also routed to
        the storage queue and that room's recent-messages queue, which is declared and bound
        first (no-wait, on this channel, so in order) if this channel has not done so lately.

        This is what aiormq's ``basic_publish`` does, minus its per-message channel lock and
        write round trip: the delivery tag is taken and the bytes are queued in call order, and
        the flusher writes everything queued meanwhile in one go. The confirmation future
        belongs to the channel, so a nack, a channel close or a lost connection resolves it.
        """
        channel = self._pub_ch
        if channel is None or channel.is_closed:
            raise BrokerUnavailable("RabbitMQ publisher connection is down")
        if self._outbox_channel is not channel:
            # Bytes for an older channel must never reach a new connection (their delivery tags
            # belong to the old channel, whose close already failed their confirmations).
            self._outbox, self._outbox_channel = [], channel
        properties = b""
        if persist_key is not None:
            self._outbox.extend((f, 0) for f in self._declare_recent(channel, persist_key))
            properties = _persistent_properties([_STORE_KEY, _recent_key(persist_key)])
        confirmation = channel.create_future()
        channel.delivery_tag += 1
        channel.confirmations[channel.delivery_tag] = confirmation
        self._outbox.append(
            (
                _publish_frames(
                    channel.number, exchange, key.encode(), frame, self._max_body, properties
                ),
                channel.delivery_tag,
            )
        )
        self._flush_wake.set()
        return confirmation

    async def _flush_loop(self) -> None:
        while True:
            await self._flush_wake.wait()
            self._flush_wake = anyio.Event()
            while self._outbox:
                # Everything queued while the previous write was waiting goes out as one write
                # (bounded, so one huge backlog does not become one huge buffer).
                channel, outbox = self._outbox_channel, self._outbox
                count = size = last_tag = 0
                for chunk, tag in outbox:
                    count += 1
                    size += len(chunk)
                    last_tag = max(last_tag, tag)
                    if size >= _MAX_WRITE:
                        break
                payload = b"".join(chunk for chunk, _ in outbox[:count])
                del outbox[:count]
                if channel is None or channel.is_closed:
                    continue  # its confirmations were failed with the channel
                if self._written_channel is not channel:
                    self._written_channel, self._written_tag = channel, 0
                # Counted as sent before the put: once the put starts, the connection's writer
                # may send the bytes even if this task is interrupted.
                self._written_tag = max(self._written_tag, last_tag)
                await self._write(channel, payload)

    async def _write(self, channel: aiormq.Channel, payload: bytes) -> None:
        # The connection's write queue is bounded and drained by its writer task; a dead or
        # blocked connection would hold this put forever, and every later publish behind it.
        try:
            with anyio.fail_after(self.operation_timeout):
                await channel.write_queue.put(ChannelFrame(payload=payload, should_close=False))
        except (*_ERRORS, asyncio.CancelledError):
            if _really_cancelled():
                raise
            self._break_publisher()

    def _break_publisher(self) -> None:
        if self._pub_broken is not None and not self._pub_broken.done():
            self._pub_broken.set_result(None)

    # -- persistence ----------------------------------------------------------------------------
    # See "Persistence" in the module docstring.

    async def publish_persistent(
        self, room: str, frame: bytes, *, live: bool, to: Collection[str] | None = None
    ) -> None:
        """One confirmed, persistent publish on the data exchange: with the room's routing key
        if ``live`` (node queues bound to the room get it), else with the storage key only;
        either way its BCC header routes it to the storage queue and the room's recent queue.
        RabbitMQ routes one message atomically, so the three deliveries happen together, and
        the confirmation comes once every queue accepted it (the storage queue durably)."""
        key = routing_key(room)
        await self._publish(self._data_xb, key if live else _STORE_KEY.decode(), frame, key)

    def _recent_queue(self, key: str) -> str:
        assert self._ctx is not None
        return amqp_name(self._ctx.namespace, "recent", key)

    def _declare_recent(self, channel: aiormq.Channel, key: str) -> list[bytes]:
        """Wire bytes of a no-wait declare and bind of the room's recent queue, unless this
        channel did that less than a quarter of ``recent_ttl`` ago (redeclaring renews the
        queue's ``x-expires`` lease; publishing alone does not)."""
        if self._declared_channel is not channel:
            self._declared, self._declared_channel = {}, channel
        now = time.monotonic()
        renew = self.recent_ttl / 4
        last = self._declared.get(key)
        if last is not None and now - last < renew:
            return []
        if len(self._declared) >= 100_000:  # bounded: forget rooms not published lately
            self._declared = {k: t for k, t in self._declared.items() if now - t < renew}
        self._declared[key] = now
        queue = self._recent_queue(key)
        arguments: dict[str, Any] = {
            # One more than the cache size: see recent() for why this keeps truncation honest.
            "x-max-length": self.recent_size + 1,
            "x-overflow": "drop-head",
            "x-expires": self.recent_ttl * 1000,
        }
        return [
            pamqp_frame.marshal(
                pamqp_commands.Queue.Declare(
                    queue=queue, durable=True, nowait=True, arguments=arguments
                ),
                channel.number,
            ),
            pamqp_frame.marshal(
                pamqp_commands.Queue.Bind(
                    queue=queue,
                    exchange=self._data_x,
                    routing_key=_recent_key(key).decode(),
                    nowait=True,
                ),
                channel.number,
            ),
        ]

    async def recent(
        self, room: str, *, since: str | None = None, limit: int | None = None
    ) -> RecentFrames:
        """Read the room's recent queue without consuming it.

        The reader takes the queue as its *exclusive* consumer (RabbitMQ refuses a second one:
        concurrent readers take turns, each retrying within the operation timeout), publishes a
        sentinel into it, collects every frame delivered before the sentinel, acknowledges only
        the sentinel and closes its channel: RabbitMQ puts the frames back in their places.

        ``truncated``: the queue holds at most ``recent_size + 1`` frames and drops the oldest
        beyond that. Holding ``recent_size`` or more therefore means older frames exist or were
        dropped (the sentinel itself can push out one frame of a full queue), so the answer is
        True then — conservatively when exactly ``recent_size`` were ever published.

        A queue is read from its head only, so ``since`` cannot shorten the read itself; it
        shortens what is returned (and decoded by the router), newest first.
        """
        if self._ctx is None:
            raise BrokerUnavailable("RabbitMQ broker is not started")
        queue = self._recent_queue(routing_key(room))
        deadline = anyio.current_time() + self.operation_timeout
        delay = 0.002
        while True:
            conn = self._sub_conn
            if conn is None or conn.is_closed:
                raise BrokerUnavailable("RabbitMQ subscriber connection is down")
            try:
                with anyio.fail_after(max(deadline - anyio.current_time(), 0.001)):
                    frames = await self._read_recent(conn, queue)
            except ChannelNotFoundEntity:
                return RecentFrames([], truncated=False)  # nothing persisted lately
            except (ChannelAccessRefused, ChannelLockedResource) as exc:
                if anyio.current_time() + delay >= deadline:
                    raise BrokerUnavailable(f"recent queue of {room!r} stayed locked") from exc
                await anyio.sleep(delay)  # another reader holds it for a few milliseconds
                delay = min(delay * 2, 0.05)
                continue
            except (*_ERRORS, asyncio.CancelledError) as exc:
                if _really_cancelled():
                    raise
                raise BrokerUnavailable(
                    f"reading the recent queue failed: {describe(exc)}"
                ) from exc
            scan = RecentScan(since, limit)
            for frame in reversed(frames[-self.recent_size :]):
                if not scan.add(frame):
                    break
            return scan.result(evicted=len(frames) >= self.recent_size)

    async def _read_recent(self, conn: AbstractConnection, queue: str) -> list[bytes]:
        channel = await conn.channel(publisher_confirms=False)
        try:
            await channel.basic_qos(prefetch_count=self.recent_size + 16)
            token = uuid.uuid4().hex
            frames: list[bytes] = []
            strays: list[int] = []
            mine: asyncio.Future[int] = asyncio.get_running_loop().create_future()

            async def on_message(message: DeliveredMessage) -> None:
                # Runs synchronously in delivery order (aiormq: one task each, in order).
                props = message.header.properties
                tag = getattr(message.delivery, "delivery_tag", 0)
                if props.message_type == _SENTINEL:
                    if props.message_id == token and not mine.done():
                        mine.set_result(tag)
                    elif not mine.done():
                        strays.append(tag)  # a reader that died before acking its own
                elif not mine.done():
                    frames.append(message.body)

            await channel.basic_consume(queue, on_message, exclusive=True, no_ack=False)
            await channel.basic_publish(
                b"",
                routing_key=queue,
                properties=pamqp_commands.Basic.Properties(
                    message_id=token, message_type=_SENTINEL
                ),
            )
            tag = await mine
            for stray in strays:
                await channel.basic_ack(stray)
            await channel.basic_ack(tag)
            return frames
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(self.operation_timeout):
                try:
                    await channel.close()  # the frames go back to their places
                except (*_ERRORS, asyncio.CancelledError):
                    pass

    def storage_consumer(self, namespace: str, consumer: str) -> StorageConsumer:
        return _RabbitMQConsumer(self, namespace, consumer)

    # -- introspection (tests, inspect) ---------------------------------------------------------

    async def broker_subscriptions(self) -> frozenset[str]:
        """Rooms bound to this node's queue, read from RabbitMQ's management API."""
        if not self._queue:
            raise BrokerUnavailable("RabbitMQ broker is not started")
        bindings = await self.management_request(
            f"/api/queues/{quote(self.vhost, safe='')}/{quote(self._queue, safe='')}/bindings"
        )
        rooms: set[str] = set()
        for binding in bindings:
            if binding.get("source") != self._data_x:
                continue
            key = str(binding.get("routing_key", ""))
            room = self._key_rooms.get(key) if key.startswith(_HASH_MARK) else _room_of_key(key)
            rooms.add(room if room is not None else f"<unknown key {key}>")
        return frozenset(rooms)

    async def management_request(self, path: str, method: str = "GET") -> Any:
        """Send one request to the management HTTP API; return the decoded JSON answer."""
        try:
            with anyio.fail_after(self.operation_timeout):
                return await _http_json(
                    method, self.management_url + path, self._user, self._password
                )
        except TimeoutError as exc:
            raise BrokerUnavailable(f"RabbitMQ management API timed out on {path}") from exc


#: The ``nodes`` queue (consumed by every node, never routed to) goes once unused this long.
_NODES_EXPIRE_MS = 3_600_000


async def _ignore(message: DeliveredMessage) -> None:
    """The ``nodes`` queue's consumer: it counts, it never receives."""


async def _declare_storage(channel: AbstractChannel, exchange: str, queue: str) -> None:
    """Declare the data exchange and the namespace's storage queue bound to it by the storage
    key (idempotent; nodes and storage workers both do it, whoever comes first)."""
    await channel.exchange_declare(exchange, exchange_type="topic", durable=True)
    await channel.queue_declare(queue, durable=True, arguments={"x-queue-type": "quorum"})
    await channel.queue_bind(queue, exchange, routing_key=_STORE_KEY.decode())


class _RabbitMQConsumer(StorageConsumer):
    """A competing consumer of the storage queue on its own connection, with manual acks.

    It consumes lazily, on the first :meth:`fetch` (a consumer used only for :meth:`pending`
    takes nothing). RabbitMQ pushes up to ``storage_prefetch`` frames ahead; they wait in a
    local buffer until fetched. When the connection dies, RabbitMQ requeues everything this
    consumer held unacknowledged and hands it to the others at once; the next ``fetch``
    reconnects, and frames of the old connection are dropped from the buffer (they are
    redelivered) and can no longer be acknowledged.

    If the queue is deleted, RabbitMQ cancels the consumer; the next :meth:`fetch` redeclares
    the queue (and its binding) and raises :class:`~roomrouter.StorageQueueLost`: what the
    deleted queue held, and what nodes published while no queue was bound, is lost.
    """

    def __init__(self, broker: RabbitMQBroker, namespace: str, name: str) -> None:
        self._broker = broker
        self._name = name
        self._queue = amqp_name(namespace, "store")
        self._exchange = amqp_name(namespace, "data", exchange=True)
        self._conn: AbstractConnection | None = None
        self._ch: AbstractChannel | None = None
        self._generation = 0
        self._consuming = False
        self._buffer: deque[tuple[bytes, int]] = deque()
        self._fetched: list[int] = []  # delivery tags handed out and not acknowledged, in order
        self._wake = asyncio.Event()
        self._queue_deleted = False

    async def start(self) -> None:
        await self._connect()

    async def aclose(self) -> None:
        conn, self._conn, self._ch = self._conn, None, None
        self._consuming = False
        if conn is not None:
            await self._broker._quiet_close(conn)

    async def _connect(self) -> None:
        broker = self._broker
        url = (
            broker._url
            + ("&" if "?" in broker._url else "?")
            + urlencode({"name": f"roomrouter worker {self._name}"})
        )
        conn = aiormq.Connection(url)
        try:
            with anyio.fail_after(broker.operation_timeout):
                await conn.connect()
                channel = await conn.channel(publisher_confirms=False)
                await channel.basic_qos(prefetch_count=broker.storage_prefetch)
                await _declare_storage(channel, self._exchange, self._queue)
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await broker._quiet_close(conn)
            if isinstance(exc, (*_ERRORS, asyncio.CancelledError)) and not _really_cancelled():
                raise _unreachable(broker._url, exc) from exc
            raise
        # The server cancels the consumer if the queue is deleted: redeclare it and consume
        # again on the next fetch.
        channel.on_consumer_cancel_callbacks.add(lambda _: self._cancelled_by_server())
        self._conn, self._ch = conn, channel
        self._generation += 1
        self._consuming = False
        self._buffer.clear()
        self._fetched.clear()

    def _cancelled_by_server(self) -> None:
        self._queue_deleted = True
        self._consuming = False
        self._wake.set()

    async def _redeclare(self, channel: AbstractChannel) -> None:
        self._queue_deleted = False
        try:
            with anyio.fail_after(self._broker.operation_timeout):
                await _declare_storage(channel, self._exchange, self._queue)
        except (*_ERRORS, asyncio.CancelledError) as exc:
            if _really_cancelled():
                raise
            self._queue_deleted = True  # try again on the next fetch
            raise BrokerUnavailable(f"cannot redeclare the storage queue: {describe(exc)}") from exc
        raise StorageQueueLost(
            f"storage queue {self._queue!r} was deleted (RabbitMQ cancelled its consumer): the "
            "frames it held that no worker had stored, and those published while it was gone, "
            "are lost; redeclared it, storing what is published from now on"
        )

    async def _channel(self) -> AbstractChannel:
        conn, channel = self._conn, self._ch
        if conn is None or channel is None or conn.is_closed or channel.is_closed:
            if conn is not None:
                await self._broker._quiet_close(conn)
            self._conn = self._ch = None
            await self._connect()
            assert self._ch is not None
            channel = self._ch
        return channel

    async def fetch(self, max_frames: int, wait: float) -> list[StoredFrame]:
        channel = await self._channel()
        if self._queue_deleted:
            await self._redeclare(channel)
        if not self._consuming:
            generation = self._generation

            async def on_message(message: DeliveredMessage) -> None:
                if generation == self._generation:
                    tag = getattr(message.delivery, "delivery_tag", 0)
                    self._buffer.append((message.body, tag))
                    self._wake.set()

            try:
                with anyio.fail_after(self._broker.operation_timeout):
                    await channel.basic_consume(self._queue, on_message, no_ack=False)
            except (*_ERRORS, asyncio.CancelledError) as exc:
                if _really_cancelled():
                    raise
                raise BrokerUnavailable(
                    f"cannot consume the storage queue: {describe(exc)}"
                ) from exc
            self._consuming = True
        if not self._buffer:
            self._wake.clear()
            # Until a frame arrives, the channel closes, or ``wait`` is over.
            waiter = asyncio.ensure_future(self._wake.wait())
            closing = channel.closing
            try:
                await asyncio.wait((waiter, closing), timeout=wait, return_when="FIRST_COMPLETED")
            finally:
                waiter.cancel()
                closing.cancel()  # only stops this observer
        out: list[StoredFrame] = []
        token_of = self._generation
        while self._buffer and len(out) < max_frames:
            body, tag = self._buffer.popleft()
            self._fetched.append(tag)
            out.append(StoredFrame(body, (token_of, tag)))
        return out

    async def ack(self, frames: Sequence[StoredFrame]) -> None:
        if not frames:
            return
        tokens = [f.token for f in frames]
        channel = self._ch
        if (
            channel is None
            or channel.is_closed
            or any(not isinstance(t, tuple) or t[0] != self._generation for t in tokens)
        ):
            raise BrokerUnavailable(
                "the storage queue connection these frames came from is gone; "
                "RabbitMQ redelivers them"
            )
        tags = sorted(t[1] for t in tokens if isinstance(t, tuple))
        try:
            if tags == self._fetched[: len(tags)]:
                # Everything handed out up to the highest tag: one cumulative ack.
                await channel.basic_ack(tags[-1], multiple=True)
                del self._fetched[: len(tags)]
            else:
                for tag in tags:
                    await channel.basic_ack(tag)
                acked = set(tags)
                self._fetched = [t for t in self._fetched if t not in acked]
        except _ERRORS as exc:
            raise BrokerUnavailable(f"storage queue ack failed: {describe(exc)}") from exc

    async def pending(self) -> int:
        """Frames ready in the storage queue plus frames consumers hold unacknowledged.

        AMQP reports only the ready count (exactly, from a passive declare), and what this
        consumer holds is known here. What *other* consumers hold comes from the management
        API, whose figures are up to one statistics interval old. A zero from it is therefore
        believed only after watching it for longer than one interval while nothing is ready,
        so an answer of 0 is never stale; such a call takes ``stats_interval`` seconds or more.
        """
        broker = self._broker
        ready, consumers = await self._declare_passive()
        own = len(self._buffer) + len(self._fetched)
        others = consumers - (1 if self._consuming else 0)
        if others <= 0:
            return ready + own
        path = f"/api/queues/{quote(broker.vhost, safe='')}/{quote(self._queue, safe='')}"
        if ready > 0:
            info = await broker.management_request(path)
            return ready + own + int(info.get("messages_unacknowledged") or 0)
        start = anyio.current_time()
        seen = False
        while True:
            info = await broker.management_request(path)
            if "messages" in info:
                seen = True
                if int(info["messages"]):
                    return int(info["messages"]) + own
            elapsed = anyio.current_time() - start
            if seen and elapsed > broker.stats_interval * 1.5:
                ready, _ = await self._declare_passive()
                return ready + own
            if elapsed > broker.stats_interval * 4:
                raise BrokerUnavailable("the management API has no figures for the storage queue")
            await anyio.sleep(0.25)

    async def _declare_passive(self) -> tuple[int, int]:
        channel = await self._channel()
        try:
            with anyio.fail_after(self._broker.operation_timeout):
                ok = await channel.queue_declare(self._queue, passive=True)
        except (*_ERRORS, asyncio.CancelledError) as exc:
            if _really_cancelled():
                raise
            raise BrokerUnavailable(f"cannot inspect the storage queue: {describe(exc)}") from exc
        return int(ok.message_count or 0), int(ok.consumer_count or 0)


async def _bind(channel: AbstractChannel, queue: str, exchange: str, keys: list[str]) -> None:
    """Bind ``keys`` in one round trip: no-wait binds, then one confirmed bind as a fence.

    A channel executes methods in order, so the last BindOk means every bind before it took
    effect; a failing bind closes the channel, and the fence raises.
    """
    if not keys:
        return
    for key in keys[:-1]:
        await channel.queue_bind(queue, exchange, routing_key=key, nowait=True)
    await channel.queue_bind(queue, exchange, routing_key=keys[-1])


async def _first_closed(
    *sources: AbstractConnection | AbstractChannel | asyncio.Future[None],
) -> None:
    """Wait until any connection/channel closes (or a future is set)."""
    observers = [s if isinstance(s, asyncio.Future) else s.closing for s in sources]
    try:
        await asyncio.wait(observers, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for source, observer in zip(sources, observers, strict=True):
            if observer is not source and not observer.done():
                observer.cancel()  # only stops this observer


async def _http_json(method: str, url: str, user: str, password: str) -> Any:
    """One HTTP/1.0 request (no chunked answers, the server closes) returning decoded JSON."""
    parts = urlsplit(url)
    tls = parts.scheme == "https"
    port = parts.port or (443 if tls else 80)
    host = parts.hostname or "127.0.0.1"
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    request = (
        f"{method} {path} HTTP/1.0\r\nHost: {host}:{port}\r\nAuthorization: Basic {auth}\r\n"
        "Accept: application/json\r\n\r\n"
    ).encode()
    chunks: list[bytes] = []
    try:
        stream: anyio.abc.ByteStream
        if tls:
            stream = await anyio.connect_tcp(host, port, tls=True)
        else:
            stream = await anyio.connect_tcp(host, port)
        async with stream:
            await stream.send(request)
            while True:
                try:
                    chunks.append(await stream.receive())
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    break
    except OSError as exc:
        raise BrokerUnavailable(
            f"RabbitMQ management API at {redact(url)} failed: {describe(exc)}"
        ) from exc
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0].split()
    if len(status) < 2 or not status[1].startswith(b"2"):
        raise BrokerUnavailable(
            f"RabbitMQ management API: {head[:200]!r} for {method} {redact(url)}"
        )
    if not body:
        return None
    try:
        return json.loads(body)
    except ValueError as exc:
        raise BrokerUnavailable(f"RabbitMQ management API sent bad JSON for {redact(url)}") from exc
