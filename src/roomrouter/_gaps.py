"""Delivery gaps: what a node's members missed while its data connection was down.

When the broker reconnects (it calls the router's ``on_reconnect`` before it hands on any
frame of the new connection), every hosted room's live envelopes are held back until its
recent cache was read; the members then get what they missed from the cache, in the cache's
order, once, then the held live ones, and a :class:`~roomrouter.DeliveryGap` mark first where
that cannot be proved complete (docs/architecture.md, "Delivery semantics", guarantee 10).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import anyio

from ._envelope import Envelope
from ._inbox import Inbox
from ._recovery import Recoverer
from ._stats import Stats
from .brokers._base import Broker

__all__ = ["GapRecovery"]

log = logging.getLogger("roomrouter")

#: Cache reads running at once after a reconnect (one per hosted room, see _recover).
_GAP_READS = 8


class GapRecovery:
    """The gap state of one router's hosted rooms, and the task that closes the gaps.

    The router's delivery path keeps, per hosted room, ``last_persisted`` (the id of the last
    persisted envelope delivered from the broker: its place in the room's recent cache) and
    ``live_rooms`` (live-only envelopes came: no cache can give those back); while ``hold`` or
    ``overlap`` is not empty it asks :meth:`filter` first. These four are shared with the
    router (the same objects for the router's life: the hot path reads them without a call).
    ``local`` is the router's room -> member id -> inbox map, ``deliver`` its delivery of a
    broker envelope to a room's local members.
    """

    def __init__(
        self,
        node_id: str,
        broker: Broker,
        recovery: Recoverer,
        stats: Stats,
        local: dict[str, dict[str, Inbox]],
        deliver: Callable[[Envelope], None],
        *,
        settle: Callable[[str], None],
    ) -> None:
        self._node_id = node_id
        self._broker = broker
        self._recovery = recovery
        self._stats = stats
        self._local = local
        self._deliver = deliver
        self._settle = settle  # flushes a room's delivery batch (``_batching.Fanout.settle``)
        self.last_persisted: dict[str, str] = {}
        self.live_rooms: set[str] = set()
        # Rooms whose live envelopes are held while the cache is read after a reconnect, and
        # the recovered ids whose live copies may still come (see filter).
        self.hold: dict[str, list[Envelope]] = {}
        self.overlap: dict[str, set[str]] = {}
        self._pending: set[str] = set()
        self._wake = anyio.Event()

    def on_reconnect(self) -> None:
        """The data connection was lost: frames published meanwhile were not delivered. Hold
        each hosted room's live frames from now on until its cache was read."""
        for room in self._local:
            self.hold.setdefault(room, [])
            self._pending.add(room)
        self._wake.set()

    def filter(self, envelope: Envelope) -> bool:
        """True if ``envelope`` is not for the members now: held while its room's cache is
        read, or the live copy of one already recovered from the cache (dropped)."""
        room = envelope.room
        held = self.hold.get(room)
        if held is not None:
            held.append(envelope)
            return True
        recovered = self.overlap.get(room)
        if recovered is None or not envelope.persist:
            return False
        if envelope.id in recovered:
            recovered.discard(envelope.id)
            if not recovered:
                del self.overlap[room]
            self._stats.dropped_duplicate += 1
            return True
        # A persisted frame the cache read did not hold was written after it: the live copies
        # of what it held (same server order as the cache) have all come by now.
        del self.overlap[room]
        return False

    def forget(self, room: str) -> None:
        """The room's last local member left: what this node knew of its stream is void."""
        self.last_persisted.pop(room, None)
        self.live_rooms.discard(room)
        self.overlap.pop(room, None)

    async def run(self) -> None:
        limiter = anyio.CapacityLimiter(_GAP_READS)
        while True:
            await self._wake.wait()
            self._wake = anyio.Event()
            while self._pending:
                rooms = list(self._pending)
                self._pending.clear()
                async with anyio.create_task_group() as tg:
                    for room in rooms:
                        tg.start_soon(self._recover, room, limiter)

    async def _recover(self, room: str, limiter: anyio.CapacityLimiter) -> None:
        """Give ``room``'s members what was published while the data connection was down.

        Persisted envelopes come back from the room's recent cache: everything after the last
        one this node delivered, in cache order (the broker's order, the order they would
        have arrived in), once. Where that cannot be proved complete the members get a gap
        mark (:class:`~roomrouter.DeliveryGap`) first: live-only envelopes reached this room
        before (none is in any cache), the backend has no cache, the node had delivered no
        persisted envelope of the room yet (no place to start from) and the cache holds some
        from other nodes, its last one is no longer in the cache, or the cache could not be
        read. A room that has carried nothing but persisted envelopes here is taken to be
        persisted-only: a first live-only one published during the outage is not seen.
        """
        last = self.last_persisted.get(room)
        storage = self._broker.supports_storage
        gap = room in self.live_rooms or not storage
        missed: list[Envelope] = []
        if storage and not (gap and last is None):
            try:
                async with limiter:
                    cached = await self._recovery.in_cache_order(room, last)
            except Exception as exc:  # whatever it was, the hold below must be released
                log.warning("node %s: cannot read the cache of %r after a reconnect: %r",
                            self._node_id, room, exc)  # fmt: skip
                gap = True
            else:
                cached = [e for e in cached if e.origin != self._node_id]  # never lost here
                if last is None:
                    # Nothing of the room delivered from the broker yet: no place to start
                    # from. An empty cache proves nothing persisted was missed; else say so.
                    gap = gap or bool(cached)
                else:
                    at = next((i for i, e in enumerate(cached) if e.id == last), None)
                    if at is None:  # evicted or expired: what is left after it, but said
                        gap = True
                        missed = [e for e in cached if e.id > last]
                    else:
                        missed = cached[at + 1 :]
        if room in self._pending:
            return  # reconnected again meanwhile: the next round reads from the same place
        held = self.hold.pop(room, [])
        members = self._local.get(room)
        if not members:
            return
        stats = self._stats
        self._settle(room)  # what arrived before the mark goes before it
        if gap:
            stats.delivery_gaps += 1
            for inbox in tuple(members.values()):
                inbox.deliver_gap(room)
        self.overlap.pop(room, None)  # a previous round's: those copies will not come
        recovered = {e.id for e in missed}
        before = stats.remote_deliveries
        for envelope in missed:
            self._deliver(envelope)
        self._settle(room)  # counted now, not when the batch's timer fires
        stats.recovered_after_reconnect += stats.remote_deliveries - before
        arrived = {e.id for e in held}
        for envelope in held:
            if envelope.id in recovered:
                stats.dropped_duplicate += 1
            else:
                self._deliver(envelope)
        if any(e.persist and e.id not in recovered for e in held):
            return  # the live stream passed the cache read: no copy of it is still to come
        still_to_come = recovered - arrived
        if still_to_come:
            self.overlap[room] = still_to_come
