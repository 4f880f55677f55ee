"""A local member (one client connection) and its bounded inbox."""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from typing import Literal, Protocol

import anyio
import anyio.lowlevel

from ._envelope import Envelope
from ._errors import DeliveryGap, MemberClosed
from ._stats import Stats

__all__ = ["Member", "Membership", "OverflowPolicy", "Recovery"]

#: What a full inbox (``inbox_size`` envelopes, or ``max_inbox_bytes`` of payload) does with
#: one more envelope: ``"drop_oldest"`` discards the oldest queued envelopes until it fits
#: (each counted in ``dropped_overflow``); ``"disconnect"`` closes the member with the
#: reason ``"overflow"`` (the app then closes the client's socket; it can recover by history).
OverflowPolicy = Literal["drop_oldest", "disconnect"]


class _Gap(Envelope, frozen=True):
    """The place in an inbox where messages of ``room`` may be missing: ``receive()`` raises
    :class:`DeliveryGap` when it reaches it. Never encoded, never seen by the app."""


def _gap(room: str) -> _Gap:
    return _Gap(id="", room=room, origin="", ts=0.0, payload=b"")


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
    there alone (``RoomRouter`` implements this); the member keeps only its inbox and the
    delivery state of its recoveries."""

    async def _join(
        self, member: Member, room: str, *, since: str | None, history: int
    ) -> Recovery: ...

    def _leave(self, member: Member, room: str) -> None: ...

    def _forget(self, member: Member) -> None: ...

    def _rooms_of(self, member: Member) -> frozenset[str]: ...


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

    __slots__ = (
        "_bytes",
        "_closed",
        "_gaps",
        "_inbox",
        "_max_bytes",
        "_maxlen",
        "_overlap",
        "_policy",
        "_recovering",
        "_router",
        "_stats",
        "_waiters",
        "id",
        "info",
        "listed",
    )

    def __init__(
        self,
        router: Membership,
        stats: Stats,
        member_id: str,
        inbox_size: int,
        policy: OverflowPolicy,
        info: dict[str, str] | None = None,
        max_bytes: int = 8 << 20,
    ) -> None:
        self.id = member_id
        #: The app's data about this member, shown by presence (``router.member(id, info=)``).
        self.info: dict[str, str] = info or {}
        #: Whether presence shows this member (``router.member(id, listed=False)``).
        self.listed = True
        self._router = router
        self._stats = stats
        # room -> live envelopes held back while the room's history is being fetched
        self._recovering: dict[str, list[Envelope]] = {}
        # room -> origin node -> (ids delivered from history, the highest of them): the live
        # copies of those may still be on their way after a recovery (see _expect_overlap).
        self._overlap: dict[str, dict[str, tuple[set[str], str]]] = {}
        self._inbox: deque[Envelope] = deque()
        self._maxlen = inbox_size
        # Payload bytes the inbox holds: what this member keeps alive (a payload is shared by
        # every member it went to, so this bounds a member's share, not a copy).
        self._bytes = 0
        self._max_bytes = max_bytes
        self._gaps = 0  # gap marks queued (see _Gap)
        self._policy = policy
        # The tasks waiting in receive(): a bare future each on asyncio, an anyio.Event
        # elsewhere (see _wait). Usually none or one; each has its own, so cancelling one
        # waiter never cancels another.
        self._waiters: list[asyncio.Future[None] | anyio.Event] = []
        self._closed: str | None = None

    def __repr__(self) -> str:
        state = f"closed: {self._closed}" if self._closed else f"{len(self.rooms)} room(s)"
        return f"<Member {self.id!r} {state}>"

    @property
    def rooms(self) -> frozenset[str]:
        """Rooms this member is in (joins still in progress are not counted yet)."""
        return self._router._rooms_of(self)

    @property
    def closed(self) -> bool:
        return self._closed is not None

    @property
    def close_reason(self) -> str | None:
        return self._closed

    def pending(self) -> int:
        """Envelopes queued in the inbox (a queued :class:`~roomrouter.DeliveryGap` counts)."""
        return len(self._inbox)

    def pending_bytes(self) -> int:
        """Payload bytes of the envelopes queued in the inbox (bounded by ``max_inbox_bytes``)."""
        return self._bytes

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
        return await self._router._join(self, room, since=since, history=history)

    async def leave(self, room: str) -> None:
        """Leave ``room``; nothing of it is delivered from now on. Leaving a room not joined is a
        no-op; leaving a room whose join is in progress ends that join."""
        self._router._leave(self, room)
        await anyio.lowlevel.checkpoint()

    async def receive(self) -> Envelope:
        """The next envelope; waits for one. Raises :class:`MemberClosed` once closed and empty,
        and :class:`~roomrouter.DeliveryGap` once where messages of a room may be missing."""
        inbox = self._inbox
        while not inbox:
            if self._closed is not None:
                raise MemberClosed(self.id, self._closed)
            await self._wait()
        envelope = inbox.popleft()
        self._bytes -= len(envelope.payload)
        if self._gaps and envelope.__class__ is _Gap:
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
            if self._closed is not None:
                raise MemberClosed(self.id, self._closed)
            await self._wait()
        if self._gaps:
            return self._batch_to_gap(max_items)
        if max_items is None or max_items >= len(inbox):
            batch = list(inbox)
            inbox.clear()
            self._bytes = 0
            return batch
        popleft = inbox.popleft
        batch = [popleft() for _ in range(max_items)]
        self._bytes -= sum([len(envelope.payload) for envelope in batch])
        return batch

    def _batch_to_gap(self, max_items: int | None) -> list[Envelope]:
        inbox = self._inbox
        if inbox[0].__class__ is _Gap:
            self._raise_gap(inbox.popleft())
        popleft = inbox.popleft
        batch: list[Envelope] = []
        limit = len(inbox) if max_items is None else max_items
        while inbox and len(batch) < limit and inbox[0].__class__ is not _Gap:
            envelope = popleft()
            self._bytes -= len(envelope.payload)
            batch.append(envelope)
        return batch

    def receive_nowait(self) -> Envelope | None:
        """The next envelope if one is queued, else ``None`` (or :class:`DeliveryGap`, as
        :meth:`receive`)."""
        if not self._inbox:
            return None
        envelope = self._inbox.popleft()
        self._bytes -= len(envelope.payload)
        if self._gaps and envelope.__class__ is _Gap:
            self._raise_gap(envelope)
        return envelope

    def _raise_gap(self, mark: Envelope) -> None:
        self._gaps -= 1
        raise DeliveryGap(self.id, mark.room)

    def __aiter__(self) -> Member:
        return self

    async def __anext__(self) -> Envelope:
        # receive() inlined: ``async for`` over a member is the common send loop, and one
        # coroutine per envelope instead of two is a measurable share of a big room's fan-out.
        inbox = self._inbox
        while not inbox:
            if self._closed is not None:
                raise StopAsyncIteration
            await self._wait()
        envelope = inbox.popleft()
        self._bytes -= len(envelope.payload)
        if self._gaps and envelope.__class__ is _Gap:
            self._raise_gap(envelope)
        return envelope

    async def _wait(self) -> None:
        """Wait until the inbox gets an envelope or the member closes (or spuriously).

        On asyncio a bare future per wait: an ``anyio.Event`` costs an asyncio.Event, its
        waiter deque and a backend look-up on top of the same future, and a big room creates
        one per member per wake-up. Cancellation works the same (anyio cancels the task,
        which cancels the future it waits on). Other event loops get an ``anyio.Event``.
        """
        waiter: asyncio.Future[None] | anyio.Event
        try:
            waiter = asyncio.get_running_loop().create_future()
        except RuntimeError:  # not asyncio (trio)
            event = anyio.Event()
            self._waiters.append(event)
            try:
                await event.wait()
            except BaseException:
                self._discard(event)
                raise
            return
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

    def _wake(self) -> None:
        waiters = self._waiters
        for waiter in waiters:
            if isinstance(waiter, asyncio.Future):
                if not waiter.done():  # done: cancelled, its task is on its way out
                    waiter.set_result(None)
            else:
                waiter.set()
        waiters.clear()

    async def close(self) -> None:
        """Leave every room and close; the member id becomes free again."""
        self._close("closed")

    async def __aenter__(self) -> Member:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- called by the router -------------------------------------------------------------------

    def _deliver(self, envelope: Envelope) -> bool:
        """Queue ``envelope``; False if it was not queued (closed, or closed by overflow)."""
        if self._recovering:
            held = self._recovering.get(envelope.room)
            if held is not None:
                held.append(envelope)
                return True
        if self._overlap and self._recovered_already(envelope):
            self._stats.dropped_duplicate += 1
            return False
        inbox = self._inbox
        total = self._bytes + len(envelope.payload)
        # An envelope always fits an inbox that holds no payload bytes: one bigger than
        # max_inbox_bytes (from a node with a larger max_payload) is kept alone, not refused.
        if (total > self._max_bytes and self._bytes) or len(inbox) >= self._maxlen:
            if self._closed is not None:
                return False
            if self._policy == "disconnect":
                self._stats.members_disconnected += 1
                self._close("overflow")
                return False
            self._drop_oldest(len(envelope.payload))
            total = self._bytes + len(envelope.payload)
        inbox.append(envelope)
        self._bytes = total
        if self._waiters:
            self._wake()
        return True

    def _drop_oldest(self, size: int) -> None:
        """Drop the oldest envelopes until one of ``size`` bytes fits. Gap marks are kept: they
        hold no bytes, and dropping one would make a loss silent."""
        inbox = self._inbox
        marks: list[Envelope] = []
        while inbox and (
            len(inbox) + len(marks) >= self._maxlen
            or (self._bytes and self._bytes + size > self._max_bytes)
        ):
            oldest = inbox.popleft()
            if oldest.__class__ is _Gap:
                marks.append(oldest)
                continue
            self._bytes -= len(oldest.payload)
            self._stats.dropped_overflow += 1
        if marks:
            inbox.extendleft(reversed(marks))

    def _deliver_gap(self, room: str) -> bool:
        """Queue a gap mark for ``room`` (one, if the last queued is one already); False if
        closed. It is never dropped by overflow (see _drop_oldest)."""
        if self._closed is not None:
            return False
        inbox = self._inbox
        if inbox and inbox[-1].__class__ is _Gap and inbox[-1].room == room:
            return True
        inbox.append(_gap(room))
        self._gaps += 1
        if self._waiters:
            self._wake()
        return True

    def _expect_overlap(self, room: str, recovered: list[Envelope]) -> None:
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
            self._overlap[room] = {o: (set(ids), max(ids)) for o, ids in lists.items()}
        else:
            self._overlap.pop(room, None)

    def _recovered_already(self, envelope: Envelope) -> bool:
        by_origin = self._overlap.get(envelope.room)
        if by_origin is None:
            return False
        entry = by_origin.get(envelope.origin)
        if entry is None:
            return False
        ids, high = entry
        if envelope.id >= high:  # this origin's live stream has passed its recovered part
            del by_origin[envelope.origin]
            if not by_origin:
                del self._overlap[envelope.room]
        return envelope.id in ids

    def _deliver_recovered(self, envelopes: list[Envelope]) -> None:
        """Queue a recovery batch in order. It may exceed ``inbox_size`` once (it is bounded by
        the router's ``max_recover``): dropping recovered history would defeat the recovery."""
        self._inbox.extend(envelopes)
        self._bytes += sum([len(envelope.payload) for envelope in envelopes])
        if envelopes and self._waiters:
            self._wake()

    def _close(self, reason: str) -> None:
        if self._closed is not None:
            return
        self._closed = reason
        self._router._forget(self)
        if self._waiters:
            self._wake()

    def _check_open(self) -> None:
        if self._closed is not None:
            raise MemberClosed(self.id, self._closed)
