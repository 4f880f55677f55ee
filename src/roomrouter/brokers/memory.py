"""In-process broker: several routers of one process form one cluster through a shared hub.

``memory://`` joins the process-wide default hub, ``memory://name`` an isolated hub of that
name. The hub delivers synchronously, in the publisher's call, so order is the call order and a
subscription is confirmed the moment it is recorded. It is the embedded default (one process,
no service) and the reference backend of the contract suite.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import ClassVar
from urllib.parse import urlsplit

from .._errors import BrokerUnavailable, ConfigurationError
from ._base import Broker, BrokerContext

__all__ = ["MemoryBroker", "MemoryHub"]


class MemoryHub:
    """The shared state of one in-memory cluster: who is subscribed to what, per namespace."""

    _hubs: ClassVar[dict[str, MemoryHub]] = {}

    def __init__(self, name: str) -> None:
        self.name = name
        # (namespace, room) -> node id -> broker; dicts keep subscription order, so delivery
        # order is deterministic.
        self._rooms: dict[tuple[str, str], dict[str, MemoryBroker]] = {}
        self._nodes: dict[str, dict[str, MemoryBroker]] = {}

    @classmethod
    def named(cls, name: str) -> MemoryHub:
        hub = cls._hubs.get(name)
        if hub is None:
            hub = cls._hubs[name] = cls(name)
        return hub

    def subscriptions(self, namespace: str, node_id: str) -> frozenset[str]:
        """Rooms ``node_id`` is subscribed to, read from the hub (the memory broker's truth)."""
        return frozenset(
            room
            for (ns, room), nodes in self._rooms.items()
            if ns == namespace and node_id in nodes
        )

    def _attach(self, broker: MemoryBroker) -> None:
        self._nodes.setdefault(broker.namespace, {})[broker.node_id] = broker

    def _detach(self, broker: MemoryBroker) -> None:
        nodes = self._nodes.get(broker.namespace, {})
        nodes.pop(broker.node_id, None)
        if not nodes:
            self._nodes.pop(broker.namespace, None)
        for key in [k for k, v in self._rooms.items() if broker.node_id in v]:
            self._unsub(key, broker.node_id)
        if not self._nodes:
            MemoryHub._hubs.pop(self.name, None)

    def _sub(self, key: tuple[str, str], broker: MemoryBroker) -> None:
        self._rooms.setdefault(key, {})[broker.node_id] = broker

    def _unsub(self, key: tuple[str, str], node_id: str) -> None:
        nodes = self._rooms.get(key)
        if nodes is not None:
            nodes.pop(node_id, None)
            if not nodes:
                del self._rooms[key]

    def _publish(self, key: tuple[str, str], frame: bytes) -> None:
        for broker in list(self._rooms.get(key, {}).values()):
            broker._deliver_data(frame)

    def _control(self, namespace: str, frame: bytes, to: str | None) -> int:
        nodes = self._nodes.get(namespace, {})
        if to is not None:
            target = nodes.get(to)
            if target is None:
                return 0
            target._deliver_control(frame)
            return 1
        receivers = list(nodes.values())
        for broker in receivers:
            broker._deliver_control(frame)
        return len(receivers)


class MemoryBroker(Broker):
    """A node's handle on a :class:`MemoryHub`."""

    name = "memory"
    counts_receivers = True

    def __init__(self, hub: str | MemoryHub = "") -> None:
        self.hub = hub if isinstance(hub, MemoryHub) else MemoryHub.named(hub)
        self._context: BrokerContext | None = None

    @classmethod
    def from_url(cls, url: str) -> MemoryBroker:
        parts = urlsplit(url)
        if parts.scheme != "memory":
            raise ConfigurationError(f"not a memory:// URL: {url!r}")
        return cls((parts.netloc + parts.path).strip("/"))

    @property
    def node_id(self) -> str:
        return self._ctx.node_id

    @property
    def namespace(self) -> str:
        return self._ctx.namespace

    @property
    def _ctx(self) -> BrokerContext:
        if self._context is None:
            raise BrokerUnavailable("memory broker is not started")
        return self._context

    async def start(self, context: BrokerContext) -> None:
        self._context = context
        self.hub._attach(self)

    async def aclose(self) -> None:
        if self._context is not None:
            self.hub._detach(self)
            self._context = None

    async def subscribe(self, rooms: Collection[str]) -> None:
        ctx = self._ctx
        for room in rooms:
            self.hub._sub((ctx.namespace, room), self)

    async def unsubscribe(self, rooms: Collection[str]) -> None:
        if self._context is None:
            return
        for room in rooms:
            self.hub._unsub((self._context.namespace, room), self._context.node_id)

    async def publish(self, room: str, frame: bytes) -> None:
        self.hub._publish((self._ctx.namespace, room), frame)

    async def publish_control(self, frame: bytes, *, to: str | None = None) -> int | None:
        return self.hub._control(self._ctx.namespace, frame, to)

    async def broker_subscriptions(self) -> frozenset[str]:
        return self.hub.subscriptions(self._ctx.namespace, self._ctx.node_id)

    def _deliver_data(self, frame: bytes) -> None:
        if self._context is not None:
            self._context.on_data(frame)

    def _deliver_control(self, frame: bytes) -> None:
        if self._context is not None:
            self._context.on_control(frame)
