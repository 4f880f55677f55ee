"""The transport core every broker backend shares: the publish queue with its settle rule,
capped backoff, and the reconnect template.

A backend is then its protocol only: how to pack publishes, write them and read the answers,
how to connect and what to restore. What the router may tell its caller about a publish is
decided here, once, for every backend (docs/architecture.md, guarantees 3 and 4):

* **Order.** :meth:`Outbox.submit` is synchronous: a publish takes its place in the queue
  before its caller's first ``await``, so call order is send order.
* **Bound.** Every publish has a deadline, ``timeout`` seconds after it was submitted; no
  caller waits past it.
* **Settle rule.** A publish that fails is reported as :class:`~roomrouter.BrokerUnavailable`
  ("not sent") only while none of its bytes can have reached the broker, and as
  :class:`~roomrouter.PublishOutcomeUnknown` once they may have: a caller that retries a
  "not sent" publish never duplicates it, and one told "outcome unknown" knows a retry may.

The life of one publish (a :class:`Send`)::

    submit() -> queued --take()--> taken --Transmit.sent()--> sent --(answer)--> settled
                  |                   |                         |
                  deadline: not sent  error/deadline: not sent  error/deadline: outcome unknown

A backend's sender task takes a batch with :meth:`Outbox.take` and transmits it inside
:meth:`Outbox.transmit`::

    async with outbox.transmit(batch) as tx:   # bounded by the batch's first deadline
        conn = await self._connection()        # a failure here: every publish "not sent"
        payload = b"".join(s.item for s in tx.sent())   # sync: from here on "outcome unknown"
        await conn.write(payload)
        for send in tx.sends:
            send.resolve(await conn.read_reply())

A publish the backend leaves unanswered when the block ends (RabbitMQ and Kafka confirm
asynchronously) stays *in flight*: the backend settles it later (:meth:`Send.resolve` /
:meth:`Send.refuse`) or :meth:`Outbox.fail_in_flight` does when the connection is lost, and
:meth:`Outbox.watch` fails it as "outcome unknown" at its deadline.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Any, Final, Generic, NoReturn, TypeVar

import anyio

from .._errors import BrokerError, BrokerUnavailable, PublishOutcomeUnknown

__all__ = [
    "Backoff",
    "Outbox",
    "Send",
    "Transmit",
    "keep_connected",
    "not_sent",
    "outcome_unknown",
]

log = logging.getLogger("roomrouter.transport")

T = TypeVar("T")
C = TypeVar("C")

_QUEUED: Final = 0
_TAKEN: Final = 1
_SENT: Final = 2


def not_sent(service: str, reason: str) -> BrokerUnavailable:
    """The error of a publish none of whose bytes can have reached ``service``."""
    return BrokerUnavailable(f"{service}: {reason}; it was not sent")


def outcome_unknown(service: str, reason: str) -> PublishOutcomeUnknown:
    """The error of a publish whose bytes may have reached ``service``, without an answer."""
    return PublishOutcomeUnknown(f"{service}: {reason}; it was sent, so it may have been published")


class Send(Generic[T]):
    """One publish in an :class:`Outbox`: the backend's ``item`` (what to send) and the
    caller's future. A backend settles it with :meth:`resolve` or :meth:`refuse`."""

    __slots__ = ("deadline", "future", "item", "state")

    def __init__(self, item: T, future: asyncio.Future[Any], deadline: float) -> None:
        self.item = item
        self.future = future
        self.deadline = deadline
        self.state = _QUEUED

    @property
    def done(self) -> bool:
        """Settled, or given up by its caller (cancelled)."""
        return self.future.done()

    @property
    def sent(self) -> bool:
        """Its bytes may have reached the broker."""
        return self.state == _SENT

    def resolve(self, value: Any = None) -> None:
        """The broker accepted it; the caller's ``await`` returns ``value``."""
        if not self.future.done():
            self.future.set_result(value)

    def refuse(self, error: BrokerError) -> None:
        """The broker answered and refused it: ``error`` is the caller's, whatever the state
        (an answer is never ambiguous)."""
        if not self.future.done():
            self.future.set_exception(error)

    def fail(self, service: str, reason: str) -> None:
        """No answer: "not sent" or "outcome unknown" by the settle rule."""
        if not self.future.done():
            make = outcome_unknown if self.state == _SENT else not_sent
            self.future.set_exception(make(service, reason))


class Transmit(Generic[T]):
    """One batch being transmitted; see :meth:`Outbox.transmit`."""

    __slots__ = ("_outbox", "sends")

    def __init__(self, outbox: Outbox[T], sends: list[Send[T]]) -> None:
        self._outbox = outbox
        self.sends = sends

    def sent(self, part: Iterable[Send[T]] | None = None) -> list[Send[T]]:
        """Mark the batch's publishes as possibly reaching the broker from now on, and return
        them. Publishes given up meanwhile (cancelled callers, expired deadlines) are dropped
        from the batch first: pack what is returned, synchronously, before the next
        ``await``, and nothing that was reported "not sent" is ever sent.

        ``part``: mark only these publishes of the batch, for a backend that hands one batch
        over in several steps (Kafka: one producer batch per partition, each hand-over an
        ``await``); the others stay "not sent" until marked. Call it as soon as the step
        returned (no ``await`` between): the publishes are then in the client's hands."""
        if part is not None:
            marked = [s for s in part if not s.future.done()]
            for send in marked:
                send.state = _SENT
            return marked
        live = [s for s in self.sends if not s.future.done()]
        for send in live:
            send.state = _SENT
        self.sends = live
        return live

    def release(self, send: Send[T]) -> None:
        """The broker answered ``send`` without running it (a Redis Cluster ``MOVED``/``ASK``
        redirection): it leaves this batch unsettled and counts as not sent again, for the
        backend to queue anew with :meth:`Outbox.requeue`, on this outbox or another one (the
        lane the answer names), with its caller and deadline."""
        self.sends = [s for s in self.sends if s is not send]  # the list sent() returned stays
        send.state = _QUEUED


class Outbox(Generic[T]):
    """A backend's publish queue (see the module docstring). One per connection, or per lane
    (a Redis Cluster shard): order holds within one outbox.

    ``service`` names the broker in errors ("Redis", "RabbitMQ at 127.0.0.1:5672").
    ``timeout``: the deadline of each publish, in seconds after :meth:`submit`.
    ``errors``: the client library's exceptions that mean a failed connection or write; inside
    :meth:`transmit` they settle the batch and are not re-raised (the block's ``error`` says).
    """

    def __init__(
        self, service: str, timeout: float, *, errors: tuple[type[BaseException], ...] = ()
    ) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self.service = service
        self.timeout = timeout
        self.errors: tuple[type[BaseException], ...] = (*errors, BrokerError, OSError, TimeoutError)
        self._queue: deque[Send[T]] = deque()
        self._in_flight: deque[Send[T]] = deque()
        self._closed: str | None = None
        self._wake: asyncio.Event | None = None
        self._watch_wake: asyncio.Event | None = None

    def __len__(self) -> int:
        """Publishes queued and not yet taken."""
        return len(self._queue)

    @property
    def in_flight(self) -> int:
        """Publishes sent and not settled."""
        return sum(1 for s in self._in_flight if not s.future.done())

    # -- the caller's side ----------------------------------------------------------------

    def submit(self, item: T) -> asyncio.Future[Any]:
        """Queue ``item``; no ``await``. The returned future settles with the answer or with
        the settle rule's error (it is never left pending past the deadline while
        :meth:`watch` runs)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if self._closed is not None:
            future.set_exception(not_sent(self.service, self._closed))
            return future
        self._queue.append(Send(item, future, loop.time() + self.timeout))
        if self._wake is not None:
            self._wake.set()
        if self._watch_wake is not None:
            self._watch_wake.set()
        return future

    # -- the sender's side ----------------------------------------------------------------

    async def take(self, limit: int | None = None) -> list[Send[T]]:
        """The queued publishes (at most ``limit``), oldest first; waits for one. Publishes
        whose callers gave up are skipped. Raises :class:`~roomrouter.BrokerUnavailable` once
        the outbox is closed and empty: the sender's loop ends there."""
        queue = self._queue
        while True:
            while queue and queue[0].future.done():
                queue.popleft()
            if queue:
                break
            if self._closed is not None:
                raise BrokerUnavailable(f"{self.service}: {self._closed}")
            self._wake = asyncio.Event()
            try:
                await self._wake.wait()
            finally:
                self._wake = None
        count = len(queue) if limit is None else min(limit, len(queue))
        batch: list[Send[T]] = []
        for _ in range(count):
            send = queue.popleft()
            if not send.future.done():
                send.state = _TAKEN
                batch.append(send)
        return batch

    def take_nowait(self, limit: int | None = None) -> list[Send[T]]:
        """Like :meth:`take` without waiting: the queued publishes (at most ``limit``) whose
        callers still wait, oldest first; empty if there are none (also when closed)."""
        queue = self._queue
        batch: list[Send[T]] = []
        while queue and (limit is None or len(batch) < limit):
            send = queue.popleft()
            if not send.future.done():
                send.state = _TAKEN
                batch.append(send)
        return batch

    def requeue(self, sends: Sequence[Send[T]]) -> None:
        """Put taken publishes back at the head of the queue, in order (a lane that lost its
        shard hands them on; publishes released by :meth:`Transmit.release` may come from
        another outbox); sent ones may not be requeued. One given up or past its deadline
        meanwhile is settled here, never sent."""
        if self._closed is not None:
            self._settle(sends, self._closed)
            return
        now = asyncio.get_running_loop().time()
        for send in reversed(sends):
            if send.state == _SENT:
                raise ValueError("a sent publish cannot be requeued")
            if send.deadline <= now:
                send.fail(self.service, f"not taken within {self.timeout} s")
                continue
            send.state = _QUEUED
            self._queue.appendleft(send)
        if self._wake is not None:
            self._wake.set()
        if self._watch_wake is not None:
            self._watch_wake.set()

    @asynccontextmanager
    async def transmit(self, sends: list[Send[T]]) -> AsyncIterator[Transmit[T]]:
        """Transmit a batch from :meth:`take`, within its earliest deadline.

        An error from ``errors`` (or the deadline) settles every publish the block did not:
        "not sent" before :meth:`Transmit.sent`, "outcome unknown" after; it is logged at
        debug level and not re-raised. Cancellation settles them the same way and
        propagates. Publishes sent and unanswered when the block ends normally stay in
        flight (see :meth:`watch`)."""
        tx = Transmit(self, sends)
        if not sends:
            yield tx
            return
        loop = asyncio.get_running_loop()
        reason = "the connection failed"
        try:
            with anyio.fail_after(max(min(s.deadline for s in sends) - loop.time(), 0)):
                yield tx
        except self.errors as exc:
            reason = _describe(exc, self.timeout)
            log.debug("%s: a batch of %d failed: %s", self.service, len(tx.sends), reason)
            self._settle(tx.sends, reason)
            return
        except BaseException:
            self._settle(tx.sends, "the publisher stopped")
            raise
        in_flight = self._in_flight
        while in_flight and in_flight[0].future.done():  # answered meanwhile: let them go
            in_flight.popleft()
        for send in tx.sends:
            if send.future.done():
                continue
            if send.state == _SENT:
                in_flight.append(send)
            else:  # taken and never sent: the backend dropped it
                send.fail(self.service, "the backend did not send it")
        if self._in_flight and self._watch_wake is not None:
            self._watch_wake.set()

    def _settle(self, sends: Iterable[Send[T]], reason: str) -> None:
        for send in sends:
            send.fail(self.service, reason)

    def fail_in_flight(self, reason: str) -> None:
        """The connection that carried the in-flight publishes is gone: their answers will
        never come ("outcome unknown")."""
        in_flight = list(self._in_flight)
        self._in_flight.clear()
        self._settle(in_flight, reason)

    def fail_queued(self, reason: str) -> None:
        """Fail every queued publish as "not sent" (a backend that cannot send them)."""
        queue = list(self._queue)
        self._queue.clear()
        self._settle(queue, reason)

    def close(self, reason: str = "the broker is closed") -> None:
        """Refuse new publishes and settle every queued and in-flight one."""
        self._closed = reason
        self.fail_queued(reason)
        self.fail_in_flight(reason)
        if self._wake is not None:
            self._wake.set()

    async def watch(self) -> NoReturn:
        """Fail publishes past their deadline: queued ones as "not sent", in-flight ones as
        "outcome unknown" (taken ones are bounded by :meth:`transmit`). One timer for all:
        deadlines grow along both queues, so their heads say when to look next. Run it as a
        background task for the outbox's life; cancelling it settles everything left."""
        queue, in_flight = self._queue, self._in_flight
        try:
            while True:
                now = asyncio.get_running_loop().time()
                while queue and (queue[0].future.done() or queue[0].deadline <= now):
                    queue.popleft().fail(self.service, f"not taken within {self.timeout} s")
                while in_flight and (in_flight[0].future.done() or in_flight[0].deadline <= now):
                    in_flight.popleft().fail(self.service, f"no answer within {self.timeout} s")
                heads = [q[0].deadline for q in (queue, in_flight) if q]
                if heads:
                    await anyio.sleep(max(min(heads) - now, 0.001))
                    continue
                self._watch_wake = asyncio.Event()
                try:
                    await self._watch_wake.wait()
                finally:
                    self._watch_wake = None
        finally:
            self.close("the broker stopped")


def _describe(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout} s"
    if isinstance(exc, BrokerError):
        return str(exc)
    text = str(exc) or type(exc).__name__
    return text[0].lower() + text[1:] if text else text


class Backoff:
    """Capped exponential backoff with jitter: ``initial``, then ``factor`` times the previous
    delay up to ``cap``, each shortened by up to ``jitter`` (a fraction) so that nodes that
    lost the same broker at the same moment do not come back in step. :meth:`reset` after a
    success."""

    __slots__ = ("_next", "cap", "factor", "initial", "jitter")

    def __init__(
        self, initial: float = 0.05, cap: float = 5.0, *, factor: float = 2.0, jitter: float = 0.2
    ) -> None:
        if initial <= 0 or cap < initial or factor < 1 or not 0 <= jitter < 1:
            raise ValueError("need 0 < initial <= cap, factor >= 1 and 0 <= jitter < 1")
        self.initial = initial
        self.cap = cap
        self.factor = factor
        self.jitter = jitter
        self._next = initial

    def next(self) -> float:
        """The next delay, in seconds."""
        delay = self._next
        self._next = min(delay * self.factor, self.cap)
        return delay * (1 - self.jitter * random.random())

    def reset(self) -> None:
        self._next = self.initial

    async def sleep(self) -> float:
        """Sleep the next delay; returns it."""
        delay = self.next()
        await anyio.sleep(delay)
        return delay


async def keep_connected(
    connect: Callable[[], Awaitable[C]],
    serve: Callable[[C], Awaitable[object]],
    *,
    restore: Callable[[C], Awaitable[object]] | None = None,
    on_restored: Callable[[], object] | None = None,
    backoff: Backoff | None = None,
    what: str = "connection",
    errors: tuple[type[BaseException], ...] = (),
    stable_after: float | None = None,
) -> NoReturn:
    """The reconnect template: connect, restore what is held, tell the router, serve until
    the connection is lost; after a failure, back off and start again. Runs until cancelled.

    ``connect()`` returns a live connection; ``restore(conn)`` re-establishes what the backend
    holds (subscriptions, bindings); ``on_restored()`` is called after every restore but the
    first (the router then resynchronises: ``context.on_reconnect``); ``serve(conn)`` returns
    or raises when the connection is lost. Failures are errors from ``errors`` (plus
    :class:`~roomrouter.BrokerError`, ``OSError`` and ``TimeoutError``): logged at warning
    level once per outage (later attempts at debug level), never raised.

    ``stable_after``: reset the backoff only after a connection served that many seconds
    (default: as soon as one is established and restored). A broker that accepts
    connections and then drops each at once (or refuses the restore's writes) then meets a
    growing delay instead of a reconnect storm.
    """
    backoff = backoff or Backoff()
    caught: tuple[type[BaseException], ...] = (*errors, BrokerError, OSError, TimeoutError)
    first, failing = True, False
    while True:
        try:
            conn = await connect()
            if restore is not None:
                await restore(conn)
        except caught as exc:
            delay = backoff.next()
            level = logging.DEBUG if failing else logging.WARNING
            log.log(level, "%s: %s; retrying in %.2f s", what, _describe(exc, 0), delay)
            failing = True
            await anyio.sleep(delay)
            continue
        if failing:
            log.warning("%s: restored", what)
        if stable_after is None:
            backoff.reset()
        failing = False
        if not first and on_restored is not None:
            on_restored()
        first = False
        began = anyio.current_time()
        try:
            await serve(conn)
            log.warning("%s: lost", what)
        except caught as exc:
            log.warning("%s: lost (%s)", what, _describe(exc, 0))
        if stable_after is not None and anyio.current_time() - began >= stable_after:
            backoff.reset()
        failing = True
        await anyio.sleep(backoff.next())
