"""The storage worker: moves envelopes from a backend's storage queue into a sink.

Several workers on one namespace are competing consumers: each frame is handed to one of
them, and to another one if its holder dies before acknowledging it. A worker acknowledges a
batch only after the sink committed it, and the sink writes idempotently by envelope id, so
every persisted message is stored exactly once even across crashes (DESIGN.md guarantee 6).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass

import anyio
import msgspec

from .._envelope import Envelope, decode_envelope
from .._errors import ConfigurationError, RoomRouterError
from ..brokers._base import StorageConsumer, StoredFrame
from ._base import Sink

__all__ = ["StorageWorker", "WorkerStats"]

log = logging.getLogger("roomrouter.worker")


@dataclass(slots=True)
class WorkerStats:
    batches: int = 0
    received: int = 0
    written: int = 0  # rows the sink newly inserted (duplicates of redelivered frames excluded)
    acked: int = 0
    dropped_decode: int = 0
    sink_errors: int = 0
    queue_errors: int = 0


async def _shielded(close: Callable[[], Awaitable[None]]) -> None:
    with anyio.CancelScope(shield=True):
        await close()


class StorageWorker:
    """Consume ``consumer`` into ``sink`` in batches of up to ``batch_size`` frames, each written
    at most ``max_delay`` seconds after its first frame arrived.

    ``await worker.run()`` works until cancelled or until :meth:`stop`; ``stop`` lets the batch
    in hand be written and acknowledged first (graceful shutdown), while a cancelled worker
    leaves it to be redelivered. A sink that fails is retried
    with capped exponential backoff, holding the batch: nothing is acknowledged, so nothing is
    lost. Frames that are not envelopes are counted, logged and acknowledged (they can never be
    stored).
    """

    def __init__(
        self,
        consumer: StorageConsumer,
        sink: Sink,
        *,
        batch_size: int = 500,
        max_delay: float = 0.2,
        max_backoff: float = 5.0,
    ) -> None:
        if batch_size < 1 or max_delay < 0:
            raise ConfigurationError("batch_size must be >= 1 and max_delay >= 0")
        self.consumer = consumer
        self.sink = sink
        self.batch_size = batch_size
        self.max_delay = max_delay
        self.max_backoff = max_backoff
        self.stats = WorkerStats()
        self._stopping = False
        self.idle = anyio.Event()  # set whenever a fetch found the queue empty

    @classmethod
    def from_urls(
        cls,
        broker_url: str,
        namespace: str,
        sink_url: str,
        *,
        name: str | None = None,
        **options: float,
    ) -> StorageWorker:
        """``StorageWorker.from_urls("redis://127.0.0.1:6379/0", "chat", "sqlite:///chat.db")``."""
        from .._urls import broker_from_url
        from ._urls import sink_from_url

        broker = broker_from_url(broker_url)
        if not broker.supports_storage:
            raise ConfigurationError(f"the {broker.name} backend has no storage queue")
        name = name or f"{socket.gethostname()}-{os.getpid()}"
        return cls(broker.storage_consumer(namespace, name), sink_from_url(sink_url), **options)  # type: ignore[arg-type]

    def stop(self) -> None:
        """Finish the batch in hand, then return from :meth:`run`."""
        self._stopping = True

    async def run(self) -> None:
        async with AsyncExitStack() as stack:
            # Closing is shielded: a cancelled (crashed-in-test, or shut-down) worker must still
            # release its connections; what it held unacknowledged is redelivered anyway.
            stack.push_async_callback(_shielded, self.consumer.aclose)
            await self.consumer.start()
            stack.push_async_callback(_shielded, self.sink.aclose)
            await self.sink.start()
            while not self._stopping:
                batch = await self._collect()
                if batch:
                    # Cancelled here, the batch is simply redelivered later (it is not acked);
                    # stop() instead lets it finish.
                    await self._store(batch)

    async def _collect(self) -> list[StoredFrame]:
        batch: list[StoredFrame] = []
        deadline: float | None = None
        backoff = 0.05
        while len(batch) < self.batch_size and not self._stopping:
            now = anyio.current_time()
            if deadline is not None and now >= deadline:
                break
            wait = self.max_delay if deadline is None else deadline - now
            try:
                frames = await self.consumer.fetch(self.batch_size - len(batch), max(wait, 0.001))
            except RoomRouterError as exc:
                self.stats.queue_errors += 1
                log.warning("storage queue fetch failed (%s); retrying in %.2fs", exc, backoff)
                await anyio.sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff)
                continue
            backoff = 0.05
            if not frames:
                if batch:
                    break
                self.idle.set()
                self.idle = anyio.Event()
                continue
            batch.extend(frames)
            if deadline is None:
                deadline = anyio.current_time() + self.max_delay
        return batch

    async def _store(self, batch: list[StoredFrame]) -> None:
        self.stats.batches += 1
        self.stats.received += len(batch)
        envelopes: list[Envelope] = []
        for item in batch:
            try:
                envelopes.append(decode_envelope(item.frame))
            except (msgspec.DecodeError, msgspec.ValidationError):
                self.stats.dropped_decode += 1
                log.error(
                    "storage queue frame is not an envelope; dropped (%d bytes)", len(item.frame)
                )
        backoff = 0.1
        while envelopes:
            try:
                self.stats.written += await self.sink.write(envelopes)
                break
            except RoomRouterError as exc:
                self.stats.sink_errors += 1
                log.warning("sink write of %d envelope(s) failed (%s); retry in %.1fs",
                            len(envelopes), exc, backoff)  # fmt: skip
                await anyio.sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff)
        try:
            await self.consumer.ack(batch)
            self.stats.acked += len(batch)
        except RoomRouterError as exc:
            # Stored but not acknowledged: redelivered later and written again as a no-op.
            self.stats.queue_errors += 1
            log.warning("acknowledging %d frame(s) failed: %s", len(batch), exc)
