"""The join table: which member is in, or is joining, which room; and recovery on join.

Join state lives here, one :class:`_Join` per (member, room), and members ask for it through
the narrow interface of ``_member.Membership`` (this class implements it). A join is in flight
until its room is ready (the subscription manager's one readiness state per room); a second
join of the same member waits for the first, and for its whole outcome, history included; a
leave ends the join whatever its stage, and the join that is still on the wire gives its
reference back itself, so every acquire has exactly one release (docs/architecture.md,
"Dynamic subscription", "Join state per member").

A join with ``since``/``history`` (docs/architecture.md, guarantee 7) holds the room's live
envelopes back from the member's inbox while the history is read (``_recovery.Recoverer``),
then merges both by id: the join comes first, so nothing published after it is missed.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field

import anyio
import anyio.lowlevel

from ._envelope import Envelope, validate_id, validate_room
from ._errors import ConfigurationError, HistoryUnavailable, RoomRouterError
from ._inbox import Inbox
from ._member import Recovery
from ._presence import PresenceKeeper
from ._recovery import Recoverer
from ._subscriptions import SubscriptionManager
from .presence._base import PresenceEntry

__all__ = ["Joins"]

_NOTHING_RECOVERED = Recovery()


def _by_id(envelope: Envelope) -> str:
    return envelope.id


@dataclass(slots=True, eq=False)
class _Join:
    """One member's join of one room: in flight until ``done``; ``joined`` while the member
    is in the room (receiving); ``active`` until a leave or a close ended it. A join with
    ``since``/``history`` has ``recovered``, set once its history was read (or failed:
    ``recovery_error``; or its caller was cancelled: ``abandoned``)."""

    done: anyio.Event = field(default_factory=anyio.Event)
    joined: bool = False
    active: bool = True
    error: RoomRouterError | None = None
    entry: PresenceEntry | None = None  # what the presence store holds for it, if any
    recovered: anyio.Event | None = None
    recovery_error: HistoryUnavailable | None = None
    abandoned: bool = False

    def end_recovery(
        self, error: HistoryUnavailable | None = None, *, abandoned: bool = False
    ) -> None:
        if self.recovered is not None and not self.recovered.is_set():
            self.recovery_error, self.abandoned = error, abandoned
            self.recovered.set()


class Joins:
    """One router's members and their joins (see the module docstring).

    ``members`` (member id -> inbox) and ``local`` (room -> member id -> inbox, the rooms with
    a member in them) are what the router routes by; they change only here. The router gives
    what a join needs: ``check_running`` (raises if it is not running),
    ``require_persistence`` (raises if there is nothing to recover from), ``read_history``
    (its ``history(room, limit=n)``) and ``on_room_empty`` (the last local member left).
    """

    def __init__(
        self,
        node_id: str,
        subs: SubscriptionManager,
        recovery: Recoverer,
        presence: PresenceKeeper | None,
        *,
        max_room_length: int,
        max_recover: int,
        check_running: Callable[[], None],
        require_persistence: Callable[[], None],
        read_history: Callable[[str, int], Awaitable[list[Envelope]]],
        on_room_empty: Callable[[str], None],
        settle: Callable[[str], None],
    ) -> None:
        self.node_id = node_id
        self.members: dict[str, Inbox] = {}
        self.local: dict[str, dict[str, Inbox]] = {}
        self._joins: dict[Inbox, dict[str, _Join]] = {}
        self._subs = subs
        self._recovery = recovery
        self._presence = presence
        self._max_room_length = max_room_length
        self._max_recover = max_recover
        self._check_running = check_running
        self._require_persistence = require_persistence
        self._read_history = read_history
        self._on_room_empty = on_room_empty
        # Before the room's members or a member's recovery of it change: the room's delivery
        # batch goes to the members it was for (``_batching.Fanout.settle``).
        self._settle = settle

    def rooms_of(self, inbox: Inbox) -> frozenset[str]:
        joins = self._joins.get(inbox)
        if not joins:
            return frozenset()
        return frozenset(room for room, join in joins.items() if join.joined)

    def presence_entries(self) -> Iterator[tuple[str, PresenceEntry]]:
        """What the presence store should hold for this node's joined members."""
        for joins in self._joins.values():
            for room, join in joins.items():
                if join.joined and join.entry is not None:
                    yield room, join.entry

    async def join(
        self, inbox: Inbox, room: str, *, since: str | None = None, history: int = 0
    ) -> Recovery:
        self._check_running()
        validate_room(room, self._max_room_length)
        if since is not None:
            # Ids compare as strings: anything else after `since` would "recover" nothing and
            # call that complete.
            validate_id(since)
        if since is None and not history:
            await self._join_live(inbox, room)
            return _NOTHING_RECOVERED
        if (
            not isinstance(history, int)
            or isinstance(history, bool)
            or history < 0
            or history > self._max_recover
        ):
            raise ConfigurationError(
                f"history must be an int between 0 and max_recover={self._max_recover}"
            )
        self._require_persistence()
        if room in self._joins.get(inbox, ()) and await self._await_join(inbox, room):
            return _NOTHING_RECOVERED  # joined or joining (and then joined): a second join
        # Live envelopes of the room are held back from the inbox while the history is read,
        # then merged with it: the join comes first, so nothing published after it is missed,
        # and the merge by id removes what both paths delivered.
        held = inbox.hold(room)
        try:
            join = await self._join_live(inbox, room, recovering=True)
        except BaseException:
            self._settle(room)
            inbox.unhold(room)
            raise
        assert join is not None  # none was there (checked above, with no await since)
        try:
            if since is not None:
                found, complete = await self._recovery.since(room, since)
            else:
                found, complete = await self._read_history(room, history), True
        except BaseException as exc:
            # The join did not deliver what it promised: the member is left out of the room
            # (and what the join acquired released), so a retry recovers from the start.
            # Second joins waiting for this one fail with it, or, if its caller was
            # cancelled, make the join themselves.
            self._settle(room)
            inbox.unhold(room)
            self.leave(inbox, room)
            if not isinstance(exc, Exception):
                join.end_recovery(abandoned=True)
                raise
            error = HistoryUnavailable(f"history of {room!r} could not be read: {exc}")
            error.__cause__ = exc  # for the waiters' errors (see _await_join)
            join.end_recovery(error)
            if isinstance(exc, RoomRouterError):
                raise error from exc
            raise
        join.end_recovery()
        self._settle(room)  # what the batch holds for the room goes to the held-back list
        inbox.unhold(room)
        if room not in self.rooms_of(inbox):  # left (or closed) while the history was read
            return _NOTHING_RECOVERED
        # `found` is in id order without repeats; only held-back live ones need a merge.
        recovered = len(found)
        if held:
            merged = {e.id: e for e in found}
            for envelope in held:
                merged.setdefault(envelope.id, envelope)
            inbox.deliver_recovered(sorted(merged.values(), key=_by_id))
            arrived = {e.id for e in held}
            found_only = [e for e in found if e.id not in arrived]
        else:
            inbox.deliver_recovered(found)
            found_only = found
        # Recovered ones published after the join may still arrive live (the history read can
        # outrun the live path): the member drops those copies.
        inbox.expect_overlap(room, found_only)
        last = found[-1].id if found else None
        return Recovery(count=recovered, complete=complete, last_id=last)

    async def _await_join(self, inbox: Inbox, room: str) -> bool:
        """Wait for ``inbox``'s join of ``room`` that is there already, if any, until the
        member is in the room *for good*: the room ready and, for a join with ``since`` or
        ``history``, its history read. A second join returning earlier said "joined" while
        the first's failed recovery could still take the member out. Returns False if there
        is none (any more: a join cancelled by its caller is its caller's business, not
        ours), True once it ended joined (or left meanwhile: a leave that came later wins);
        raises what made it fail."""
        while True:
            inbox.check_open()
            current = self._joins.get(inbox, {}).get(room)
            if current is None:
                return False
            waited = False
            if not current.joined:
                await current.done.wait()
                waited = True
                if current.error is not None:
                    raise current.error
                if not current.joined and current.active:
                    continue  # that join was cancelled: make our own
            if current.recovered is not None and not current.recovered.is_set():
                await current.recovered.wait()
                waited = True
                if current.recovery_error is not None:
                    error = current.recovery_error
                    raise HistoryUnavailable(str(error)) from error.__cause__
                if current.abandoned:
                    continue
            if not waited:
                await anyio.lowlevel.checkpoint()
            return True

    async def _join_live(
        self, inbox: Inbox, room: str, *, recovering: bool = False
    ) -> _Join | None:
        """Return once the member is in ``room`` and the room is ready (or the member left it
        again meanwhile: a leave that came later wins). Returns the join it made, None if it
        waited for one that was there (see _await_join). ``recovering``: the caller reads the
        history next and ends the join's recovery (``_Join.end_recovery``)."""
        if await self._await_join(inbox, room):
            return None
        # No await since _await_join found no join: this one is the only one.
        joins = self._joins.setdefault(inbox, {})
        join = joins[room] = _Join(recovered=anyio.Event() if recovering else None)
        try:
            await self._subs.acquire(room)
        except BaseException as exc:
            if joins.get(room) is join:
                del joins[room]
            if isinstance(exc, RoomRouterError):
                join.error = exc
            join.end_recovery(abandoned=True)  # nothing to recover into: waiters look again
            join.done.set()
            raise
        if not join.active:  # left, or the member closed, while the join was on the wire
            self._subs.release(room)
            join.end_recovery()  # the leave came later and wins: nothing for waiters to wait
            join.done.set()
            inbox.check_open()
            return join
        join.joined = True
        self._settle(room)  # a batch published before this join is not for the member
        self.local.setdefault(room, {})[inbox.id] = inbox
        member = inbox.member
        if self._presence is not None and member.listed:
            join.entry = PresenceEntry(member.id, self.node_id, time.time(), member.info)
            self._presence.add(room, join.entry)
        join.done.set()
        return join

    def leave(self, inbox: Inbox, room: str) -> None:
        joins = self._joins.get(inbox)
        join = joins.pop(room, None) if joins else None
        if join is not None:
            self._end_join(inbox, room, join)

    def forget(self, inbox: Inbox) -> None:
        for room, join in self._joins.pop(inbox, {}).items():
            self._end_join(inbox, room, join)
        if self.members.get(inbox.id) is inbox:
            del self.members[inbox.id]

    def _end_join(self, inbox: Inbox, room: str, join: _Join) -> None:
        join.active = False
        self._settle(room)  # a batch published before this leave is for the member
        inbox.forget_overlap(room)
        if not join.joined:
            return  # still on the wire: that join sees `active` gone and releases its reference
        join.joined = False
        members = self.local.get(room)
        if members is not None:
            members.pop(inbox.id, None)
            if not members:
                del self.local[room]
                self._on_room_empty(room)
        if self._presence is not None and join.entry is not None:
            self._presence.remove(room, join.entry)
        self._subs.release(room)
