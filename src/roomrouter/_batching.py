"""Delivery batching: a room's envelopes reach a waiting member in one wake-up (issue 23).

Every envelope is still queued in each member's inbox at once, in order, with the overflow
policy applied per envelope (``Inbox.deliver``): what is batched is the *wake-up* of the members
waiting in ``receive()``. The first envelope of a room after a flush starts a timer of the
room's ``delivery_batch_delay``; the room's waiting members are woken when it fires, or at once
when ``delivery_batch_max`` envelopes were queued since, or when a member's inbox is full (the
next envelope would overflow it). A woken member then takes the whole batch from its inbox
without suspending again (``receive()``, ``async for`` and ``receive_batch()`` alike): one task
switch per member per batch instead of per envelope, which is what a big room spends its CPU on.

What a member sees is unchanged (docs/architecture.md, guarantees on order and exactness): the
same envelopes, in the same order; only a member already waiting sees them up to the delay
later. A member busy elsewhere finds them in its inbox as before. See docs/batching.md for the
figures behind the default delay.

The timer is the asyncio loop's (``call_later``); under another event loop (trio) there is no
timer and every delivery wakes at once, as with a delay of 0.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from ._errors import ConfigurationError

if TYPE_CHECKING:
    from ._envelope import Envelope
    from ._inbox import Inbox

__all__ = ["DEFAULT_BATCH_DELAY", "DEFAULT_BATCH_MAX", "Fanout", "check_batching"]

#: Seconds a room's first envelope may wait for others before its waiting members are woken
#: (``RoomRouter(delivery_batch_delay=)``). 0: off (every envelope wakes its waiters at once)
#: until figures taken on a quiet machine show a delay that pays for itself; see
#: docs/batching.md.
DEFAULT_BATCH_DELAY = 0.0
#: Most envelopes of a room queued before its waiting members are woken regardless of the delay.
DEFAULT_BATCH_MAX = 256


def check_batching(delay: float, max_batch: int) -> None:
    """Raise :class:`ConfigurationError` for a bad ``delivery_batch_delay`` / ``_max``."""
    if isinstance(delay, bool) or not isinstance(delay, int | float) or not 0 <= delay <= 60:
        raise ConfigurationError(f"delivery_batch_delay must be seconds in [0, 60]: {delay!r}")
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise ConfigurationError(f"delivery_batch_max must be an int >= 1: {max_batch!r}")


class Fanout:
    """Hands one envelope to a room's local inboxes and wakes their waiters per batch."""

    __slots__ = ("_delays", "_local", "_pending", "_timers", "delay", "max_batch")

    def __init__(self, local: dict[str, dict[str, Inbox]], delay: float, max_batch: int) -> None:
        check_batching(delay, max_batch)
        self._local = local  # room -> member id -> inbox (the join table's, never replaced)
        self.delay = float(delay)
        self.max_batch = max_batch
        self._delays: dict[str, float] = {}  # rooms with a delay of their own
        self._pending: dict[str, int] = {}  # room -> envelopes queued since its last flush
        self._timers: dict[str, asyncio.TimerHandle] = {}

    def set_delay(self, room: str, delay: float | None) -> None:
        if delay is None:
            self._delays.pop(room, None)
        else:
            check_batching(delay, self.max_batch)
            self._delays[room] = float(delay)

    def deliver(self, members: dict[str, Inbox], envelope: Envelope, skip: str | None) -> int:
        """Queue ``envelope`` in every inbox of ``members`` but ``skip``'s; how many took it."""
        room = envelope.room
        delay = self._delays.get(room, self.delay) if self._delays else self.delay
        delivered = 0
        # A copy: a delivery may close a member ("disconnect" policy), which edits the dict.
        if delay <= 0:
            for inbox in tuple(members.values()):
                if inbox.id != skip and inbox.deliver(envelope):
                    delivered += 1
            return delivered
        for inbox in tuple(members.values()):
            if inbox.id != skip and inbox.deliver(envelope, False):
                delivered += 1
        count = self._pending.get(room)
        if count is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # not asyncio: no timer, wake now
                self.flush(room)
                return delivered
            self._pending[room] = 1
            self._timers[room] = loop.call_later(delay, self._expire, room)
            count = 0
        if count + 1 >= self.max_batch:
            self.flush(room)
        else:
            self._pending[room] = count + 1
        return delivered

    def _expire(self, room: str) -> None:
        del self._timers[room]
        self._pending.pop(room, None)
        self._wake(room)

    def flush(self, room: str) -> None:
        """Wake ``room``'s waiting members now (its batch is complete)."""
        self._pending.pop(room, None)
        timer = self._timers.pop(room, None)
        if timer is not None:
            timer.cancel()
        self._wake(room)

    def _wake(self, room: str) -> None:
        members = self._local.get(room)
        if members:
            for inbox in tuple(members.values()):
                if inbox.waiters:
                    inbox.wake()

    def close(self) -> None:
        """Flush every pending batch (the router stops)."""
        for room in list(self._pending):
            self.flush(room)
