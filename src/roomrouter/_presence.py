"""The router's side of presence: its writes, in order, off the join path.

A join or a leave only appends a write to a queue (no I/O on the caller's path, so presence
costs joins nothing); one writer task applies the queue in batches, in order, retrying with
backoff while the store is unreachable (the queue is bounded: past ``max_queue`` the oldest
writes are dropped and counted). :meth:`flush` waits until every write queued before it was
applied, which gives a router's own reads its own writes. A refresh task keeps the node alive
in the store and, if the store had presumed it dead (a stall past the TTL), writes the node's
entries again. Nodes the cluster view drops are forgotten in the store.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable

import anyio

from ._errors import RoomRouterError
from ._stats import Stats
from .brokers._base import TaskStarter
from .brokers.transport import Backoff
from .presence._base import Presence, PresenceEntry, PresenceWrite

__all__ = ["PresenceKeeper"]

log = logging.getLogger("roomrouter.presence")


class PresenceKeeper:
    def __init__(
        self,
        store: Presence,
        node_id: str,
        stats: Stats,
        *,
        local_entries: Callable[[], Iterable[tuple[str, PresenceEntry]]],
        heartbeat_interval: float,
        ttl: float,
        max_batch: int = 500,
        max_queue: int = 100_000,
    ) -> None:
        #: How long a read waits for this node's own writes, and a close for the queue.
        self.flush_timeout = ttl
        self.store = store
        self.node_id = node_id
        self._stats = stats
        self._local_entries = local_entries
        self._interval = heartbeat_interval
        self._ttl = ttl
        self._max_batch = max_batch
        self._queue: deque[PresenceWrite] = deque()
        self._max_queue = max_queue
        self._forget: set[str] = set()
        self._queued = 0  # writes ever queued (dropped ones included)
        self._applied = 0  # of those, how many are done with (applied or dropped)
        self._wake = anyio.Event()
        self._progress = anyio.Event()

    async def start(self, namespace: str, task_group: TaskStarter) -> None:
        await self.store.start(namespace, self.node_id, ttl=self._ttl, task_group=task_group)

    # -- called by the router (never blocks) ------------------------------------------------------

    def add(self, room: str, entry: PresenceEntry) -> None:
        self._put(PresenceWrite(True, room, entry))

    def remove(self, room: str, entry: PresenceEntry) -> None:
        self._put(PresenceWrite(False, room, entry))

    def forget_node(self, node_id: str) -> None:
        self._forget.add(node_id)
        self._wake.set()

    def _put(self, write: PresenceWrite) -> None:
        if len(self._queue) >= self._max_queue:
            self._queue.popleft()
            self._stats.presence_dropped += 1
            self._done(1)
        self._queue.append(write)
        self._queued += 1
        self._wake.set()

    def _done(self, count: int) -> None:
        self._applied += count
        self._progress.set()
        self._progress = anyio.Event()

    async def flush(self) -> None:
        """Wait (at most ``flush_timeout`` s) until every write queued so far was applied."""
        target = self._queued
        with anyio.move_on_after(self.flush_timeout):
            while self._applied < target:
                await self._progress.wait()

    # -- tasks ------------------------------------------------------------------------------------

    async def run_writer(self) -> None:
        backoff = Backoff(0.05, 5.0)
        while True:
            if not self._queue and not self._forget:
                await self._wake.wait()
                self._wake = anyio.Event()
                continue
            try:
                while self._forget:
                    node = next(iter(self._forget))
                    await self.store.forget_node(node)
                    self._forget.discard(node)
                batch = [self._queue[i] for i in range(min(self._max_batch, len(self._queue)))]
                if batch:
                    await self.store.write(batch)
                    for _ in batch:
                        self._queue.popleft()
                    self._stats.presence_writes += len(batch)
                    self._done(len(batch))
                backoff.reset()
            except RoomRouterError as exc:
                self._stats.presence_errors += 1
                delay = backoff.next()
                log.warning("node %s: presence store write failed (%s); retrying in %.1fs",
                            self.node_id, exc, delay)  # fmt: skip
                await anyio.sleep(delay)

    async def run_refresh(self) -> None:
        while True:
            await anyio.sleep(self._interval)
            try:
                presumed_dead = await self.store.refresh()
            except RoomRouterError as exc:
                self._stats.presence_errors += 1
                log.warning("node %s: presence refresh failed: %s", self.node_id, exc)
                continue
            if presumed_dead:
                log.warning("node %s: the presence store had presumed this node dead; "
                            "writing its entries again", self.node_id)  # fmt: skip
                for room, entry in self._local_entries():
                    self.add(room, entry)

    async def close(self) -> None:
        """Apply what is queued (bounded), then let the store remove this node's entries."""
        await self.flush()
        with anyio.CancelScope(shield=True):
            try:
                await self.store.aclose()
            except RoomRouterError as exc:
                log.info("node %s: closing the presence store: %s", self.node_id, exc)
