"""In-process broker: several routers of one process form one cluster through a shared hub.

``memory://`` joins the process-wide default hub, ``memory://name`` an isolated hub of that
name. The hub delivers synchronously, in the publisher's call, so order is the call order and a
subscription is confirmed the moment it is recorded. It is the embedded default (one process,
no service) and the reference backend of the contract suite.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import ClassVar
from urllib.parse import parse_qsl, urlsplit

import anyio

from .._errors import BrokerUnavailable, ConfigurationError
from .._urls import redact
from ._base import (
    Broker,
    BrokerContext,
    RecentFrames,
    RecentScan,
    StorageConsumer,
    StoredFrame,
)

__all__ = ["MemoryBroker", "MemoryHub"]


@dataclass(slots=True)
class _StorageQueue:
    """The in-process storage queue of one namespace: frames wait in ``ready``; a fetched frame
    sits in ``pending`` (seq -> consumer, frame, fetched at) until acknowledged, and is handed
    to another consumer once it was pending longer than the redelivery time."""

    ready: deque[tuple[int, bytes]] = field(default_factory=deque)
    pending: dict[int, tuple[str, bytes, float]] = field(default_factory=dict)
    seq: int = 0
    arrived: anyio.Event = field(default_factory=anyio.Event)

    def put(self, frame: bytes) -> None:
        self.seq += 1
        self.ready.append((self.seq, frame))
        self.arrived.set()
        self.arrived = anyio.Event()


@dataclass(slots=True)
class _Recent:
    frames: deque[bytes]
    truncated: bool = False


class MemoryHub:
    """The shared state of one in-memory cluster: who is subscribed to what, per namespace."""

    _hubs: ClassVar[dict[str, MemoryHub]] = {}

    def __init__(self, name: str) -> None:
        self.name = name
        # (namespace, room) -> node id -> broker; dicts keep subscription order, so delivery
        # order is deterministic.
        self._rooms: dict[tuple[str, str], dict[str, MemoryBroker]] = {}
        self._nodes: dict[str, dict[str, MemoryBroker]] = {}
        self._stores: dict[str, _StorageQueue] = {}
        self._recent: dict[tuple[str, str], _Recent] = {}

    def store(self, namespace: str) -> _StorageQueue:
        queue = self._stores.get(namespace)
        if queue is None:
            queue = self._stores[namespace] = _StorageQueue()
        return queue

    def _append_recent(self, key: tuple[str, str], frame: bytes, size: int) -> None:
        recent = self._recent.get(key)
        if recent is None:
            recent = self._recent[key] = _Recent(deque(maxlen=size))
        if len(recent.frames) == recent.frames.maxlen:
            recent.truncated = True
        recent.frames.append(frame)

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
        # A hub lives while it has nodes or stored frames not yet taken by a storage worker.
        if not self._nodes and not any(q.ready or q.pending for q in self._stores.values()):
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
            broker._deliver_data(key[1], frame)

    def _direct(self, namespace: str, to: Collection[str], frame: bytes) -> None:
        nodes = self._nodes.get(namespace, {})
        for node in to:
            target = nodes.get(node)
            if target is not None:
                target._deliver_direct(frame)

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
    supports_storage = True
    supports_direct = True

    def __init__(
        self,
        hub: str | MemoryHub = "",
        *,
        recent_size: int = 1000,
        redelivery_after: float = 30.0,
    ) -> None:
        self.hub = hub if isinstance(hub, MemoryHub) else MemoryHub.named(hub)
        self.recent_size = recent_size
        self.redelivery_after = redelivery_after
        self._context: BrokerContext | None = None

    @classmethod
    def from_url(cls, url: str) -> MemoryBroker:
        """``memory://[name][?recent_size=1000&redelivery_after=30]``."""
        parts = urlsplit(url)
        if parts.scheme != "memory":
            raise ConfigurationError(f"not a memory:// URL: {redact(url)!r}")
        options: dict[str, float] = {}
        for key, value in parse_qsl(parts.query):
            if key not in ("recent_size", "redelivery_after"):
                raise ConfigurationError(f"unknown option {key!r} in {redact(url)!r}")
            try:
                options[key] = float(value)
            except ValueError as exc:
                raise ConfigurationError(f"bad {key} in {redact(url)!r}") from exc
        return cls(
            (parts.netloc + parts.path).strip("/"),
            recent_size=int(options.get("recent_size", 1000)),
            redelivery_after=options.get("redelivery_after", 30.0),
        )

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

    async def publish(self, room: str, frame: bytes, *, to: Collection[str] | None = None) -> None:
        if to is None:
            self.hub._publish((self._ctx.namespace, room), frame)
        else:
            self.hub._direct(self._ctx.namespace, to, frame)

    async def publish_control(self, frame: bytes, *, to: str | None = None) -> int | None:
        return self.hub._control(self._ctx.namespace, frame, to)

    async def broker_subscriptions(self) -> frozenset[str]:
        return self.hub.subscriptions(self._ctx.namespace, self._ctx.node_id)

    async def publish_persistent(
        self, room: str, frame: bytes, *, live: bool, to: Collection[str] | None = None
    ) -> None:
        namespace = self._ctx.namespace
        self.hub.store(namespace).put(frame)
        self.hub._append_recent((namespace, room), frame, self.recent_size)
        if not live:
            return
        if to is None:
            self.hub._publish((namespace, room), frame)
        else:
            self.hub._direct(namespace, to, frame)

    async def recent(
        self, room: str, *, since: str | None = None, limit: int | None = None
    ) -> RecentFrames:
        recent = self.hub._recent.get((self._ctx.namespace, room))
        if recent is None:
            return RecentFrames([], truncated=False)
        scan = RecentScan(since, limit)
        for frame in reversed(recent.frames):  # no await in between: one consistent view
            if not scan.add(frame):
                break
        return scan.result(evicted=recent.truncated)

    def storage_consumer(self, namespace: str, consumer: str) -> StorageConsumer:
        return _MemoryConsumer(self.hub, namespace, consumer, self.redelivery_after)

    def _deliver_data(self, room: str, frame: bytes) -> None:
        if self._context is not None:
            self._context.on_data(room, frame)

    def _deliver_control(self, frame: bytes) -> None:
        if self._context is not None:
            self._context.on_control(frame)

    def _deliver_direct(self, frame: bytes) -> None:
        if self._context is not None:
            self._context.on_direct(frame)


class _MemoryConsumer(StorageConsumer):
    def __init__(self, hub: MemoryHub, namespace: str, name: str, redelivery_after: float) -> None:
        self._hub = hub
        self._queue = hub.store(namespace)
        self._name = name
        self._redelivery_after = redelivery_after

    async def start(self) -> None:
        pass

    async def aclose(self) -> None:
        pass  # what this consumer holds is redelivered after the redelivery time, as on a crash

    async def fetch(self, max_frames: int, wait: float) -> list[StoredFrame]:
        queue = self._queue
        with anyio.move_on_after(wait):
            while True:
                now = anyio.current_time()
                taken: list[StoredFrame] = []
                for seq, (_, frame, since) in list(queue.pending.items()):
                    if len(taken) >= max_frames:
                        break
                    if now - since >= self._redelivery_after:  # its holder is presumed dead
                        queue.pending[seq] = (self._name, frame, now)
                        taken.append(StoredFrame(frame, seq))
                while queue.ready and len(taken) < max_frames:
                    seq, frame = queue.ready.popleft()
                    queue.pending[seq] = (self._name, frame, now)
                    taken.append(StoredFrame(frame, seq))
                if taken:
                    return taken
                arrived = queue.arrived
                with anyio.move_on_after(self._redelivery_after if queue.pending else 3600):
                    await arrived.wait()
        return []

    async def ack(self, frames: Sequence[StoredFrame]) -> None:
        for item in frames:
            self._queue.pending.pop(item.token, None)  # type: ignore[call-overload]

    async def pending(self) -> int:
        return len(self._queue.ready) + len(self._queue.pending)
