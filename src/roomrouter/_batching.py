"""Delivery batching: a room's envelopes reach each member in one wake-up (issue 23).

With a room's ``delivery_batch_delay`` above 0, an envelope is not queued in the members'
inboxes when it is published or arrives from the broker: it joins the room's *batch*, and the
first envelope of a batch starts a timer of the delay. When the timer fires (or at once when
``delivery_batch_max`` envelopes are in the batch), the batch is *flushed*: every member of the
room gets the whole batch in one step (one ``deque.extend`` when it fits the inbox, the
overflow policy per envelope when not) and a waiting member is woken once. So a node pays
per member per *batch* what it paid per member per *envelope* before (the inbox call and the
task switch), and the publisher or the broker reader pays one list append per envelope
instead of one inbox call per member.

Exactness (docs/architecture.md, guarantees 1-3) does not move with the flush: the members a
batch goes to are the room's members when its envelopes were published or received, because
every change of the room's membership, and every change of a member's recovery state for the
room, *settles* the room first (:meth:`Fanout.settle`, called by the join table and the gap
recovery before they change anything): a member that joins after a publish never gets it, one
that leaves or closes after it does, and a recovery's hold, merge and overlap see the same
sequence as without batching. Order per room is the batch's order. What changes is when: a
member sees an envelope up to the delay later, and :meth:`~roomrouter.Member.pending` does
not count a batch not flushed yet. See docs/batching.md for the figures and the default.

The timer is the asyncio loop's (``call_later``), set :data:`TIMER_SLACK` short of the delay:
the loop's timers fire late by up to a millisecond (epoll, and libuv under uvloop, wait in whole
milliseconds, rounded up), and the delay is a bound on the wait, as Centrifugo's
``batch_max_delay`` is, not a minimum. Under another event loop (trio) there is no timer and
every envelope is queued at once, as with a delay of 0.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from ._errors import ConfigurationError

if TYPE_CHECKING:
    from ._envelope import Envelope
    from ._inbox import Inbox
    from ._stats import Stats

__all__ = [
    "DEFAULT_BATCH_DELAY",
    "DEFAULT_BATCH_MAX",
    "TIMER_SLACK",
    "Fanout",
    "check_batching",
]

#: Seconds a room's first envelope may wait for others before the batch reaches the room's
#: members (``RoomRouter(delivery_batch_delay=)``). 0: off (every envelope is queued and wakes
#: its waiters at once); see docs/batching.md for the figures behind it.
DEFAULT_BATCH_DELAY = 0.0
#: How much earlier than the delay a batch's timer is set (see above); never more than half of it.
TIMER_SLACK = 0.001
#: Most envelopes of a room in one batch: a full batch is flushed without waiting for the delay.
DEFAULT_BATCH_MAX = 256


def check_batching(delay: float, max_batch: int) -> None:
    """Raise :class:`ConfigurationError` for a bad ``delivery_batch_delay`` / ``_max``."""
    if isinstance(delay, bool) or not isinstance(delay, int | float) or not 0 <= delay <= 60:
        raise ConfigurationError(f"delivery_batch_delay must be seconds in [0, 60]: {delay!r}")
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise ConfigurationError(f"delivery_batch_max must be an int >= 1: {max_batch!r}")


class _Batch:
    """A room's envelopes waiting for the flush, with the member each one skips (``exclude``)."""

    __slots__ = ("envelopes", "size", "skipped", "skips", "timer")

    def __init__(self, envelope: Envelope, skip: str | None) -> None:
        self.envelopes = [envelope]
        self.size = len(envelope.payload)
        self.skips: list[str | None] | None = None if skip is None else [skip]
        self.skipped: set[str] = set() if skip is None else {skip}
        self.timer: asyncio.TimerHandle | None = None

    def add(self, envelope: Envelope, skip: str | None) -> int:
        envelopes = self.envelopes
        if skip is not None or self.skips is not None:
            if self.skips is None:
                self.skips = [None] * len(envelopes)
            self.skips.append(skip)
            if skip is not None:
                self.skipped.add(skip)
        envelopes.append(envelope)
        self.size += len(envelope.payload)
        return len(envelopes)

    def for_member(self, member_id: str) -> list[Envelope]:
        """The envelopes the member ``member_id`` gets: all but those that skip it."""
        assert self.skips is not None
        return [e for e, s in zip(self.envelopes, self.skips, strict=True) if s != member_id]


class Fanout:
    """Hands a room's envelopes to its local inboxes, per envelope or per batch (see above)."""

    __slots__ = (
        "_batches",
        "_delays",
        "_flush_bytes",
        "_flush_count",
        "_local",
        "_node_id",
        "_stats",
        "delay",
        "max_batch",
    )

    def __init__(
        self,
        local: dict[str, dict[str, Inbox]],
        delay: float,
        max_batch: int,
        *,
        stats: Stats,
        node_id: str,
        inbox_size: int,
        inbox_bytes: int,
    ) -> None:
        check_batching(delay, max_batch)
        self._local = local  # room -> member id -> inbox (the join table's, never replaced)
        self.delay = float(delay)
        self.max_batch = max_batch
        self._stats = stats
        self._node_id = node_id
        # A batch that fills an inbox is delivered at once, not when its timer fires: a member
        # waiting with an empty inbox takes it whole rather than lose the overflow.
        self._flush_count = min(max_batch, inbox_size)
        self._flush_bytes = inbox_bytes
        self._delays: dict[str, float] = {}  # rooms with a delay of their own
        self._batches: dict[str, _Batch] = {}  # room -> envelopes not flushed yet

    def set_delay(self, room: str, delay: float | None) -> None:
        if delay is None:
            self._delays.pop(room, None)
        else:
            check_batching(delay, self.max_batch)
            self._delays[room] = float(delay)
        self.settle(room)  # a batch started under the old delay goes now

    def deliver(self, members: dict[str, Inbox], envelope: Envelope, skip: str | None) -> int:
        """Hand ``envelope`` to every inbox of ``members`` but ``skip``'s. Returns how many took
        it now; a batched envelope returns 0 and is counted when its batch is flushed."""
        room = envelope.room
        delay = self._delays.get(room, self.delay) if self._delays else self.delay
        if delay > 0:
            batch = self._batches.get(room)
            if batch is not None:
                if batch.add(envelope, skip) >= self._flush_count or (
                    batch.size >= self._flush_bytes
                ):
                    self.flush(room)
                return 0
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # not asyncio: no timer, queue now
                pass
            else:
                batch = self._batches[room] = _Batch(envelope, skip)
                if self._flush_count <= 1 or batch.size >= self._flush_bytes:
                    self.flush(room)
                else:
                    wait = delay - TIMER_SLACK if delay > 2 * TIMER_SLACK else delay / 2
                    batch.timer = loop.call_later(wait, self.flush, room)
                return 0
        delivered = 0
        # A copy: a delivery may close a member ("disconnect" policy), which edits the dict.
        for inbox in tuple(members.values()):
            if inbox.id != skip and inbox.deliver(envelope):
                delivered += 1
        return delivered

    def settle(self, room: str) -> None:
        """Flush ``room``'s batch, if it has one: called before the room's membership or a
        member's recovery state for it changes, so the batch reaches the members it was for."""
        if self._batches and room in self._batches:
            self.flush(room)

    def flush(self, room: str) -> None:
        """Queue ``room``'s batch in its members' inboxes now and wake those that wait."""
        batch = self._batches.pop(room, None)
        if batch is None:
            return
        if batch.timer is not None:
            batch.timer.cancel()
        members = self._local.get(room)
        if not members:
            return
        envelopes = batch.envelopes
        size = batch.size
        skipped = batch.skipped
        node_id = self._node_id
        local = sum([1 for e in envelopes if e.origin == node_id])  # this node's publishes
        stats = self._stats
        whole = 0  # members that took the whole batch in one step: counted once, after
        # A copy: a delivery may close a member ("disconnect" policy), which edits the dict.
        for inbox in tuple(members.values()):
            if skipped and inbox.id in skipped:
                mine = batch.for_member(inbox.id)
            elif inbox.deliver_batch(envelopes, size):  # the whole batch, in one step
                whole += 1
                continue
            else:
                mine = envelopes
            for envelope in mine:  # one by one: a recovery, an overlap or an overflow
                if inbox.deliver(envelope, False):
                    if envelope.origin == node_id:
                        stats.local_deliveries += 1
                    else:
                        stats.remote_deliveries += 1
            if inbox.waiters and inbox.queue:
                inbox.wake()
        stats.local_deliveries += whole * local
        stats.remote_deliveries += whole * (len(envelopes) - local)

    def close(self) -> None:
        """Flush every batch (the router stops)."""
        for room in list(self._batches):
            self.flush(room)
