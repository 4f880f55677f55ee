"""A broker wrapper that makes the control plane misbehave on purpose, for race and fault tests.

``ControlFault(inner)`` delegates everything to a real broker (any backend) but sits between
the broker and the router's control handler: it can delay every incoming control frame (a slow
link: a join barrier then really waits), drop the next frames of one kind (frames lost while a
connection was down), and fake a reconnect (the router then says Hello again). Its recent
reads can be held in flight and made to fail.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from typing import Any

import anyio

from roomrouter import Broker
from roomrouter._cluster import _decoder
from roomrouter.brokers._base import BrokerContext, RecentFrames, StorageConsumer

__all__ = ["ControlFault"]


class ControlFault(Broker):
    name = "control-fault"

    def __init__(self, inner: Broker, *, delay: float = 0.0) -> None:
        self.inner = inner
        self.delay = delay
        self.drop_next: dict[type, int] = {}  # frame class -> how many of the next ones to drop
        self.drop_all: set[type] = set()  # frame classes dropped while listed
        self.blackout = False  # drop every control frame (a node that hears nothing)
        self.dropped: list[Any] = []
        self._context: BrokerContext | None = None
        self.recent_error: Exception | None = None  # what recent() raises while set
        self.recent_reads = 0
        #: While set, recent() waits for this event before it answers (or fails): a recovery
        #: held in flight, so that the test can act meanwhile.
        self.recent_hold: anyio.Event | None = None

    # -- faults ---------------------------------------------------------------------------------

    def fake_reconnect(self) -> None:
        assert self._context is not None
        self._context.on_reconnect()

    def _on_control(self, frame: bytes) -> None:
        assert self._context is not None
        try:
            msg = _decoder.decode(frame)
        except Exception:
            msg = None
        kind = type(msg)
        if self.blackout or kind in self.drop_all:
            self.dropped.append(msg)
            return
        if self.drop_next.get(kind, 0) > 0:
            self.drop_next[kind] -= 1
            self.dropped.append(msg)
            return
        if self.delay <= 0:
            self._context.on_control(frame)
            return
        try:
            self._send.send_nowait((anyio.current_time() + self.delay, frame))
        except anyio.WouldBlock:  # pragma: no cover - the buffer is large for tests
            raise AssertionError("ControlFault buffer overflow") from None

    async def _deliver_late(self, context: BrokerContext) -> None:
        async for due, frame in self._recv:
            await anyio.sleep(max(due - anyio.current_time(), 0))
            context.on_control(frame)

    # -- delegation -----------------------------------------------------------------------------

    @property
    def filtered(self) -> int:  # type: ignore[override]
        return self.inner.filtered

    @property
    def supports_storage(self) -> bool:  # type: ignore[override]
        return self.inner.supports_storage

    @property
    def supports_direct(self) -> bool:  # type: ignore[override]
        return self.inner.supports_direct

    async def start(self, context: BrokerContext) -> None:
        self._context = context
        self._send, self._recv = anyio.create_memory_object_stream[tuple[float, bytes]](100_000)
        context.task_group.start_soon(self._deliver_late, context)
        await self.inner.start(dataclasses.replace(context, on_control=self._on_control))

    async def aclose(self) -> None:
        await self.inner.aclose()
        self._send.close()
        self._recv.close()

    async def subscribe(self, rooms: Collection[str]) -> None:
        await self.inner.subscribe(rooms)

    async def unsubscribe(self, rooms: Collection[str]) -> None:
        await self.inner.unsubscribe(rooms)

    async def publish(self, room: str, frame: bytes, *, to: Collection[str] | None = None) -> None:
        await self.inner.publish(room, frame, to=to)

    async def publish_control(self, frame: bytes, *, to: str | None = None) -> int | None:
        return await self.inner.publish_control(frame, to=to)

    async def publish_persistent(
        self, room: str, frame: bytes, *, live: bool, to: Collection[str] | None = None
    ) -> None:
        await self.inner.publish_persistent(room, frame, live=live, to=to)

    async def recent(
        self, room: str, *, since: str | None = None, limit: int | None = None
    ) -> RecentFrames:
        self.recent_reads += 1
        if self.recent_hold is not None:
            await self.recent_hold.wait()
        if self.recent_error is not None:
            raise self.recent_error
        return await self.inner.recent(room, since=since, limit=limit)

    def storage_consumer(self, namespace: str, consumer: str) -> StorageConsumer:
        return self.inner.storage_consumer(namespace, consumer)

    async def broker_subscriptions(self) -> frozenset[str]:
        return await self.inner.broker_subscriptions()

    def __getattr__(self, name: str) -> Any:
        # Backend-specific probes the tests' backends use (server_channels, client_name, ...).
        return getattr(self.inner, name)
