"""Dynamic subscription: the node is subscribed at the broker to exactly its rooms with members.

A reference count per room (local members) drives one reconciler task that makes the broker's
subscriptions match: rooms that gained their first member are subscribed, rooms that lost their
last member are unsubscribed once their linger expired and the count is still zero. Everything
that piles up while one broker round trip is in flight goes into the next batch, so a thousand
joins cost a handful of SUBSCRIBE commands, not a thousand.

State of a room, as seen from here::

    (absent) --acquire--> pending --subscribed+announced--> subscribed
    subscribed --last release--> lingering (still subscribed) --linger expired--> unsubscribing
    lingering --acquire--> subscribed              unsubscribing --done--> (absent)
    unsubscribing --acquire--> pending (queued behind the unsubscribe)

The transitions are made synchronously before any ``await``, so a join that lands while an
unsubscribe is on the wire is never mistaken for "already subscribed".
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import anyio

from ._errors import BrokerError, BrokerUnavailable, RoomRouterError
from ._stats import Stats
from .brokers._base import Broker

__all__ = ["SubscriptionManager"]

log = logging.getLogger("roomrouter.subscriptions")


@dataclass(slots=True)
class _Waiter:
    done: anyio.Event = field(default_factory=anyio.Event)
    error: RoomRouterError | None = None


class SubscriptionManager:
    """Reference counts per room and the task that reconciles them with the broker."""

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
        self._refs: dict[str, int] = {}
        self._subscribed: set[str] = set()
        self._pending: dict[str, _Waiter] = {}
        self._unsubscribing: set[str] = set()
        self._deadlines: dict[str, float] = {}
        self._wake = anyio.Event()

    @property
    def subscribed(self) -> frozenset[str]:
        """Rooms subscribed at the broker: confirmed ones (lingering included) and those whose
        unsubscribe is still on the wire."""
        return frozenset(self._subscribed | self._unsubscribing)

    def hosted(self) -> set[str]:
        """Rooms this node announces to the cluster: subscribed ones."""
        return self._subscribed

    def refcount(self, room: str) -> int:
        return self._refs.get(room, 0)

    async def acquire(self, room: str) -> None:
        """Count one more local member of ``room``; return once the node is subscribed to it.

        Raises :class:`BrokerUnavailable` (and counts nothing) if the subscription failed.
        """
        self._refs[room] = self._refs.get(room, 0) + 1
        if room in self._subscribed:
            self._deadlines.pop(room, None)  # a join during the linger cancels the unsubscribe
            return
        waiter = self._pending.get(room)
        if waiter is None:
            waiter = self._pending[room] = _Waiter()
            self._wake.set()
        try:
            await waiter.done.wait()
        except BaseException:
            # Cancelled while waiting: give the count back. If the subscription still completes,
            # the reconciler sees a room with no members and lets it linger out.
            self._drop_ref(room)
            raise
        if waiter.error is not None:
            self._drop_ref(room)
            raise waiter.error

    def release(self, room: str) -> None:
        """Count one local member less; the last one starts the linger. Never blocks."""
        if self._drop_ref(room) == 0 and room in self._subscribed:
            self._deadlines[room] = anyio.current_time() + self.linger
            self._wake.set()

    def _drop_ref(self, room: str) -> int:
        count = self._refs.get(room, 0) - 1
        if count > 0:
            self._refs[room] = count
        else:
            self._refs.pop(room, None)
            count = 0
        return count

    async def run(self) -> None:
        """The reconciler. Never returns; never raises (failures go to the waiting joins)."""
        while True:
            timeout = math.inf
            if self._deadlines:
                timeout = max(min(self._deadlines.values()) - anyio.current_time(), 0.0)
            with anyio.move_on_after(timeout):
                await self._wake.wait()
            self._wake = anyio.Event()
            try:
                await self._unsubscribe_expired()
                await self._subscribe_pending()
            except Exception:  # pragma: no cover - a bug; keep the node alive and say so
                self._stats.task_restarts += 1
                log.exception("subscription reconciler failed; continuing")
                await anyio.sleep(0.1)

    async def _subscribe_pending(self) -> None:
        while self._pending:
            rooms = [r for r in self._pending if r not in self._unsubscribing][: self._max_batch]
            if not rooms:
                return
            waiters = [self._pending.pop(r) for r in rooms]
            error: RoomRouterError | None = None
            try:
                self._stats.subscribe_batches += 1
                await self._broker.subscribe(rooms)
            except RoomRouterError as exc:
                error = exc
            except Exception as exc:
                error = BrokerError(f"subscribe failed: {exc!r}")
                log.exception("broker.subscribe raised a foreign exception")
            if error is None:
                self._subscribed.update(rooms)
                now = anyio.current_time()
                for room in rooms:
                    if room not in self._refs:  # every join of it was cancelled meanwhile
                        self._deadlines[room] = now + self.linger
                try:
                    await self._on_subscribed(rooms)
                except RoomRouterError as exc:
                    # The announcement did not reach the cluster: other nodes would bypass the
                    # broker for these rooms, so the joins must fail. Undo the subscription.
                    error = exc
                    self._subscribed.difference_update(rooms)
                    await self._quiet_unsubscribe(rooms)
            if error is not None:
                self._stats.subscribe_failures += 1
                if not isinstance(error, BrokerUnavailable):
                    error = BrokerUnavailable(str(error))
            for waiter in waiters:
                waiter.error = error
                waiter.done.set()

    async def _unsubscribe_expired(self) -> None:
        now = anyio.current_time()
        expired = [r for r, t in self._deadlines.items() if t <= now]
        for room in expired:
            del self._deadlines[room]
        rooms = [r for r in expired if r not in self._refs and r in self._subscribed]
        if not rooms:
            return
        self._subscribed.difference_update(rooms)
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
            if any(r in self._pending for r in rooms):
                self._wake.set()

    async def _quiet_unsubscribe(self, rooms: list[str]) -> None:
        try:
            await self._broker.unsubscribe(rooms)
        except RoomRouterError as exc:
            # The broker forgets the rooms either way (contract), so nothing is restored later.
            log.debug("unsubscribe failed (rooms forgotten anyway): %s", exc)

    def unsubscribe_all_now(self) -> list[str]:
        """Forget every lingering room at once (used on close); returns what was subscribed."""
        rooms = list(self._subscribed)
        self._deadlines.clear()
        return rooms
