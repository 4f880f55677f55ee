"""The manager's side of Socket.IO connection state recovery: offsets, the emits a client
missed (read from its rooms' recent caches), and the emits held back for a client while those
are being sent, so that it gets both merged in offset order, then goes live.

The server's side (sessions, the CONNECT handshake) is :mod:`._sio_recovery`; the manager
that uses this is :class:`~roomrouter.integrations.socketio.RoomRouterManager`.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias

from .._envelope import validate_id
from .._errors import ConfigurationError
from .._router import RoomRouter
from ._sio_wire import Emit, RoomKey, decode

__all__ = ["Holds", "OffsetIds", "Packet", "Restore", "read_missed"]

#: An emit as a recovering client gets it: (offset, event, args).
Packet: TypeAlias = tuple[str, str, list[Any]]

#: How long a recovered client's node remembers the offsets it sent it while recovering, to
#: not send one again when its envelope reaches the node only afterwards (see Holds.end):
#: far longer than an envelope takes from a room's cache to the node's reader.
_SENT_TTL = 30.0


class OffsetIds:
    """UUIDv7 ids whose 12 ``rand_a`` bits are the sub-millisecond fraction (RFC 9562,
    method 3), strictly increasing here. Offsets of emits made by nodes of one host (or with
    synchronised clocks) then follow the time of the emits to about 0.25 µs; the router's
    ids, with a counter from a random start, leave ids of two nodes in one millisecond
    unordered, which would send a recovered client two nodes' emits out of order."""

    __slots__ = ("_last",)

    def __init__(self) -> None:
        self._last = 0  # milliseconds << 12 | fraction

    def next(self) -> str:
        ns = time.time_ns()
        stamp = ((ns // 1_000_000) << 12) | ((ns % 1_000_000) * 4096 // 1_000_000)
        self._last = stamp = max(stamp, self._last + 1)
        rand = secrets.randbits(62)
        value = ((stamp >> 12) << 80) | (0x7 << 76) | ((stamp & 0xFFF) << 64) | (0b10 << 62) | rand
        h = f"{value:032x}"
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


@dataclass(eq=False, slots=True)
class Restore:
    """A session to restore in ``pre_connect``: its sid and rooms, and the offset after which
    its client missed the room emits. ``recovered`` is set once it was (all missed emits
    found); otherwise the connection was made a new session."""

    sid: str
    rooms: list[RoomKey]
    since: str
    recovered: bool = False


class Holds:
    """The clients being recovered, by (namespace, sid), each with the emits held back for it
    since its restore began; a client is held from :meth:`open` until :meth:`take` finds
    nothing left (or :meth:`drop`). Then, for a while (:meth:`end`), the offsets it was sent
    while held, which the live send must not send it again (:meth:`already_sent`)."""

    __slots__ = ("_by_offset", "_expiry", "_held", "_sent")

    def __init__(self) -> None:
        self._held: dict[tuple[str, str], list[Packet]] = {}
        # Offsets sent while recovering, per client (with the deadline of the entry), and the
        # same indexed by offset: every emit asks, so the answer must not cost a walk over
        # every client a reconnect storm recovered. Deadlines come in order (one TTL), so
        # they expire from the left of _expiry.
        self._sent: dict[tuple[str, str], tuple[float, set[str]]] = {}
        self._by_offset: dict[str, set[tuple[str, str]]] = {}
        self._expiry: deque[tuple[float, tuple[str, str]]] = deque()

    def __bool__(self) -> bool:
        return bool(self._held or self._sent)

    def __contains__(self, key: tuple[str, str]) -> bool:
        return key in self._held

    def open(self, namespace: str, sid: str) -> None:
        self._held[namespace, sid] = []
        self._forget((namespace, sid))

    def drop(self, namespace: str, sid: str) -> None:
        self._held.pop((namespace, sid), None)
        self._forget((namespace, sid))

    def _forget(self, key: tuple[str, str]) -> None:
        entry = self._sent.pop(key, None)
        if entry is None:
            return
        for offset in entry[1]:
            keys = self._by_offset.get(offset)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._by_offset[offset]

    def _expire(self, now: float) -> None:
        expiry = self._expiry
        while expiry and expiry[0][0] < now:
            deadline, key = expiry.popleft()
            entry = self._sent.get(key)
            if entry is not None and entry[0] == deadline:  # not replaced by a later end()
                self._forget(key)

    def end(self, namespace: str, sid: str, sent: set[str]) -> None:
        """The client's hold ended (:meth:`take` found nothing) after it was sent the emits
        with offsets ``sent``. An emit it missed was read from its room's cache, which a
        publish fills before the envelope reaches this node's reader (and a delivery batch
        holds it back further): such an envelope may be handled here only after the hold
        ended, and the client must not get it a second time."""
        now = time.monotonic()
        self._expire(now)
        key = (namespace, sid)
        self._forget(key)
        if sent:
            deadline = now + _SENT_TTL
            self._sent[key] = (deadline, set(sent))
            self._expiry.append((deadline, key))
            for offset in sent:
                self._by_offset.setdefault(offset, set()).add(key)

    def already_sent(
        self,
        namespace: str,
        members: Mapping[Any, Iterable[str]],
        rooms: list[RoomKey],
        offset: str,
    ) -> list[str]:
        """The clients of ``namespace`` in one of ``rooms`` that were sent the emit with
        ``offset`` while recovering (each is told once: the offset is then forgotten)."""
        self._expire(time.monotonic())
        keys = self._by_offset.get(offset)
        if not keys:
            return []
        found = []
        for key in list(keys):
            held_ns, sid = key
            if held_ns != namespace or not any(sid in members.get(room, ()) for room in rooms):
                continue
            found.append(sid)
            keys.discard(key)
            sent = self._sent[key][1]
            sent.discard(offset)
            if not sent:
                del self._sent[key]
        if not keys:
            del self._by_offset[offset]
        return found

    def prepend(self, namespace: str, sid: str, packets: list[Packet]) -> None:
        """Put ``packets`` (the missed ones) before what was held back meanwhile."""
        self._held[namespace, sid][:0] = packets

    def divert(
        self,
        namespace: str,
        members: Mapping[Any, Iterable[str]],
        rooms: list[RoomKey],
        skip: list[str],
        packet: Packet,
    ) -> list[str]:
        """Hold ``packet`` back for every held client of ``namespace`` that is in one of
        ``rooms`` (by ``members``: room -> sids) and not in ``skip``; return their sids, which
        the live send must skip."""
        diverted = []
        for (held_ns, sid), held in self._held.items():
            if held_ns != namespace or sid in skip:
                continue
            if any(sid in members.get(room, ()) for room in rooms):
                held.append(packet)
                diverted.append(sid)
        return diverted

    def take(self, namespace: str, sid: str) -> list[Packet] | None:
        """What is held for the client now (then empty), or None if nothing is: its hold ends
        then, with no await since the check, so nothing can slip past."""
        held = self._held.get((namespace, sid))
        if not held:
            self._held.pop((namespace, sid), None)
            return None
        packets = list(held)
        held.clear()
        return packets


async def read_missed(
    router: RoomRouter, names: list[str], sid: str, since: str
) -> list[Packet] | None:
    """The emits to roomrouter rooms ``names`` with an offset after ``since`` that ``sid`` was
    not skipped from, once each (an emit to several rooms is in each), in offset order; None if
    a room's recent cache may have lost some."""
    try:
        validate_id(since)  # a forged offset: not recoverable, a new session
    except ConfigurationError:
        return None
    reads = await asyncio.gather(*(router.recover(name, since) for name in names))
    found: dict[str, Packet] = {}
    for envelopes, complete in reads:
        if not complete:
            return None
        for envelope in envelopes:
            message = decode(envelope.payload)
            if (
                isinstance(message, Emit)
                and message.offset is not None
                and message.offset > since
                and message.ack is None
                and sid not in message.skip
            ):
                found[message.offset] = (message.offset, message.event, message.args)
    return [found[offset] for offset in sorted(found)]
