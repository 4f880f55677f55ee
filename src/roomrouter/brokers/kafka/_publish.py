"""The Kafka node's publish path on the transport core (:class:`~..transport.Outbox`).

:meth:`Publisher.submit` appends to the outbox before the caller's first ``await`` (call order
is send order) and returns the future the caller waits on. One sender task moves the queue's
head into one producer batch per partition (``create_batch``/``send_batch``: the per-record
``send()`` costs a coroutine, a future and metadata lookups, most of the publisher's CPU) and
hands them on without awaiting answers, so many publishes share a request; one done callback
per batch settles its publishes.

The settle rule (docs/architecture.md, guarantees 3 and 4) as Kafka meets it: a record is
*sent* exactly when the producer took its batch (``send_batch`` returned). Until then a
failure, or its deadline while it is queued or waits to be handed on, makes it "not sent", and
it is never handed on afterwards. From then on the producer's answer settles it; the loss of
the session (:meth:`Publisher.detach`) or the outbox's watchdog at the deadline makes it
"outcome unknown".

Bound: at most ``max_pending`` records (default 10 000) are handed on and unanswered; beyond
that the queue waits and its callers stay suspended (backpressure by awaiting, in call
order), each at most the operation timeout.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any, NamedTuple

import anyio
from aiokafka.errors import KafkaError, KafkaTimeoutError, ProducerClosed

from ..._errors import BrokerUnavailable, describe
from ..transport import Outbox, Send
from ._common import ERRORS, STORED_HEADERS, partition

__all__ = ["Publisher", "Record"]

#: Publishes taken from the queue at a time while a round fills its producer batches.
_CHUNK = 256


class Record(NamedTuple):
    """What one publish sends: a record of the control or the data topic."""

    control: bool
    key: bytes
    value: bytes
    stored: bool  # also a storage-queue record (carries STORED_HEADERS)


class Publisher:
    """A node's publish path (see the module docstring); one for the node's life, sending
    through the producer of the current session (:meth:`attach`)."""

    def __init__(
        self, service: str, timeout: float, max_pending: int, data_topic: str, control_topic: str
    ) -> None:
        self.outbox: Outbox[Record] = Outbox(service, timeout, errors=ERRORS)
        #: The bound on records handed to the producer and not answered (backpressure).
        self.max_pending = max_pending
        #: Records of the current producer handed on and not answered yet.
        self.unacked = 0
        self._topics = (data_topic, control_topic)
        self._producer: Any = None
        self._partitions = 1
        self._epoch = 0  # counts producers: answers of an older one do not count
        self._waiting = False
        self._wake = anyio.Event()

    def submit(self, record: Record) -> asyncio.Future[Any]:
        """Queue ``record``; no ``await``. A cancelled caller cancels the future: the sender
        then skips the record, or, once handed on, its answer is ignored."""
        return self.outbox.submit(record)

    def attach(self, producer: Any, partitions: int) -> None:
        """Send through ``producer`` (of a new session) from now on."""
        self._producer, self._partitions = producer, partitions
        self._epoch += 1
        self.unacked = 0
        self._wake_sender()

    def detach(self, reason: str) -> None:
        """The session is lost: stop sending, and the records it had will never be answered
        through it ("outcome unknown")."""
        self._producer = None
        self.outbox.fail_in_flight(reason)

    def _wake_sender(self) -> None:
        if self._waiting:
            self._waiting = False
            self._wake.set()

    async def run(self) -> None:
        """The sender and the outbox's deadline watchdog, until cancelled (which settles every
        publish left)."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self.outbox.watch)
            tg.start_soon(self._send_loop)

    async def _send_loop(self) -> None:
        """Hand queued records to the producer, many per round, without awaiting answers.

        Order: one task hands records in queue order, and the producer keeps one partition's
        records in that order. Bound: at most ``max_pending`` handed and unanswered; beyond
        that the queue waits (backpressure: the callers stay suspended, in call order)."""
        outbox = self.outbox
        while True:
            producer = self._producer
            room = self.max_pending - self.unacked
            if producer is None or room <= 0:
                # The watchdog fails what expires meanwhile; attach() or an answer wakes us.
                self._waiting = True
                self._wake = anyio.Event()
                await self._wake.wait()
                continue
            try:
                sends = await outbox.take(limit=min(room, _CHUNK))
            except BrokerUnavailable:  # the outbox is closed: nothing more to send
                return
            if self._producer is not producer:  # the session went while the queue was empty
                outbox.requeue(sends)
                continue
            await self._round(producer, sends, room)

    async def _round(self, producer: Any, sends: list[Send[Record]], room: int) -> None:
        """Move ``sends`` (and more from the queue's head) into one producer batch per
        partition and hand those on, without awaiting the answers; one done callback per batch
        settles its publishes. The producer builds batches itself too, but its ``send()``
        costs a coroutine, a future and metadata lookups per record -- most of the
        publisher's time.

        Handing a batch waits when the partition already has one waiting to go (the producer
        keeps one per partition, behind the one in flight); the round's deadline (its first
        record's) bounds that wait, and what was not handed by then is "not sent"."""
        outbox = self.outbox
        partitions = self._partitions
        now = asyncio.get_running_loop().time()
        batches: dict[int, tuple[Any, list[Send[Record]]]] = {}  # partition -> (builder, sends)
        taken: list[Send[Record]] = []
        # Fill: synchronous, so nothing joins the queue's head meanwhile. Stops at a full
        # batch (the rest goes back to the head for the next round) or at the bound.
        while sends:
            for i, send in enumerate(sends):
                if send.future.done():  # the caller gave up
                    continue
                if send.deadline <= now:  # too late: it would be handed on past its deadline
                    send.fail(outbox.service, f"not taken within {outbox.timeout} s")
                    continue
                item = send.item
                part = -1 if item.control else partition(item.key, partitions)
                entry = batches.get(part)
                if entry is None:
                    entry = batches[part] = (producer.create_batch(), [])
                headers = STORED_HEADERS if item.stored else None
                if (
                    entry[0].append(timestamp=None, key=item.key, value=item.value, headers=headers)
                    is None
                ):  # full (a first record always fits)
                    outbox.requeue(sends[i:])
                    sends = []
                    break
                entry[1].append(send)
                taken.append(send)
            else:
                more = room - len(taken)
                sends = outbox.take_nowait(min(more, _CHUNK)) if more > 0 else []
        if not taken:
            return
        epoch = self._epoch
        async with outbox.transmit(taken) as tx:
            for part, (builder, part_sends) in batches.items():
                topic = self._topics[part < 0]
                try:
                    future = await producer.send_batch(builder, topic, partition=max(part, 0))
                except ERRORS as exc:  # the producer did not take it
                    for send in part_sends:
                        send.fail(outbox.service, describe(exc))
                    continue
                # Handed on (no await since send_batch returned): from now on each may
                # reach the broker.
                live = tx.sent(part_sends)
                self.unacked += len(part_sends)
                future.add_done_callback(
                    functools.partial(self._answered, epoch, len(part_sends), live)
                )

    def _answered(
        self, epoch: int, count: int, sends: list[Send[Record]], future: asyncio.Future[Any]
    ) -> None:
        """Settle the publishes of one producer batch from its answer."""
        if epoch == self._epoch:
            self.unacked -= count
            if self._waiting and self.unacked < self.max_pending:
                self._wake_sender()
        if future.cancelled():
            for send in sends:
                send.fail(self.outbox.service, "the producer dropped the record")
        elif (exc := future.exception()) is not None:  # retrieving it also silences asyncio
            if _refused(exc):
                error = BrokerUnavailable(
                    f"{self.outbox.service} refused the record: {describe(exc)}"
                )
                for send in sends:
                    send.refuse(error)
            else:
                reason = f"no acknowledgement ({describe(exc)})"
                for send in sends:
                    send.fail(self.outbox.service, reason)
        else:
            for send in sends:
                send.resolve()


def _refused(exc: BaseException) -> bool:
    """True if the producer's error says the broker did not append the record: a definite,
    non-retriable answer from it. Timeouts, lost connections and a producer stopped with the
    record in flight leave the outcome open."""
    return (
        isinstance(exc, KafkaError)
        and not exc.retriable
        and not isinstance(exc, (KafkaTimeoutError, ProducerClosed))
    )
