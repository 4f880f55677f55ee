"""The contract of a presence store: who is in which room, cluster-wide.

A router with a presence store writes an entry when one of its members joins a room and removes
it when the member leaves (or closes); :meth:`RoomRouter.presence` reads a room's entries and
:meth:`RoomRouter.watch_presence` streams its join and leave events. The store is chosen apart
from the broker (``presence="redis://..."`` beside an ``amqp://`` broker is one deployment).

Guarantees a store gives (``tests/test_presence.py`` checks them for every store):

1. **Read your writes, eventually everyone's.** A router's own writes are applied in the order
   it made them; :meth:`Presence.members` on that router reflects them once they are written
   (the router waits for its pending writes before it reads). Other routers see them one
   round trip later.
2. **Entries die with their node.** Every node refreshes its liveness every heartbeat; entries
   of a node not refreshed within its TTL are not returned, and are removed (with a leave
   event) by whoever notices first. A killed node's members vanish within its TTL.
3. **Room lifecycle.** A room's state in the store is removed when its last entry is.
4. **Events.** Every entry added yields one ``join`` event and every entry removed one
   ``leave`` event, to every watcher of the room at that time; a watcher may miss events
   while its connection is down (live, at-most-once, like messages): re-read
   :meth:`~Presence.members` after a reconnect.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager
from typing import ClassVar, Literal

import msgspec

from ..brokers._base import TaskStarter

__all__ = ["Presence", "PresenceEntry", "PresenceEvent", "PresenceWrite"]


class PresenceEntry(msgspec.Struct, frozen=True, array_like=True):
    """One member in one room: its id, the node it is connected to, when it joined (Unix
    time) and the app's data for it (``router.member(id, info={"name": "Alice"})``)."""

    member: str
    node: str
    since: float
    info: dict[str, str] = {}


class PresenceEvent(msgspec.Struct, frozen=True, array_like=True):
    """A member joined or left ``room`` (left includes: its node died)."""

    kind: Literal["join", "leave"]
    room: str
    entry: PresenceEntry


class PresenceWrite(msgspec.Struct, frozen=True):
    """One change a router asks its store to apply: add ``entry`` to ``room``, or remove the
    entry of ``entry.member`` from it."""

    add: bool
    room: str
    entry: PresenceEntry


class Presence(ABC):
    """A presence store for one node of one namespace. One instance serves one router."""

    #: Short store name (``"memory"``, ``"redis"``).
    name: ClassVar[str]

    @abstractmethod
    async def start(
        self, namespace: str, node_id: str, *, ttl: float, task_group: TaskStarter
    ) -> None:
        """Connect and mark this node alive for ``ttl`` seconds. Background tasks go into
        ``task_group`` (the router's). Raises :class:`~roomrouter.BrokerUnavailable`."""

    @abstractmethod
    async def aclose(self) -> None:
        """Remove this node's entries (with leave events) if the store is reachable, and
        disconnect."""

    @abstractmethod
    async def write(self, changes: Sequence[PresenceWrite]) -> None:
        """Apply ``changes`` in order (one round trip where the store allows) and emit their
        events. Raises :class:`~roomrouter.BrokerUnavailable`; then none may be applied."""

    @abstractmethod
    async def members(self, room: str) -> list[PresenceEntry]:
        """The live entries of ``room``, oldest first."""

    @abstractmethod
    async def refresh(self) -> bool:
        """Mark this node alive for another TTL (called every heartbeat interval). True if it
        had been presumed dead meanwhile (a stall past the TTL): its entries may have been
        removed, and the router writes them again."""

    @abstractmethod
    async def forget_node(self, node_id: str) -> None:
        """Remove the entries of a node found dead (with leave events); idempotent, and safe
        when several nodes do it at once."""

    @abstractmethod
    def watch(self, room: str) -> AbstractAsyncContextManager[AsyncIterator[PresenceEvent]]:
        """``async with store.watch(room) as events: async for event in events: ...``

        Events arrive in the order the store applied them. The iterator buffers a bounded
        number of events; a watcher that falls further behind loses the oldest (counted by
        the store) rather than stalling the store.
        """

    async def rooms(self) -> frozenset[str]:
        """Rooms with entries (for ``roomrouter inspect``); stores that cannot list them
        raise ``NotImplementedError``."""
        raise NotImplementedError
