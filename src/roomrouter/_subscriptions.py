"""Dynamic subscription: the node is subscribed at the broker to exactly its rooms with members.

One record per room holds its reference count (local joins, finished or in flight) and its
readiness, and one reconciler task makes the broker match: rooms that gained their first
reference are subscribed, announced to the cluster and acknowledged by every live node (the
join barrier); rooms whose count fell to zero are unsubscribed once their linger expired.
Everything that piles up while one broker round trip is in flight goes into the next batch, so
a thousand joins cost a handful of SUBSCRIBE commands, not a thousand.

A room's states::

    (absent) --acquire--> queued --batch taken--> subscribing --subscribed, announced,
                                                                 barrier passed--> ready
    ready --last release--> ready, lingering --linger expired--> unsubscribing --done--> (absent)
    ready, lingering --acquire--> ready
    unsubscribing --acquire--> unsubscribing, wanted --done--> queued
    queued | subscribing --failure--> (absent): every waiting join fails

**Readiness is one state per room**: every acquire of a room that is not ``ready`` waits for the
same attempt, whichever member asked first, so no join returns before the cluster knows this node
hosts the room (docs/architecture.md, guarantee 2). All transitions are made synchronously, before
any ``await``, so a join that lands while an unsubscribe is on the wire is never mistaken for
"already subscribed", and an acquire is paired with exactly one release whatever races it.

The reconciler takes at most one batch of each kind per round, alternating, so neither a flood
of new rooms nor a flood of expiries starves the other. Lingering rooms expire in release
order (the linger is one duration for all), so each round finds its expired rooms in O(batch).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from enum import Enum

import anyio
import anyio.lowlevel

from ._errors import (
    BrokerError,
    BrokerUnavailable,
    RoomRouterError,
    RouterNotRunning,
    describe,
)
from ._stats import Stats
from .brokers._base import Broker

__all__ = ["SubscriptionManager"]

log = logging.getLogger("roomrouter.subscriptions")


class _State(Enum):
    QUEUED = "queued"
    SUBSCRIBING = "subscribing"
    READY = "ready"
    UNSUBSCRIBING = "unsubscribing"


class _Attempt:
    """One try at making a room ready; every join waiting for the room waits for it."""

    __slots__ = ("done", "error")

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.error: RoomRouterError | None = None


class _Room:
    __slots__ = ("attempt", "refs", "state")

    def __init__(self) -> None:
        self.refs = 0
        self.state = _State.QUEUED
        self.attempt: _Attempt | None = _Attempt()


class SubscriptionManager:
    """Reference counts and readiness per room, and the task that reconciles them with the
    broker and the cluster."""

    def __init__(
        self,
        broker: Broker,
        stats: Stats,
        *,
        linger: float,
        on_subscribed: Callable[[list[str]], Awaitable[None]],
        on_unsubscribing: Callable[[list[str]], Awaitable[None]],
        max_batch: int = 1000,
    ) -> None:
        self._broker = broker
        self._stats = stats
        self.linger = linger
        self._on_subscribed = on_subscribed
        self._on_unsubscribing = on_unsubscribing
        self._max_batch = max_batch
        self._rooms: dict[str, _Room] = {}
        self._queue: dict[str, None] = {}  # rooms to subscribe, in arrival order
        self._lingering: dict[str, float] = {}  # room -> deadline, in release order
        self._hosted: set[str] = set()  # broker-confirmed, not being unsubscribed
        self._unsubscribing: set[str] = set()
        self._wake = anyio.Event()
        self._closed: RoomRouterError | None = None

    @property
    def subscribed(self) -> frozenset[str]:
        """Rooms subscribed at the broker: confirmed ones (lingering included, and those still
        in their barrier) and those whose unsubscribe is still on the wire."""
        return frozenset(self._hosted | self._unsubscribing)

    def hosted(self) -> set[str]:
        """Rooms this node tells the cluster it hosts: broker-confirmed and not being
        unsubscribed. A room enters before its announcement goes out (a State sent meanwhile
        may name it: harmless, the node receives it) and leaves before its Unhost."""
        return self._hosted

    def refcount(self, room: str) -> int:
        record = self._rooms.get(room)
        return record.refs if record is not None else 0

    def is_ready(self, room: str) -> bool:
        record = self._rooms.get(room)
        return record is not None and record.state is _State.READY

    async def acquire(self, room: str) -> None:
        """Count one more local member of ``room``; return once the room is ready: subscribed at
        the broker, announced, and acknowledged by every live node.

        Raises :class:`BrokerUnavailable` (and counts nothing) if that failed. Cancelled while
        waiting, it counts nothing either. Always yields to the event loop at least once.
        """
        if self._closed is not None:
            raise self._closed
        record = self._rooms.get(room)
        if record is None:
            record = self._rooms[room] = _Room()
            self._queue[room] = None
            self._wake.set()
        record.refs += 1
        if record.state is _State.READY:
            self._lingering.pop(room, None)  # a join during the linger cancels the unsubscribe
            try:
                await anyio.lowlevel.checkpoint()
            except BaseException:
                self.release(room)
                raise
            return
        if record.attempt is None:  # unsubscribing: queued again when that is done
            record.attempt = _Attempt()
        attempt = record.attempt
        try:
            await attempt.done.wait()
        except BaseException:
            # Cancelled while waiting: give the count back, unless the attempt already failed
            # (a failure forgets the room's count itself). If the subscription still
            # completes, the room lingers out with no member.
            if attempt.error is None and self._rooms.get(room) is record:
                self.release(room)
            raise
        if attempt.error is not None:
            raise attempt.error

    def release(self, room: str) -> None:
        """Count one local member less; the last one starts the linger. Never blocks."""
        record = self._rooms.get(room)
        if record is None or record.refs <= 0:  # pragma: no cover - a pairing bug
            log.error("release of %r without a matching acquire", room)
            return
        record.refs -= 1
        if record.refs:
            return
        if record.state is _State.READY:
            self._lingering[room] = anyio.current_time() + self.linger
            self._wake.set()
        elif record.state is _State.QUEUED:
            del self._rooms[room]  # nobody waits for it any more
            self._queue.pop(room, None)
        # SUBSCRIBING: lingers out once ready. UNSUBSCRIBING: not queued again when done.

    async def run(self) -> None:
        """The reconciler. Never returns; never raises (failures go to the waiting joins)."""
        while True:
            timeout = math.inf
            if self._lingering:
                first = next(iter(self._lingering.values()))
                timeout = max(first - anyio.current_time(), 0.0)
            with anyio.move_on_after(timeout):
                await self._wake.wait()
            self._wake = anyio.Event()
            try:
                while True:
                    unsubscribed = await self._unsubscribe_expired()
                    subscribed = await self._subscribe_queued()
                    if not unsubscribed and not subscribed:
                        break
            except Exception:  # pragma: no cover - a bug; keep the node alive and say so
                self._stats.task_restarts += 1
                log.exception("subscription reconciler failed; continuing")
                await anyio.sleep(0.1)

    async def _subscribe_queued(self) -> bool:
        """Take one batch of queued rooms to ready (or fail it). False if none was queued."""
        if not self._queue:
            return False
        rooms: list[str] = []
        for room in self._queue:
            rooms.append(room)
            if len(rooms) >= self._max_batch:
                break
        records = []
        for room in rooms:
            del self._queue[room]
            record = self._rooms[room]
            record.state = _State.SUBSCRIBING
            records.append(record)
        error: RoomRouterError | None = None
        try:
            self._stats.subscribe_batches += 1
            await self._broker.subscribe(rooms)
        except RoomRouterError as exc:
            error = exc
        except Exception as exc:
            error = BrokerError(f"subscribe failed: {describe(exc)}")
            log.exception("broker.subscribe raised a foreign exception")
        if error is None:
            self._hosted.update(rooms)
            try:
                await self._on_subscribed(rooms)  # announce, and wait for the barrier
            except RoomRouterError as exc:
                # The announcement did not reach the cluster: other nodes would bypass the
                # broker for these rooms, so the joins must fail. Undo the subscription.
                error = exc
                self._hosted.difference_update(rooms)
                await self._quiet_unsubscribe(rooms)
        if error is not None:
            self._stats.subscribe_failures += 1
            if not isinstance(error, BrokerUnavailable):
                error = BrokerUnavailable(str(error))
            for room, record in zip(rooms, records, strict=True):
                del self._rooms[room]  # the waiting joins count nothing: forget the room
                self._finish(record, error)
            return True
        now = anyio.current_time()
        for room, record in zip(rooms, records, strict=True):
            record.state = _State.READY
            if not record.refs:  # every join of it was cancelled meanwhile
                self._lingering[room] = now + self.linger
            self._finish(record, None)
        return True

    async def _unsubscribe_expired(self) -> bool:
        """Unsubscribe one batch of rooms whose linger expired. False if none had."""
        now = anyio.current_time()
        rooms: list[str] = []
        for room, deadline in self._lingering.items():
            if deadline > now or len(rooms) >= self._max_batch:
                break
            rooms.append(room)
        if not rooms:
            return False
        for room in rooms:
            del self._lingering[room]
            self._rooms[room].state = _State.UNSUBSCRIBING
        self._hosted.difference_update(rooms)
        self._unsubscribing.update(rooms)
        try:
            self._stats.unsubscribe_batches += 1
            try:
                await self._on_unsubscribing(rooms)
            except RoomRouterError as exc:
                log.debug("unhost announcement failed: %s", exc)
            await self._quiet_unsubscribe(rooms)
        finally:
            self._unsubscribing.difference_update(rooms)
            for room in rooms:
                record = self._rooms[room]
                if record.refs:  # joined again while the unsubscribe was on the wire
                    record.state = _State.QUEUED
                    if record.attempt is None:
                        record.attempt = _Attempt()
                    self._queue[room] = None
                else:
                    del self._rooms[room]
        return True

    async def _quiet_unsubscribe(self, rooms: list[str]) -> None:
        try:
            await self._broker.unsubscribe(rooms)
        except RoomRouterError as exc:
            # The broker forgets the rooms either way (contract), so nothing is restored later.
            log.debug("unsubscribe failed (rooms forgotten anyway): %s", exc)

    @staticmethod
    def _finish(record: _Room, error: RoomRouterError | None) -> None:
        attempt, record.attempt = record.attempt, None
        if attempt is not None:
            attempt.error = error
            attempt.done.set()

    def close(self) -> None:
        """The router stops: joins still waiting fail with :class:`RouterNotRunning`, later
        ones too. (The reconciler is cancelled with the router's task group.)"""
        self._closed = RouterNotRunning("the router closed while the join was in progress")
        for record in self._rooms.values():
            self._finish(record, self._closed)
        self._lingering.clear()
