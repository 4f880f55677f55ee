"""A local member (one client connection) and its bounded inbox."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Protocol

import anyio
import anyio.lowlevel

from ._envelope import Envelope
from ._errors import DeliveryGap, MemberClosed
from ._inbox import GapMark, Inbox, OverflowPolicy

__all__ = ["Member", "Membership", "OverflowPolicy", "Recovery"]


@dataclass(frozen=True, slots=True)
class Recovery:
    """What a join delivered from history before live messages.

    ``count`` envelopes were queued; ``complete`` is False if messages after ``since`` may be
    missing (the window is older than what the sink and the recent cache can prove complete,
    or it exceeded the router's ``max_recover``); ``last_id`` is the newest recovered id.
    """

    count: int = 0
    complete: bool = True
    last_id: str | None = None


class Membership(Protocol):
    """What a member asks of its router. Which rooms a member is in, or is joining, is known
    there alone (the router's join table, ``_joins.Joins``, implements this); the member
    keeps only its inbox and the delivery state of its recoveries (an :class:`Inbox`, which
    is what the router holds and calls in turn). No underscored name either way (issue 21)."""

    async def join(
        self, inbox: Inbox, room: str, *, since: str | None, history: int
    ) -> Recovery: ...

    def leave(self, inbox: Inbox, room: str) -> None: ...

    def forget(self, inbox: Inbox) -> None: ...

    def rooms_of(self, inbox: Inbox) -> frozenset[str]: ...


class Member:
    """One local member of a :class:`RoomRouter`: joins rooms and receives their envelopes.

    Created by :meth:`RoomRouter.member`. Envelopes wait in an inbox bounded in count
    (``inbox_size``) and in payload bytes (``max_inbox_bytes``); ``receive()`` takes them in
    arrival order, which for one publisher and one room is publish order. A closed member's
    ``receive()`` still returns what was queued, then raises :class:`MemberClosed`.

    Where messages of a room may have been lost (the node's data connection to the broker was
    lost and what was published meanwhile could not all be recovered), the receive call that
    reaches that place raises :class:`~roomrouter.DeliveryGap` once, and the next one goes on.
    """

    __slots__ = ("_box", "_inbox", "_loop", "_router", "_waiters", "id", "info", "listed")

    def __init__(self, box: Inbox, router: Membership, info: dict[str, str] | None = None) -> None:
        self.id = box.id
        #: The app's data about this member, shown by presence (``router.member(id, info=)``).
        self.info: dict[str, str] = info or {}
        #: Whether presence shows this member (``router.member(id, listed=False)``).
        self.listed = True
        self._router = router
        self._box = box
        box.member = self
        # The box's own queue and waiter list (the same objects, never replaced): the
        # receive path reads them without going through the box.
        self._inbox = box.queue
        self._waiters = box.waiters
        # The asyncio loop of the first wait (a member lives on its router's loop): later
        # waits create their future on it directly (see _park). None: not known yet, or trio.
        self._loop: asyncio.AbstractEventLoop | None = None

    def __repr__(self) -> str:
        closed = self._box.closed
        state = f"closed: {closed}" if closed else f"{len(self.rooms)} room(s)"
        return f"<Member {self.id!r} {state}>"

    @property
    def rooms(self) -> frozenset[str]:
        """Rooms this member is in (joins still in progress are not counted yet)."""
        return self._router.rooms_of(self._box)

    @property
    def closed(self) -> bool:
        return self._box.closed is not None

    @property
    def close_reason(self) -> str | None:
        return self._box.closed

    def pending(self) -> int:
        """Envelopes queued in the inbox (a queued :class:`~roomrouter.DeliveryGap` counts)."""
        return len(self._inbox)

    def pending_bytes(self) -> int:
        """Payload bytes of the envelopes queued in the inbox (bounded by ``max_inbox_bytes``)."""
        return self._box.bytes

    async def join(self, room: str, *, since: str | None = None, history: int = 0) -> Recovery:
        """Join ``room``. When this returns, every envelope published to ``room`` afterwards, on
        any node of a healthy cluster, is delivered to this member (docs/architecture.md,
        guarantee 2).

        With ``since=<id of the last envelope the client saw>`` (a reconnect), the inbox first
        receives every stored message of the room after that id, in id order, then live ones:
        no gap, no duplicate. With ``history=N`` (a first join), the last N messages come first
        instead. Both need persistence (a sink, or a backend with a recent-messages cache); the
        returned :class:`Recovery` says how many came and whether the window was complete.

        Joining a room twice is a no-op; a second join while the first is in progress waits for
        its whole outcome, history included: it returns when the first did (the member is in
        the room) and raises :class:`~roomrouter.HistoryUnavailable` if the first's history
        could not be read (the member is then out). A :meth:`leave` during a join wins: the
        member is then not in the room, and the join returns. Raises
        :class:`~roomrouter.InvalidRoomName`, :class:`~roomrouter.MemberClosed`, or
        :class:`~roomrouter.BrokerUnavailable` (the join did not happen), or
        :class:`~roomrouter.HistoryUnavailable` (the history could not be read: the member is
        left out of the room, so a retry recovers from ``since``).
        """
        self._check_open()
        return await self._router.join(self._box, room, since=since, history=history)

    async def leave(self, room: str) -> None:
        """Leave ``room``; nothing of it is delivered from now on. Leaving a room not joined is a
        no-op; leaving a room whose join is in progress ends that join."""
        self._router.leave(self._box, room)
        box = self._box
        if box.waiters and box.queue:  # its batch's flush no longer sees it (_batching.py)
            box.wake()
        await anyio.lowlevel.checkpoint()

    async def receive(self) -> Envelope:
        """The next envelope; waits for one. Raises :class:`MemberClosed` once closed and empty,
        and :class:`~roomrouter.DeliveryGap` once where messages of a room may be missing."""
        box = self._box
        inbox = box.queue
        while not inbox:
            if box.closed is not None:
                raise MemberClosed(self.id, box.closed)
            loop = self._loop
            if loop is None:
                await self._wait()
                continue
            # _wait inlined (issue 23's profile: one coroutine frame fewer per wake-up, which
            # a big room pays per member per batch): a bare future on the member's loop.
            waiter = loop.create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                self._discard(waiter)
                raise
        envelope = inbox.popleft()
        box.bytes -= len(envelope.payload)
        if box.gaps and envelope.__class__ is GapMark:
            self._raise_gap(envelope)
        return envelope

    async def receive_batch(self, max_items: int | None = None) -> list[Envelope]:
        """Every queued envelope (at most ``max_items``), in arrival order; waits for one.

        The same stream as :meth:`receive`, taken in one call: an app whose send loop can
        write several frames at once (one ``send`` of a JSON array, or several writes before
        one drain) pays one wake-up per batch instead of per envelope, which is what keeps
        a big room's fan-out cheap. Raises :class:`MemberClosed` once closed and empty.
        A batch ends before a :class:`~roomrouter.DeliveryGap`; the next call raises it (once).
        """
        if max_items is not None and max_items < 1:
            raise ValueError(f"max_items must be >= 1: {max_items!r}")
        inbox = self._inbox
        while not inbox:
            if self._box.closed is not None:
                raise MemberClosed(self.id, self._box.closed)
            await self._wait()
        box = self._box
        if box.gaps:
            return self._batch_to_gap(max_items)
        if max_items is None or max_items >= len(inbox):
            batch = list(inbox)
            inbox.clear()
            box.bytes = 0
            return batch
        popleft = inbox.popleft
        batch = [popleft() for _ in range(max_items)]
        box.bytes -= sum([len(envelope.payload) for envelope in batch])
        return batch

    def _batch_to_gap(self, max_items: int | None) -> list[Envelope]:
        inbox = self._inbox
        if inbox[0].__class__ is GapMark:
            self._raise_gap(inbox.popleft())
        popleft = inbox.popleft
        batch: list[Envelope] = []
        limit = len(inbox) if max_items is None else max_items
        box = self._box
        while inbox and len(batch) < limit and inbox[0].__class__ is not GapMark:
            envelope = popleft()
            box.bytes -= len(envelope.payload)
            batch.append(envelope)
        return batch

    def receive_nowait(self) -> Envelope | None:
        """The next envelope if one is queued, else ``None`` (or :class:`DeliveryGap`, as
        :meth:`receive`)."""
        if not self._inbox:
            return None
        envelope = self._inbox.popleft()
        box = self._box
        box.bytes -= len(envelope.payload)
        if box.gaps and envelope.__class__ is GapMark:
            self._raise_gap(envelope)
        return envelope

    def _raise_gap(self, mark: Envelope) -> None:
        self._box.gaps -= 1
        raise DeliveryGap(self.id, mark.room)

    def __aiter__(self) -> Member:
        return self

    async def __anext__(self) -> Envelope:
        # receive() inlined: ``async for`` over a member is the common send loop, and one
        # coroutine per envelope instead of two is a measurable share of a big room's fan-out.
        box = self._box
        inbox = box.queue
        while not inbox:
            if box.closed is not None:
                raise StopAsyncIteration
            loop = self._loop
            if loop is None:
                await self._wait()
                continue
            # _wait inlined (issue 23's profile: one coroutine frame fewer per wake-up, which
            # a big room pays per member per batch): a bare future on the member's loop.
            waiter = loop.create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                self._discard(waiter)
                raise
        envelope = inbox.popleft()
        box.bytes -= len(envelope.payload)
        if box.gaps and envelope.__class__ is GapMark:
            self._raise_gap(envelope)
        return envelope

    async def _wait(self) -> None:
        """Wait until the inbox gets an envelope or the member closes (or spuriously).

        On asyncio a bare future per wait: an ``anyio.Event`` costs an asyncio.Event, its
        waiter deque and a backend look-up on top of the same future, and a big room creates
        one per member per wake-up. Cancellation works the same (anyio cancels the task,
        which cancels the future it waits on). Other event loops get an ``anyio.Event``.
        """
        try:
            self._loop = loop = asyncio.get_running_loop()
        except RuntimeError:  # not asyncio (trio)
            event = anyio.Event()
            self._waiters.append(event)
            try:
                await event.wait()
            except BaseException:
                self._discard(event)
                raise
            return
        waiter = loop.create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            self._discard(waiter)
            raise

    def _discard(self, waiter: asyncio.Future[None] | anyio.Event) -> None:
        try:
            self._waiters.remove(waiter)
        except ValueError:  # already woken
            pass

    async def close(self) -> None:
        """Leave every room and close; the member id becomes free again."""
        self._box.close("closed")

    async def __aenter__(self) -> Member:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _check_open(self) -> None:
        self._box.check_open()
