"""In-process presence store: the routers of one process share it through a named hub, as
they share a :class:`~roomrouter.brokers.memory.MemoryHub`. Entries die with their router
(a process has no other way for a node to die)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import ClassVar

import anyio
from anyio.streams.memory import MemoryObjectSendStream

from .._errors import BrokerUnavailable
from ..brokers._base import TaskStarter
from ._base import Presence, PresenceEntry, PresenceEvent, PresenceWrite

__all__ = ["MemoryPresence"]

#: Events a watcher may fall behind by before it loses the oldest.
WATCH_BUFFER = 1000


class _Hub:
    hubs: ClassVar[dict[str, _Hub]] = {}

    def __init__(self) -> None:
        # (namespace, room) -> member -> entry; insertion order is join order.
        self.rooms: dict[tuple[str, str], dict[str, PresenceEntry]] = {}
        self.watchers: dict[tuple[str, str], set[MemoryObjectSendStream[PresenceEvent]]] = {}
        self.nodes = 0

    @classmethod
    def named(cls, name: str) -> _Hub:
        hub = cls.hubs.get(name)
        if hub is None:
            hub = cls.hubs[name] = cls()
        return hub

    def emit(self, key: tuple[str, str], event: PresenceEvent) -> int:
        lost = 0
        for stream in list(self.watchers.get(key, ())):
            try:
                stream.send_nowait(event)
            except anyio.WouldBlock:
                lost += 1
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                self.watchers[key].discard(stream)
        return lost


class MemoryPresence(Presence):
    """``MemoryPresence("name")``: the presence store of hub ``name`` (the memory broker's hub
    name by default, so ``memory://chat`` routers share ``MemoryPresence("chat")``)."""

    name = "memory"

    def __init__(self, hub: str = "") -> None:
        self.hub_name = hub
        self._hub: _Hub | None = None
        self._namespace = ""
        self._node = ""
        self.events_lost = 0

    @property
    def _h(self) -> _Hub:
        if self._hub is None:
            raise BrokerUnavailable("memory presence store is not started")
        return self._hub

    async def start(
        self, namespace: str, node_id: str, *, ttl: float, task_group: TaskStarter
    ) -> None:
        self._hub = _Hub.named(self.hub_name)
        self._hub.nodes += 1
        self._namespace, self._node = namespace, node_id

    async def aclose(self) -> None:
        hub = self._hub
        if hub is None:
            return
        await self.forget_node(self._node)
        hub.nodes -= 1
        if not hub.nodes and not hub.rooms and not hub.watchers:
            _Hub.hubs.pop(self.hub_name, None)
        self._hub = None

    async def write(self, changes: Sequence[PresenceWrite]) -> None:
        hub = self._h
        for change in changes:
            key = (self._namespace, change.room)
            entries = hub.rooms.get(key)
            if change.add:
                if entries is None:
                    entries = hub.rooms[key] = {}
                entries[change.entry.member] = change.entry
                self.events_lost += hub.emit(key, PresenceEvent("join", change.room, change.entry))
            elif entries is not None and entries.pop(change.entry.member, None) is not None:
                if not entries:
                    del hub.rooms[key]  # room lifecycle: its last entry took the room with it
                self.events_lost += hub.emit(key, PresenceEvent("leave", change.room, change.entry))

    async def members(self, room: str) -> list[PresenceEntry]:
        return list(self._h.rooms.get((self._namespace, room), {}).values())

    async def refresh(self) -> bool:
        return False  # in one process a node dies only with its router

    async def forget_node(self, node_id: str) -> None:
        hub = self._h
        for (namespace, room), entries in list(hub.rooms.items()):
            if namespace != self._namespace:
                continue
            gone = [e for e in entries.values() if e.node == node_id]
            await self.write([PresenceWrite(False, room, e) for e in gone])

    @asynccontextmanager
    async def watch(self, room: str) -> AsyncIterator[AsyncIterator[PresenceEvent]]:
        hub = self._h
        key = (self._namespace, room)
        send, receive = anyio.create_memory_object_stream[PresenceEvent](WATCH_BUFFER)
        hub.watchers.setdefault(key, set()).add(send)
        try:
            async with receive:
                yield receive
        finally:
            watchers = hub.watchers.get(key)
            if watchers is not None:
                watchers.discard(send)
                if not watchers:
                    del hub.watchers[key]
            send.close()

    async def rooms(self) -> frozenset[str]:
        return frozenset(room for ns, room in self._h.rooms if ns == self._namespace)
