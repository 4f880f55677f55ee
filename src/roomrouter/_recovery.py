"""Reading history for joins with ``since=``/``history=`` and for ``RoomRouter.history``.

A reconnect storm (a lecture hall's members rejoining at once) asks for the same room's recent
cache thousands of times within a second. Reads of one room are therefore a *single flight*:
concurrent recoveries of a room share one read of the cache, reaching back to the oldest
``since`` among them, and each keeps its own part. A recovery may only share a read that had
not been sent yet when it asked: it joined the room before asking, so a read sent after that
holds every cached message it may have missed; a read already on the wire may not. So a room
has at most one read on the wire and one gathering recoveries behind it, which is sent when
the first returns. With a sink, the same flight then reads the sink's newest rows back to the
oldest ``since`` (or ``max_recover`` rows); a recovery further back than that reads its own
part. Reads of all rooms together run at most ``reads`` at a time, and decoding
yields to the event loop between chunks, so heartbeats keep their cadence under a storm
(docs/architecture.md, "Persistence, history and recovery").
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, field

import anyio
import anyio.lowlevel
import msgspec

from ._envelope import Envelope, decode_envelope
from ._stats import Stats
from .brokers._base import Broker, RecentFrames
from .storage._base import Sink

__all__ = ["Cached", "Recoverer"]

# Envelopes decoded between two yields to the event loop (about a millisecond's work).
_DECODE_CHUNK = 256
# Largest sink page a recovery asks for.
_SINK_PAGE = 1000


@dataclass(frozen=True, slots=True)
class Cached:
    """What a room's recent cache held above some position: ``envelopes`` in id order (the
    read sorts them once; each recovery sharing it then cuts its part with a bisection of
    ``ids``), ``oldest`` the id of the first one in cache order, ``truncated`` as the
    backend said (``RecentFrames.truncated``)."""

    envelopes: list[Envelope]
    truncated: bool
    ids: list[str] = field(default_factory=list)
    oldest: str | None = None

    def above(self, since: str) -> list[Envelope]:
        return self.envelopes[bisect_right(self.ids, since) :]


@dataclass(slots=True, eq=False)
class _Flight:
    """One read of one room's recent cache -- and, for recoveries with a sink, of the sink
    pages after it -- shared by every recovery that joined it before it was sent. ``since`` is
    the oldest position a recovery asked; ``whole`` that someone (``history()``) asked for all
    of the cache; ``sink`` that a recovery wants the sink's pages after ``since``."""

    since: str | None = None
    whole: bool = False
    sink: bool = False
    done: anyio.Event = field(default_factory=anyio.Event)
    result: Cached | None = None
    #: The sink's newest rows, in id order, read after the cache back to ``since`` or to
    #: ``max_recover`` rows; ``whole_room`` if that is every row of the room.
    stored: list[Envelope] = field(default_factory=list)
    stored_ids: list[str] = field(default_factory=list)
    whole_room: bool = False

    def covers(self, since: str) -> bool:
        """Whether ``stored`` holds every row the sink had after ``since``."""
        return self.whole_room or bool(self.stored_ids and self.stored_ids[0] <= since)

    error: BaseException | None = None
    abandoned: bool = False  # its runner was cancelled before an answer: waiters ask again

    def widen(self, since: str | None, sink: bool) -> None:
        if since is None:
            self.whole = True
        else:
            if self.since is None or since < self.since:
                self.since = since
            self.sink = self.sink or sink


def _by_id(envelope: Envelope) -> str:
    return envelope.id


class Recoverer:
    """History reads of one router (see the module docstring)."""

    def __init__(
        self, broker: Broker, sink: Sink | None, stats: Stats, max_recover: int, reads: int = 8
    ) -> None:
        self._broker = broker
        self._sink = sink
        self._stats = stats
        self._max_recover = max_recover
        self._reads = reads
        self._gathering: dict[str, _Flight] = {}  # room -> read not sent yet
        self._on_wire: dict[str, _Flight] = {}  # room -> read sent
        self._cache_slots: anyio.CapacityLimiter | None = None
        self._sink_slots: anyio.CapacityLimiter | None = None

    # -- the recent cache -----------------------------------------------------------------------

    async def cached(self, room: str, since: str | None) -> Cached:
        """The room's cached envelopes above ``since`` (all if None), in id order; may hold
        some at or below ``since`` (the caller filters)."""
        if not self._broker.supports_storage:
            return Cached([], False)
        flight = await self._shared(room, since, sink=False)
        assert flight.result is not None
        return flight.result

    async def _shared(self, room: str, since: str | None, *, sink: bool) -> _Flight:
        """The answered flight of ``room`` this caller took part in (see _Flight)."""
        while True:
            flight = self._gathering.get(room)
            if flight is None:
                flight = self._gathering[room] = _Flight()
                flight.widen(since, sink)
                await self._fly(room, flight)
            else:
                flight.widen(since, sink)
                await flight.done.wait()
            if not flight.abandoned:
                break
        if flight.error is not None:
            raise flight.error
        return flight

    async def _fly(self, room: str, flight: _Flight) -> None:
        try:
            ahead = self._on_wire.get(room)
            if ahead is not None:
                await ahead.done.wait()
            if self._cache_slots is None:
                self._cache_slots = anyio.CapacityLimiter(self._reads)
            async with self._cache_slots:
                # From here the read is sent: later recoveries gather behind it.
                if self._gathering.get(room) is flight:
                    del self._gathering[room]
                self._on_wire[room] = flight
                since = flight.since
                if self._broker.supports_storage:
                    flight.result = await self._read(room, None if flight.whole else since)
                else:
                    flight.result = Cached([], False)
                if flight.sink and since is not None:
                    # After the cache, as every recovery must read it (see since()).
                    await self._read_sink_back(room, since, flight)
        except Exception as exc:
            flight.error = exc
        except BaseException:
            flight.abandoned = True  # cancelled: the others ask again, one of them runs it
            raise
        finally:
            if self._gathering.get(room) is flight:
                del self._gathering[room]
            if self._on_wire.get(room) is flight:
                del self._on_wire[room]
            flight.done.set()

    async def in_cache_order(self, room: str, since: str | None) -> list[Envelope]:
        """The room's cached envelopes in the cache's own order (the broker's), from about
        ``since`` (see ``Broker.recent``): what a lost data connection missed is what came
        after the last one delivered *in that order*, which ids from several nodes' clocks do
        not give. Not shared: it runs once per room after a reconnect."""
        if not self._broker.supports_storage:
            return []
        if self._cache_slots is None:
            self._cache_slots = anyio.CapacityLimiter(self._reads)
        async with self._cache_slots:
            frames = await self._broker.recent(room, since=since, limit=self._max_recover)
            return await self._decode(frames)

    async def _read(self, room: str, since: str | None) -> Cached:
        frames = await self._broker.recent(room, since=since, limit=self._max_recover)
        envelopes = await self._decode(frames)
        oldest = envelopes[0].id if envelopes else None
        envelopes.sort(key=_by_id)
        return Cached(envelopes, frames.truncated, [e.id for e in envelopes], oldest)

    async def _decode(self, frames: RecentFrames) -> list[Envelope]:
        """Decode in cache order, yielding now and then; garbage is skipped and counted."""
        stats = self._stats
        stats.dropped_recent_garbage += frames.skipped
        envelopes = []
        for i, frame in enumerate(frames.frames):
            if i and not i % _DECODE_CHUNK:
                await anyio.lowlevel.checkpoint()
            try:
                envelopes.append(decode_envelope(frame))
            except (msgspec.DecodeError, msgspec.ValidationError):
                stats.dropped_recent_garbage += 1
        return envelopes

    # -- the sink -------------------------------------------------------------------------------

    async def _sink_history(
        self, room: str, *, before: str | None, after: str | None, limit: int
    ) -> list[Envelope]:
        assert self._sink is not None
        if self._sink_slots is None:
            self._sink_slots = anyio.CapacityLimiter(self._reads)
        async with self._sink_slots:
            return await self._sink.history(room, before=before, after=after, limit=limit)

    # -- what the router asks -------------------------------------------------------------------

    async def _sink_pages(self, room: str, after: str, want: int) -> list[Envelope]:
        """Up to ``want`` sink rows after ``after``, oldest first, in pages."""
        rows: list[Envelope] = []
        cursor = after
        while len(rows) < want:
            limit = min(_SINK_PAGE, want - len(rows))
            page = await self._sink_history(room, before=None, after=cursor, limit=limit)
            rows.extend(page)
            if len(page) < limit:
                break
            cursor = page[-1].id
        return rows

    async def _read_sink_back(self, room: str, since: str, flight: _Flight) -> None:
        """The sink's newest rows of ``room``, backwards in pages, until the read reaches
        ``since`` or holds ``max_recover`` rows: every recovery whose position it reaches
        finds its whole part in it (in a storm most positions are recent, and one far back
        does not make the others read from it), the others read theirs themselves."""
        assert self._sink is not None
        pages: list[list[Envelope]] = []
        total = 0
        cursor: str | None = None
        while total < self._max_recover:
            limit = min(_SINK_PAGE, self._max_recover - total)
            page = await self._sink.history(room, before=cursor, limit=limit)
            pages.append(page)
            total += len(page)
            if len(page) < limit:
                flight.whole_room = True
                break
            cursor = page[0].id
            if cursor <= since:
                break
        flight.stored = [e for page in reversed(pages) for e in page]
        flight.stored_ids = [e.id for e in flight.stored]

    async def since(self, room: str, since: str) -> tuple[list[Envelope], bool]:
        """Stored messages of ``room`` after ``since`` (sink pages + recent cache), in id
        order, at most ``max_recover``, and whether that is provably all of them."""
        # The cache is read first: what it no longer holds was stored by the time it was read
        # (when the backend says it is not truncated), so the sink, read afterwards, has it.
        # The flight reads both for every recovery that shared it, from the oldest `since`.
        flight = await self._shared(room, since, sink=self._sink is not None)
        assert flight.result is not None
        cached = flight.result
        stored: list[Envelope] = []
        if self._sink is not None:
            if flight.covers(since):
                stored = flight.stored[bisect_right(flight.stored_ids, since) :]
            else:  # further back than the shared read went: this part is its own to read
                stored = await self._sink_pages(room, since, self._max_recover)
        complete = len(stored) < self._max_recover
        recent = cached.above(since)
        if cached.truncated and complete:
            # The cache lost its oldest entries (or the read stopped short of `since`). It
            # still proves the window complete if it reaches back to `since`, or if the sink
            # already holds messages from inside it (the storage worker caught up past the
            # cache's start).
            oldest = cached.oldest
            complete = oldest is not None and (
                oldest <= since or bool(stored and stored[-1].id >= oldest)
            )
        if stored:
            found = {e.id: e for e in stored}
            for e in recent:
                found.setdefault(e.id, e)
            ordered = sorted(found.values(), key=_by_id)
        else:  # already in id order: only repeats (a publish retried with its id) to drop
            ordered = list({e.id: e for e in recent}.values())
        if len(ordered) > self._max_recover:
            ordered, complete = ordered[: self._max_recover], False
        return ordered, complete

    async def history(
        self, room: str, *, before: str | None, after: str | None, limit: int
    ) -> list[Envelope]:
        """Sink and recent cache merged (see ``RoomRouter.history``)."""
        merged: dict[str, Envelope] = {}
        if self._sink is not None:
            for e in await self._sink_history(room, before=before, after=after, limit=limit):
                merged[e.id] = e
        for e in (await self.cached(room, after)).envelopes:
            if (before is None or e.id < before) and (after is None or e.id > after):
                merged.setdefault(e.id, e)
        ordered = sorted(merged.values(), key=_by_id)
        return ordered[:limit] if after is not None else ordered[-limit:]
