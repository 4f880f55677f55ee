"""The node's side of the RabbitMQ backend: :class:`RabbitMQBroker` (see the package
docstring). The publisher connection is ``_publisher``'s, the storage consumer ``_storage``'s."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

import anyio
from aiormq.abc import AbstractChannel, AbstractConnection, DeliveredMessage
from aiormq.exceptions import ChannelAccessRefused, ChannelLockedResource, ChannelNotFoundEntity

from ..._errors import BrokerUnavailable, ConfigurationError, describe
from ..._urls import pop_options, redact
from .._base import Broker, BrokerContext, RecentFrames, RecentScan, StorageConsumer
from ..transport import Backoff, keep_connected
from ._common import (
    ERRORS,
    STABLE_AFTER,
    Hosts,
    bind,
    connect,
    first_closed,
    quiet_close,
    really_cancelled,
    unbind,
)
from ._management import request_json
from ._names import (
    HASH_MARK,
    STORE_KEY,
    addressed_key,
    amqp_name,
    room_of_key,
    room_words,
    routing_key,
)
from ._publisher import Publisher
from ._recent import read_recent
from ._storage import StorageQueueConsumer

__all__ = ["RabbitMQBroker"]

log = logging.getLogger("roomrouter.rabbitmq")

#: The ``nodes`` queue (consumed by every node, never routed to) goes once unused this long.
_NODES_EXPIRE_MS = 3_600_000

#: Most hosts one publish is addressed to (its BCC header then holds at most ~9 KB of keys, far
#: under a content header frame's limit); a room with more remote hosts goes to its room key.
MAX_ADDRESSED = 64


async def _ignore(message: DeliveredMessage) -> None:
    """The ``nodes`` queue's consumer: it counts, it never receives."""


class RabbitMQBroker(Broker):
    """See the package docstring.

    Options:
        url: ``amqp://user:pass@host:port/vhost`` (``amqps://`` for TLS); aiormq's own query
            options (``heartbeat``, ``cafile``, ...) pass through. Several nodes of one cluster:
            ``amqp://user:pass@h1:5672,h2:5673,h3/vhost``; each connection tries them in turn
            and reconnects from the host after its last one (``_common.Hosts``).
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
    supports_direct = True
    #: Address every room's hosts (up to :data:`MAX_ADDRESSED`): one publish reaches k nodes,
    #: so there is nothing to trade (see "Direct publishing" in the package docstring).
    default_direct_max = MAX_ADDRESSED

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
        self._hosts = Hosts(self._url)  # several hosts: one cluster, tried in turn
        self.prefetch = prefetch
        self.operation_timeout = operation_timeout
        self.max_backoff = max_backoff
        self.queue_max_length = queue_max_length
        self.vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
        self._user = unquote(parts.username or "guest")
        self._password = unquote(parts.password or "guest")
        self.management_url = (management_url or f"http://{self._hosts.first_host}:15672").rstrip(
            "/"
        )
        self.filtered = 0
        self.recent_size = recent_size
        self.recent_ttl = recent_ttl
        self.redelivery_after = redelivery_after
        self.storage_prefetch = storage_prefetch
        self.stats_interval = stats_interval

        self._ctx: BrokerContext | None = None
        self._closed = False
        self._rooms: set[str] = set()
        # Room word (routing key, or the hashed first word of an addressed key) -> room, for
        # held rooms only.
        self._key_rooms: dict[str, str] = {}
        self._node_keys: dict[str, str] = {}  # node id -> routing_key(node), for addressing
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
        # Publisher side: created by start().
        self._publisher: Publisher | None = None

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
        self._control_x = amqp_name(ns, "control", exchange=True)
        self._direct_x = amqp_name(ns, "direct", exchange=True)
        self._nodes_q = amqp_name(ns, "nodes")
        self._node_key = routing_key(context.node_id)
        self._data_xb = self._data_x.encode()
        self._control_xb = self._control_x.encode()
        self._direct_xb = self._direct_x.encode()
        publisher = self._publisher = Publisher(
            self._hosts,
            name=self.connection_name("pub"),
            service=f"RabbitMQ at {self._hosts}",
            namespace=ns,
            operation_timeout=self.operation_timeout,
            max_backoff=self.max_backoff,
            recent_size=self.recent_size,
            recent_ttl=self.recent_ttl,
        )
        pub = await publisher.connect()
        try:
            sub = await self._open("sub")
            await self._setup_subscriber(sub)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await publisher.aclose()
            raise
        node, tg = context.node_id, context.task_group
        what = f"node {node}: RabbitMQ publisher connection"
        tg.start_soon(publisher.outbox.watch, name=f"amqp outbox {node}")
        tg.start_soon(publisher.run_sender, name=f"amqp sender {node}")
        tg.start_soon(publisher.keep, pub, what, name=f"amqp pub {node}")
        tg.start_soon(self._keep_subscriber, sub, name=f"amqp sub {node}")

    async def aclose(self) -> None:
        self._closed = True
        self._sub_ready = False
        conn, self._sub_conn, self._sub_ch = self._sub_conn, None, None
        if conn is not None:
            await quiet_close(conn, self.operation_timeout)
        if self._publisher is not None:
            await self._publisher.aclose()

    async def _open(self, role: str) -> AbstractConnection:
        return await connect(self._hosts, self.connection_name(role), self.operation_timeout)

    # -- subscriber connection ------------------------------------------------------------------

    async def _setup_subscriber(self, conn: AbstractConnection) -> None:
        """On a new connection: declare, bind the control plane and every held room, consume
        (the queue is closed with ``conn`` if this fails)."""
        assert self._ctx is not None
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
                with anyio.fail_after(self.operation_timeout + len(add) / 500):
                    await bind(channel, queue, self._data_x, self._binding_keys(add))
                    bound.update(add)
                with anyio.fail_after(self.operation_timeout + len(drop) / 50):
                    await unbind(conn, channel, queue, self._data_x, self._binding_keys(drop))
                    bound.difference_update(drop)
            with anyio.fail_after(self.operation_timeout):
                self._unacked = 0
                # The server cancels the consumer if the queue is deleted under us: rebuild.
                channel.on_consumer_cancel_callbacks.add(lambda _: self._break_subscriber())
                await channel.basic_consume(queue, self._on_message, no_ack=False)
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await quiet_close(conn, self.operation_timeout)
            if isinstance(exc, (*ERRORS, asyncio.CancelledError)) and not really_cancelled():
                raise BrokerUnavailable(
                    f"cannot set up the RabbitMQ queue: {describe(exc)}"
                ) from exc
            raise
        self._sub_conn, self._sub_ch, self._queue = conn, channel, queue
        self._sub_broken = asyncio.get_running_loop().create_future()
        self._sub_ready = True

    def _break_subscriber(self) -> None:
        """Give up the subscriber connection whose state is unknown (a failed or cancelled bind
        or unbind): the reconnect closes it and rebuilds exactly the held rooms."""
        if self._sub_ready:
            self._sub_ready = False
            self._epoch += 1
        if self._sub_broken is not None and not self._sub_broken.done():
            self._sub_broken.set_result(None)

    async def _keep_subscriber(self, held: AbstractConnection) -> None:
        """The subscriber connection, restored by the transport core's reconnect template:
        connect, redeclare the queue (under a new name) and rebind every held room, then tell
        the router (``on_reconnect``)."""
        assert self._ctx is not None
        ctx = self._ctx
        first: list[AbstractConnection] = [held]

        async def reconnect() -> AbstractConnection:
            if self._closed:
                await anyio.sleep_forever()  # aclose: the task group cancels this task
            return first.pop() if first else await self._open("sub")

        async def publisher_up() -> None:
            if self._publisher is not None:
                await self._publisher.up.wait()

        async def restore(conn: AbstractConnection) -> None:
            if conn is held:
                return  # set up by start()
            await self._setup_subscriber(conn)
            # The router answers a reconnect with control frames: let the publisher come back
            # first (it was most likely cut at the same time), but do not wait forever.
            with anyio.move_on_after(self.operation_timeout):
                await publisher_up()

        def on_restored() -> None:
            log.info("node %s: RabbitMQ reconnected, %d room(s) restored",
                     ctx.node_id, len(self._rooms))  # fmt: skip
            ctx.on_reconnect()

        async def serve(conn: AbstractConnection) -> None:
            channel, broken = self._sub_ch, self._sub_broken
            if channel is not None and broken is not None:
                await first_closed(conn, channel, broken)
            if self._closed:
                await anyio.sleep_forever()
            # Synchronously, before any await: a subscribe in flight now sees a new epoch.
            if self._sub_ready:
                self._sub_ready = False
                self._epoch += 1
            self._sub_conn = self._sub_ch = None
            await quiet_close(conn, self.operation_timeout)

        await keep_connected(
            reconnect,
            serve,
            restore=restore,
            on_restored=on_restored,
            backoff=Backoff(0.05, self.max_backoff),
            what=f"node {ctx.node_id}: RabbitMQ subscriber connection",
            stable_after=STABLE_AFTER,
        )

    async def _on_message(self, message: DeliveredMessage) -> None:
        # aiormq runs this in one task per delivery, created in delivery order; everything up to
        # the ack runs in the task's first step, so handlers see frames in broker order.
        ctx = self._ctx
        if ctx is None:
            return
        body = message.body
        try:
            if message.exchange == self._data_x:
                # A room key, or an addressed key "{room word}.{node word}" (the first host's:
                # the others were reached by BCC). Either way the binding that brought it here
                # is one of a held room's (see "Direct publishing" in the package docstring).
                key = message.routing_key or ""
                room = self._key_rooms.get(key.partition(".")[0])
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
                except (*ERRORS, asyncio.CancelledError):
                    if really_cancelled():
                        raise
                    # The channel is gone; the reconnect rebuilds it.

    # -- subscriptions --------------------------------------------------------------------------

    async def subscribe(self, rooms: Collection[str]) -> None:
        new = [r for r in rooms if r not in self._rooms]
        if not new:
            return
        channel, epoch = self._sub_ch, self._epoch
        if channel is None or not self._sub_ready:
            raise BrokerUnavailable("RabbitMQ subscriber connection is down")
        keys = self._binding_keys(new)
        try:
            with anyio.fail_after(self.operation_timeout + len(keys) / 1000):
                await bind(channel, self._queue, self._data_x, keys)
        except BaseException as exc:
            self._break_subscriber()
            if isinstance(exc, (*ERRORS, asyncio.CancelledError)) and not really_cancelled():
                raise BrokerUnavailable(f"RabbitMQ queue.bind failed: {describe(exc)}") from exc
            raise
        if epoch != self._epoch:
            raise BrokerUnavailable("RabbitMQ connection lost while subscribing")
        self._rooms.update(new)
        for room in new:
            for word in room_words(room):
                self._key_rooms[word] = room

    def _binding_keys(self, rooms: Collection[str]) -> list[str]:
        """Each room's two bindings: its room key (publishes that name no hosts) and the key
        addressed to this node (publishes that name it)."""
        assert self._ctx is not None
        node = self._ctx.node_id
        return [key for r in rooms for key in (routing_key(r), addressed_key(r, node))]

    async def unsubscribe(self, rooms: Collection[str]) -> None:
        gone = [r for r in rooms if r in self._rooms]
        self._rooms.difference_update(gone)
        for room in gone:
            for word in room_words(room):
                self._key_rooms.pop(word, None)
        conn, channel = self._sub_conn, self._sub_ch
        if not gone or conn is None or channel is None or not self._sub_ready:
            return  # not restored on reconnect: forgotten either way
        # queue.unbind has no no-wait form in AMQP 0-9-1: round trips, overlapped (``unbind``).
        try:
            with anyio.fail_after(self.operation_timeout + len(gone) / 50):
                await unbind(conn, channel, self._queue, self._data_x, self._binding_keys(gone))
        except BaseException as exc:
            self._break_subscriber()
            if isinstance(exc, (*ERRORS, asyncio.CancelledError)) and not really_cancelled():
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
            if isinstance(exc, (*ERRORS, asyncio.CancelledError)) and not really_cancelled():
                raise BrokerUnavailable(
                    f"cannot count the nodes on RabbitMQ: {describe(exc)}"
                ) from exc
            raise
        return max((declared.consumer_count or 0) - 1, 0)

    # -- publishing -----------------------------------------------------------------------------

    async def publish(self, room: str, frame: bytes, *, to: Collection[str] | None = None) -> None:
        key = routing_key(room)
        if to and len(to) <= MAX_ADDRESSED:
            first, bcc = self._address(room, key, to)
            await self._publish(self._data_xb, first, frame, None, bcc)
        else:
            await self._publish(self._data_xb, key, frame)

    def _address(self, room: str, key: str, to: Collection[str]) -> tuple[str, list[bytes]]:
        """The routing key and BCC keys of a publish addressed to the nodes ``to`` (direct
        publishing): one addressed key per node, the first as the routing key."""
        node_keys = self._node_keys
        keys: list[str] = []
        for node in to:
            node_key = node_keys.get(node)
            if node_key is None:
                if len(node_keys) >= 10_000:  # bounded: node ids of a long-lived namespace
                    node_keys.clear()
                node_key = node_keys[node] = routing_key(node)
            # addressed_key's rule, without encoding the room again per host
            if len(key) + len(node_key) < 255:
                keys.append(f"{key}.{node_key}")
            else:
                keys.append(addressed_key(room, node))
        return keys[0], [k.encode() for k in keys[1:]]

    async def _publish(
        self,
        exchange: bytes,
        key: str,
        frame: bytes,
        persist_key: str | None = None,
        bcc: list[bytes] | None = None,
    ) -> None:
        publisher = self._publisher
        if publisher is None:
            raise BrokerUnavailable("RabbitMQ broker is not started")
        await publisher.publish(exchange, key, frame, persist_key, bcc)

    async def publish_control(self, frame: bytes, *, to: str | None = None) -> int | None:
        if to is None:
            await self._publish(self._control_xb, "", frame)
        else:
            await self._publish(self._direct_xb, routing_key(to), frame)
        return None

    # -- persistence ----------------------------------------------------------------------------
    # See "Persistence" in the package docstring.

    async def publish_persistent(
        self, room: str, frame: bytes, *, live: bool, to: Collection[str] | None = None
    ) -> None:
        """One confirmed, persistent publish on the data exchange: with the room's routing key
        if ``live`` (node queues bound to the room get it), else with the storage key only;
        either way its BCC header routes it to the storage queue and the room's recent queue.
        RabbitMQ routes one message atomically, so the three deliveries happen together, and
        the confirmation comes once every queue accepted it (the storage queue durably)."""
        key = routing_key(room)
        if not live:
            await self._publish(self._data_xb, STORE_KEY.decode(), frame, key)
        elif to and len(to) <= MAX_ADDRESSED:
            first, bcc = self._address(room, key, to)
            await self._publish(self._data_xb, first, frame, key, bcc)
        else:
            await self._publish(self._data_xb, key, frame, key)

    def _recent_queue(self, key: str) -> str:
        assert self._ctx is not None
        return amqp_name(self._ctx.namespace, "recent", key)

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
        backoff = Backoff(0.002, 0.05)
        while True:
            conn = self._sub_conn
            if conn is None or conn.is_closed:
                raise BrokerUnavailable("RabbitMQ subscriber connection is down")
            try:
                with anyio.fail_after(max(deadline - anyio.current_time(), 0.001)):
                    frames = await read_recent(
                        conn, queue, self.recent_size, self.operation_timeout
                    )
            except ChannelNotFoundEntity:
                return RecentFrames([], truncated=False)  # nothing persisted lately
            except (ChannelAccessRefused, ChannelLockedResource) as exc:
                delay = backoff.next()  # another reader holds it for a few milliseconds
                if anyio.current_time() + delay >= deadline:
                    raise BrokerUnavailable(f"recent queue of {room!r} stayed locked") from exc
                await anyio.sleep(delay)
                continue
            except (*ERRORS, asyncio.CancelledError) as exc:
                if really_cancelled():
                    raise
                raise BrokerUnavailable(
                    f"reading the recent queue failed: {describe(exc)}"
                ) from exc
            scan = RecentScan(since, limit)
            for frame in reversed(frames[-self.recent_size :]):
                if not scan.add(frame):
                    break
            return scan.result(evicted=len(frames) >= self.recent_size)

    def storage_consumer(self, namespace: str, consumer: str) -> StorageConsumer:
        return StorageQueueConsumer(self, self._hosts, namespace, consumer)

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
            # A room key or an addressed key (its first word is the room's).
            key = str(binding.get("routing_key", "")).partition(".")[0]
            room = self._key_rooms.get(key) if key.startswith(HASH_MARK) else room_of_key(key)
            rooms.add(room if room is not None else f"<unknown key {key}>")
        return frozenset(rooms)

    async def management_request(self, path: str, method: str = "GET") -> Any:
        """Send one request to the management HTTP API; return the decoded JSON answer."""
        url = self.management_url + path
        try:
            with anyio.fail_after(self.operation_timeout):
                return await request_json(method, url, self._user, self._password)
        except TimeoutError as exc:
            raise BrokerUnavailable(
                f"RabbitMQ management API at {redact(url)}: no answer within "
                f"{self.operation_timeout} s"
            ) from exc
