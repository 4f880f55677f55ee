"""The storage queue's consumer for storage workers (``RabbitMQBroker.storage_consumer``)."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING
from urllib.parse import quote

import anyio
from aiormq.abc import AbstractChannel, AbstractConnection, DeliveredMessage

from ..._errors import BrokerUnavailable, StorageQueueLost, describe
from .._base import StorageConsumer, StoredFrame
from ._common import (
    ERRORS,
    connect,
    declare_storage,
    quiet_close,
    really_cancelled,
    unreachable_at,
)
from ._names import amqp_name

if TYPE_CHECKING:
    from ._broker import RabbitMQBroker
    from ._common import Hosts

__all__ = ["StorageQueueConsumer"]


#: Seconds the management API may take to show the first figures of a queue, whatever the
#: statistics interval: measured on RabbitMQ 3.10 (a three-node cluster, interval 1 s), 5 s for
#: a new classic queue and 10 s for a new quorum queue; the storage queue is a quorum queue.
FIRST_FIGURES = 20.0


class StorageQueueConsumer(StorageConsumer):
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

    def __init__(self, broker: RabbitMQBroker, url: str | Hosts, namespace: str, name: str) -> None:
        self._broker = broker
        self._url = url
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
            await quiet_close(conn, self._broker.operation_timeout)

    async def _connect(self) -> None:
        broker = self._broker
        timeout = broker.operation_timeout
        conn = await connect(self._url, f"roomrouter worker {self._name}", timeout)
        try:
            with anyio.fail_after(timeout):
                channel = await conn.channel(publisher_confirms=False)
                await channel.basic_qos(prefetch_count=broker.storage_prefetch)
                await declare_storage(channel, self._exchange, self._queue)
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await quiet_close(conn, timeout)
            if isinstance(exc, (*ERRORS, asyncio.CancelledError)) and not really_cancelled():
                raise unreachable_at(self._url, exc) from exc
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
                await declare_storage(channel, self._exchange, self._queue)
        except (*ERRORS, asyncio.CancelledError) as exc:
            if really_cancelled():
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
                await quiet_close(conn, self._broker.operation_timeout)
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
            except (*ERRORS, asyncio.CancelledError) as exc:
                if really_cancelled():
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
        except ERRORS as exc:
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
            if elapsed > max(broker.stats_interval * 4, FIRST_FIGURES):
                raise BrokerUnavailable("the management API has no figures for the storage queue")
            await anyio.sleep(0.25)

    async def _declare_passive(self) -> tuple[int, int]:
        channel = await self._channel()
        try:
            with anyio.fail_after(self._broker.operation_timeout):
                ok = await channel.queue_declare(self._queue, passive=True)
        except (*ERRORS, asyncio.CancelledError) as exc:
            if really_cancelled():
                raise
            raise BrokerUnavailable(f"cannot inspect the storage queue: {describe(exc)}") from exc
        return int(ok.message_count or 0), int(ok.consumer_count or 0)
