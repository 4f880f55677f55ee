"""The router's half of a member: its bounded inbox and the delivery state of its recoveries.

A :class:`~roomrouter.Member` is what the application holds (join, leave, receive); an
:class:`Inbox` is what the router holds for it, and every name the router uses is here, none
underscored (issue 21): ``deliver`` on the hot path, ``deliver_gap``, ``deliver_recovered``,
``hold``/``unhold`` around a recovery, ``expect_overlap``/``forget_overlap`` after one, and
``close``/``check_open``. The other way round, what a member asks of its router is the
``Membership`` protocol (``_member.py``). The queue and the waiter list are shared with the
member (the same objects), so ``receive()`` reads them without a call.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING, Literal

import anyio

from ._envelope import Envelope
from ._errors import MemberClosed
from ._stats import Stats

if TYPE_CHECKING:
    from ._member import Member, Membership

__all__ = ["GapMark", "Inbox", "OverflowPolicy", "gap_mark"]

#: What a full inbox (``inbox_size`` envelopes, or ``max_inbox_bytes`` of payload) does with
#: one more envelope: ``"drop_oldest"`` discards the oldest queued envelopes until it fits
#: (each counted in ``dropped_overflow``); ``"disconnect"`` closes the member with the
#: reason ``"overflow"`` (the app then closes the client's socket; it can recover by history).
OverflowPolicy = Literal["drop_oldest", "disconnect"]


class GapMark(Envelope, frozen=True):
    """The place in an inbox where messages of ``room`` may be missing: ``receive()`` raises
    :class:`~roomrouter.DeliveryGap` when it reaches it. Never encoded, never seen by the app."""


def gap_mark(room: str) -> GapMark:
    return GapMark(id="", room=room, origin="", ts=0.0, payload=b"")


class Inbox:
    """One member's inbox as the router sees it (see the module docstring).

    ``queue`` holds the envelopes (and gap marks) in arrival order, ``bytes`` their payload
    bytes, ``gaps`` the gap marks among them; ``waiters`` are the member's tasks waiting in
    ``receive()``; ``closed`` is the close reason once closed. ``member`` is the application's
    side, set by the :class:`~roomrouter.Member` it belongs to.
    """

    __slots__ = (
        "bytes",
        "closed",
        "gaps",
        "id",
        "max_bytes",
        "maxlen",
        "member",
        "overlap",
        "policy",
        "queue",
        "recovering",
        "router",
        "stats",
        "waiters",
    )

    member: Member

    def __init__(
        self,
        router: Membership,
        stats: Stats,
        member_id: str,
        inbox_size: int,
        policy: OverflowPolicy,
        max_bytes: int = 8 << 20,
    ) -> None:
        self.id = member_id
        self.router = router
        self.stats = stats
        # room -> live envelopes held back while the room's history is being fetched
        self.recovering: dict[str, list[Envelope]] = {}
        # room -> origin node -> (ids delivered from history, the highest of them): the live
        # copies of those may still be on their way after a recovery (see expect_overlap).
        self.overlap: dict[str, dict[str, tuple[set[str], str]]] = {}
        self.queue: deque[Envelope] = deque()
        self.maxlen = inbox_size
        # Payload bytes the inbox holds: what this member keeps alive (a payload is shared by
        # every member it went to, so this bounds a member's share, not a copy).
        self.bytes = 0
        self.max_bytes = max_bytes
        self.gaps = 0  # gap marks queued (see GapMark)
        self.policy = policy
        # The tasks waiting in receive(): a bare future each on asyncio, an anyio.Event
        # elsewhere (see Member._wait). Usually none or one; each has its own, so cancelling
        # one waiter never cancels another.
        self.waiters: list[asyncio.Future[None] | anyio.Event] = []
        self.closed: str | None = None

    def deliver(self, envelope: Envelope, wake: bool = True) -> bool:
        """Queue ``envelope``; False if it was not queued (closed, or closed by overflow).

        With ``wake=False`` (delivery batching, ``_batching.py``) a waiting member is not woken
        here but by the room's batch flush, unless this envelope filled the inbox: the next
        one would overflow it, so the member runs now rather than lose envelopes to a timer."""
        if self.recovering:
            held = self.recovering.get(envelope.room)
            if held is not None:
                held.append(envelope)
                return True
        if self.overlap and self._recovered_already(envelope):
            self.stats.dropped_duplicate += 1
            return False
        queue = self.queue
        total = self.bytes + len(envelope.payload)
        # An envelope always fits an inbox that holds no payload bytes: one bigger than
        # max_inbox_bytes (from a node with a larger max_payload) is kept alone, not refused.
        if (total > self.max_bytes and self.bytes) or len(queue) >= self.maxlen:
            if self.closed is not None:
                return False
            if self.policy == "disconnect":
                self.stats.members_disconnected += 1
                self.close("overflow")
                return False
            self._drop_oldest(len(envelope.payload))
            total = self.bytes + len(envelope.payload)
        queue.append(envelope)
        self.bytes = total
        if self.waiters and (wake or len(queue) >= self.maxlen or total >= self.max_bytes):
            self.wake()
        return True

    def deliver_batch(self, envelopes: list[Envelope], size: int) -> bool:
        """Queue a room's batch (``size`` payload bytes) in one step and wake a waiting member;
        False, with nothing queued, if it must go envelope by envelope (:meth:`deliver`): the
        member recovers or drops overlaps, or the batch does not fit the inbox."""
        if self.recovering or self.overlap:
            return False
        queue = self.queue
        total = self.bytes + size
        if len(queue) + len(envelopes) > self.maxlen or total > self.max_bytes:
            return False
        queue.extend(envelopes)
        self.bytes = total
        if self.waiters:
            self.wake()
        return True

    def _drop_oldest(self, size: int) -> None:
        """Drop the oldest envelopes until one of ``size`` bytes fits. Gap marks are kept: they
        hold no bytes, and dropping one would make a loss silent."""
        queue = self.queue
        marks: list[Envelope] = []
        while queue and (
            len(queue) + len(marks) >= self.maxlen
            or (self.bytes and self.bytes + size > self.max_bytes)
        ):
            oldest = queue.popleft()
            if oldest.__class__ is GapMark:
                marks.append(oldest)
                continue
            self.bytes -= len(oldest.payload)
            self.stats.dropped_overflow += 1
        if marks:
            queue.extendleft(reversed(marks))

    def deliver_gap(self, room: str) -> bool:
        """Queue a gap mark for ``room`` (one, if the last queued is one already); False if
        closed. It is never dropped by overflow (see _drop_oldest)."""
        if self.closed is not None:
            return False
        queue = self.queue
        if queue and queue[-1].__class__ is GapMark and queue[-1].room == room:
            return True
        queue.append(gap_mark(room))
        self.gaps += 1
        if self.waiters:
            self.wake()
        return True

    # -- recoveries (a join with since/history) -------------------------------------------------

    def hold(self, room: str) -> list[Envelope]:
        """From now on hold ``room``'s live envelopes back (in the returned list) while its
        history is read; :meth:`unhold` ends it."""
        held: list[Envelope] = []
        self.recovering[room] = held
        return held

    def unhold(self, room: str) -> None:
        self.recovering.pop(room, None)

    def deliver_recovered(self, envelopes: list[Envelope]) -> None:
        """Queue a recovery batch in order. It may exceed ``inbox_size`` once (it is bounded by
        the router's ``max_recover``): dropping recovered history would defeat the recovery."""
        self.queue.extend(envelopes)
        self.bytes += sum([len(envelope.payload) for envelope in envelopes])
        if envelopes and self.waiters:
            self.wake()

    def expect_overlap(self, room: str, recovered: list[Envelope]) -> None:
        """After a recovery of ``room``: drop the live copies of ``recovered`` still to come.

        The history read may hold messages published after the join whose live copy has not
        arrived yet. Each origin's live envelopes arrive in id order (one node's ids grow with
        its publishes, and per publisher and room order is kept), so once an origin's live
        envelope reaches the highest id recovered from it, nothing recovered from it can follow
        and its entry goes. Exact, and bounded by the router's ``max_recover``.
        """
        # Lists first, sets and highs once per origin: a storm runs this for every member.
        lists: dict[str, list[str]] = {}
        for envelope in recovered:
            ids = lists.get(envelope.origin)
            if ids is None:
                lists[envelope.origin] = [envelope.id]
            else:
                ids.append(envelope.id)
        if lists:
            self.overlap[room] = {o: (set(ids), max(ids)) for o, ids in lists.items()}
        else:
            self.overlap.pop(room, None)

    def forget_overlap(self, room: str) -> None:
        self.overlap.pop(room, None)

    def _recovered_already(self, envelope: Envelope) -> bool:
        by_origin = self.overlap.get(envelope.room)
        if by_origin is None:
            return False
        entry = by_origin.get(envelope.origin)
        if entry is None:
            return False
        ids, high = entry
        if envelope.id >= high:  # this origin's live stream has passed its recovered part
            del by_origin[envelope.origin]
            if not by_origin:
                del self.overlap[envelope.room]
        return envelope.id in ids

    # -- waking and closing ---------------------------------------------------------------------

    def wake(self) -> None:
        waiters = self.waiters
        for waiter in waiters:
            if isinstance(waiter, asyncio.Future):
                if not waiter.done():  # done: cancelled, its task is on its way out
                    waiter.set_result(None)
            else:
                waiter.set()
        waiters.clear()

    def close(self, reason: str) -> None:
        """Close the member: its router forgets it (every join ended), its waiters wake."""
        if self.closed is not None:
            return
        self.closed = reason
        self.router.forget(self)
        if self.waiters:
            self.wake()

    def check_open(self) -> None:
        if self.closed is not None:
            raise MemberClosed(self.id, self.closed)
