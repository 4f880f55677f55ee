"""The publisher side of a node: one connection with one channel in confirm mode, the
transport core's :class:`~roomrouter.brokers.transport.Outbox` and its sender.

A publish is queued in the outbox before its caller's first ``await`` (call order is send
order) and settled by the core's rule: "not sent" (:class:`~roomrouter.BrokerUnavailable`)
while none of its bytes can have reached RabbitMQ, "outcome unknown"
(:class:`~roomrouter.PublishOutcomeUnknown`) once they may have. The sender packs a batch only
after ``Transmit.sent()``, and a publish gets its delivery tag in that same synchronous step:
one the outbox already failed as "not sent" (deadline, cancelled caller) never gets a tag and
is never written. RabbitMQ's confirmations settle the in-flight publishes (``basic.ack``:
done; ``basic.nack``: "outcome unknown", see :func:`_confirmed`); a lost channel or
connection fails them as "outcome unknown" (``Outbox.fail_in_flight``), and so does the
outbox's watchdog at their deadline.
"""

from __future__ import annotations

import asyncio
import time
from functools import partial
from typing import TYPE_CHECKING, Any

import aiormq
import anyio
from aiormq.abc import AbstractChannel, AbstractConnection
from aiormq.exceptions import DeliveryError

from ..._errors import BrokerUnavailable, PublishOutcomeUnknown, describe
from ..transport import Backoff, Outbox, Send, keep_connected
from ._aiormq import expect_confirm, frame_max, write_frames
from ._common import ERRORS, STABLE_AFTER, connect, declare_storage, first_closed, quiet_close
from ._names import STORE_KEY, amqp_name, recent_key
from ._wire import bcc_properties, persistent_properties, publish_frames, recent_queue_frames

if TYPE_CHECKING:
    from ._common import Hosts

__all__ = ["Publisher"]


_MAX_WRITE = 256 * 1024  # bytes per write-queue entry: a backlog is not one huge buffer
_MAX_BATCH = 4096  # publishes packed per transmit (one outbox take)


class _Publish:
    """One publish in the outbox; ``channel`` is the confirm channel it was packed for; ``bcc``
    the extra routing keys of a frame addressed to several nodes."""

    __slots__ = ("bcc", "channel", "exchange", "frame", "key", "persist_key")

    def __init__(
        self,
        exchange: bytes,
        key: bytes,
        frame: bytes,
        persist_key: str | None,
        bcc: list[bytes] | None = None,
    ) -> None:
        self.exchange = exchange
        self.key = key
        self.frame = frame
        self.persist_key = persist_key
        self.bcc = bcc
        self.channel: aiormq.Channel | None = None


def _confirmed(send: Send[_Publish], service: str, exc: BaseException | None) -> None:
    """Settle a sent publish from RabbitMQ's answer: an ack resolves it; a nack says that *a*
    queue it was routed to refused it, while the others (node queues, the recent cache) may
    have taken it, so it is "outcome unknown" (retry with the id; seen on a cluster while the
    storage queue elects a leader)."""
    if exc is None:
        send.resolve()
    elif isinstance(exc, DeliveryError):
        send.fail(service, "a queue it was routed to refused it (nack)")
    else:
        send.fail(service, describe(exc))


def _close_reason(*sources: AbstractConnection | AbstractChannel) -> str:
    """Why the publisher's channel or connection closed, as the in-flight publishes' reason."""
    for source in sources:
        if source.is_closed:
            closing = source.closing  # closed: the future itself, no new observer
            exc = None if closing.cancelled() else closing.exception()
            if exc is not None:
                return f"its channel was closed ({describe(exc)})"
    return "the publisher connection was lost"


class Publisher:
    """See the module docstring. ``url`` is the broker's AMQP URL, ``name`` the connection's
    client-given name; ``service`` names RabbitMQ in errors."""

    def __init__(
        self,
        url: str | Hosts,
        *,
        name: str,
        service: str,
        namespace: str,
        operation_timeout: float,
        max_backoff: float,
        recent_size: int,
        recent_ttl: int,
    ) -> None:
        self._url = url
        self._name = name
        self._namespace = namespace
        self._timeout = operation_timeout
        self._max_backoff = max_backoff
        self._recent_size = recent_size
        self._recent_ttl = recent_ttl
        self._data_x = amqp_name(namespace, "data", exchange=True)
        self._store_q = amqp_name(namespace, "store")
        self.outbox: Outbox[_Publish] = Outbox(service, operation_timeout, errors=ERRORS)
        #: The live confirm channel (``None`` while the connection is down).
        self.channel: aiormq.Channel | None = None
        #: Set while the channel is up; replaced by a new event when it is lost.
        self.up = anyio.Event()
        self._conn: AbstractConnection | None = None
        self._broken: asyncio.Future[None] | None = None
        self._max_body = 0
        self._closed = False
        # Recent-messages queues declared on ``_declared_channel``: room key -> when (monotonic).
        self._declared: dict[str, float] = {}
        self._declared_channel: aiormq.Channel | None = None

    # -- the connection --------------------------------------------------------------------

    async def connect(self) -> AbstractConnection:
        """Connect and open the confirm channel (raises :class:`~roomrouter.BrokerUnavailable`)."""
        conn = await connect(self._url, self._name, self._timeout)
        try:
            with anyio.fail_after(self._timeout):
                channel = await conn.channel(publisher_confirms=True)
                # The storage queue exists before the first persisted frame can be confirmed:
                # a frame routed to no storage queue would be confirmed and lost.
                await declare_storage(channel, self._data_x, self._store_q)
            # The concrete class: the sender registers confirmations on it directly.
            assert isinstance(channel, aiormq.Channel) and channel.publisher_confirms
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await quiet_close(conn, self._timeout)
            if isinstance(exc, ERRORS):
                raise BrokerUnavailable(f"cannot open a RabbitMQ channel: {describe(exc)}") from exc
            raise
        self._conn, self.channel = conn, channel
        self._broken = asyncio.get_running_loop().create_future()
        self._max_body = frame_max(conn) - 8  # frame header (7) + frame end (1)
        self.up.set()
        return conn

    async def keep(self, held: AbstractConnection, what: str) -> None:
        """Keep the connection up with the transport core's reconnect template, starting with
        ``held`` (from :meth:`connect`). While it is down, publishes fail at once as "not
        sent"; the in-flight ones are settled as "outcome unknown" when the loss is noticed."""
        first: list[AbstractConnection] = [held]

        async def reconnect() -> AbstractConnection:
            if self._closed:
                await anyio.sleep_forever()  # aclose: the task group cancels this task
            return first.pop() if first else await self.connect()

        async def serve(conn: AbstractConnection) -> None:
            channel, broken = self.channel, self._broken
            if channel is not None and broken is not None:
                await first_closed(conn, channel, broken)
            if self._closed:
                await anyio.sleep_forever()
            self.up = anyio.Event()
            # aiormq leaves our confirmations alone when a channel closes: settle them here.
            reason = _close_reason(*(s for s in (channel, conn) if s is not None))
            self.outbox.fail_in_flight(reason)
            await self._close_connection()

        await keep_connected(
            reconnect,
            serve,
            backoff=Backoff(0.05, self._max_backoff),
            what=what,
            stable_after=STABLE_AFTER,
        )

    def _settle(
        self, channel: aiormq.Channel, send: Send[_Publish], exc: BaseException | None
    ) -> None:
        """Settle ``send`` (see :func:`_confirmed`). A nack is RabbitMQ's answer to a queue
        that failed the message: seen when a channel opened during a quorum queue's leader
        election keeps being refused by that queue after the election (RabbitMQ 3.10;
        tests/test_rabbitmq_cluster.py), so the channel is replaced: a new one works."""
        _confirmed(send, self.outbox.service, exc)
        if isinstance(exc, DeliveryError) and channel is self.channel:
            self.break_connection()

    def break_connection(self) -> None:
        """Give up the connection (its state is unknown): :meth:`keep` replaces it."""
        if self._broken is not None and not self._broken.done():
            self._broken.set_result(None)

    async def _close_connection(self) -> None:
        conn, self._conn, self.channel = self._conn, None, None
        if conn is not None:
            await quiet_close(conn, self._timeout)

    async def aclose(self) -> None:
        self._closed = True
        self.outbox.close("the broker is closed")
        await self._close_connection()

    # -- publishing ------------------------------------------------------------------------

    async def publish(
        self,
        exchange: bytes,
        key: str,
        frame: bytes,
        persist_key: str | None = None,
        bcc: list[bytes] | None = None,
    ) -> None:
        """One confirmed publish. With ``persist_key`` (a room's routing key) the frame is
        persistent and also routed to the storage queue and that room's recent queue. ``bcc``:
        more routing keys (RabbitMQ's sender-selected distribution, stripped before delivery):
        one message, routed to the union of the keys' queues as one unit."""
        # Queued before the first await: call order is send order (the transport core).
        item = _Publish(exchange, key.encode(), frame, persist_key, bcc)
        try:
            await self.outbox.submit(item)
        except PublishOutcomeUnknown:
            if item.channel is not None and item.channel is self.channel:
                # No confirmation on the live channel in time: the connection is as good as
                # dead; do not let later publishes queue behind it until the heartbeat notices.
                self.break_connection()
            raise

    async def run_sender(self) -> None:
        """The outbox's sender: pack each batch on the live confirm channel and write it.

        RabbitMQ numbers a channel's publishes in the order it reads them, so a tag taken and
        not written would shift every later confirmation: a write that fails or is cut short
        breaks the connection (:meth:`keep` replaces it)."""
        outbox = self.outbox
        while True:
            try:
                batch = await outbox.take(_MAX_BATCH)
            except BrokerUnavailable:
                return  # the outbox is closed
            async with outbox.transmit(batch) as tx:
                channel = self.channel
                if channel is None or channel.is_closed:
                    raise BrokerUnavailable("the publisher connection is down")
                number, max_body, service = channel.number, self._max_body, outbox.service
                writes: list[bytes] = []  # whole frames only: heartbeats share the queue
                chunks: list[bytes] = []
                size = 0
                # From here to the first write, no await: tags are taken in packing order.
                for send in tx.sent():
                    item = send.item
                    item.channel = channel
                    properties = b""
                    persistent = item.persist_key is not None
                    if item.persist_key is not None:
                        chunks += self._declare_recent(channel, item.persist_key)
                        bcc = [STORE_KEY, recent_key(item.persist_key)]
                        if item.bcc:
                            bcc += item.bcc
                        properties = persistent_properties(bcc)
                    elif item.bcc:
                        properties = bcc_properties(item.bcc)
                    chunk = publish_frames(
                        number, item.exchange, item.key, item.frame, max_body, properties,
                        persistent=persistent,
                    )  # fmt: skip
                    chunks.append(chunk)
                    size += len(chunk)
                    expect_confirm(channel, partial(self._settle, channel, send))
                    if size >= _MAX_WRITE:
                        writes.append(b"".join(chunks))
                        chunks, size = [], 0
                if chunks:
                    writes.append(b"".join(chunks))
                try:
                    for payload in writes:
                        await write_frames(channel, payload)
                except BaseException:
                    self.break_connection()
                    raise
                if channel.is_closed:
                    # Closed while the batch was written: :meth:`keep` may have settled the
                    # in-flight publishes already, before these joined them.
                    for send in tx.sends:
                        send.fail(service, _close_reason(channel))

    def _declare_recent(self, channel: aiormq.Channel, key: str) -> list[bytes]:
        """Wire bytes of a no-wait declare and bind of the room's recent queue, unless this
        channel did that less than a quarter of ``recent_ttl`` ago (redeclaring renews the
        queue's ``x-expires`` lease; publishing alone does not). On the confirm channel, just
        before the frame: channel order makes the queue exist when the frame is routed."""
        if self._declared_channel is not channel:
            self._declared, self._declared_channel = {}, channel
        now = time.monotonic()
        renew = self._recent_ttl / 4
        last = self._declared.get(key)
        if last is not None and now - last < renew:
            return []
        if len(self._declared) >= 100_000:  # bounded: forget rooms not published lately
            self._declared = {k: t for k, t in self._declared.items() if now - t < renew}
        self._declared[key] = now
        arguments: dict[str, Any] = {
            # One more than the cache size: see recent() for why this keeps truncation honest.
            "x-max-length": self._recent_size + 1,
            "x-overflow": "drop-head",
            "x-expires": self._recent_ttl * 1000,
        }
        queue = amqp_name(self._namespace, "recent", key)
        return recent_queue_frames(
            channel.number, queue, self._data_x, recent_key(key).decode(), arguments
        )
