"""The storage worker: moves envelopes from a backend's storage queue into a sink.

Several workers on one namespace are competing consumers: each frame is handed to one of
them, and to another one if its holder dies before acknowledging it. A worker acknowledges a
batch only after the sink committed it, and the sink writes idempotently by envelope id, so
every persisted message is stored exactly once even across crashes (docs/architecture.md,
guarantee 6).

What cannot be stored never blocks what can: a frame that is not an envelope, has the wrong
shape, or that the sink refuses (:class:`~roomrouter.SinkRefused`; a refused batch is bisected
to find the rows at fault) is kept as a *dead letter* in the sink's dead-letter table with its
reason, and acknowledged. A sink that is *unavailable* (plain :class:`~roomrouter.SinkError`)
is retried with the batch held and nothing acknowledged. When the broker reports that the
storage queue itself vanished and was recreated (:class:`~roomrouter.StorageQueueLost`), the
worker counts the loss window (``queue_recreated``), logs it once as an error and goes on.

A worker that makes no progress says so. Progress is a batch acknowledged, or a fetch that
found nothing to do; when neither happened for ``stall_after`` seconds while the worker kept
failing (every fetch or acknowledgement failed, or the sink would not take the batch in hand),
it logs one ERROR and counts a stall (``stalls``, the ``roomrouter_worker_stalls_total``
metric), and logs again when it moves on. Retrying an outage in silence is how acknowledged
messages go unstored.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass

import anyio
import msgspec

from .._envelope import Envelope, decode_envelope, validate_room
from .._errors import ConfigurationError, RoomRouterError, SinkRefused, StorageQueueLost
from ..brokers._base import StorageConsumer, StoredFrame
from ._base import DeadLetter, Sink

__all__ = ["StorageWorker", "WorkerStats"]

log = logging.getLogger("roomrouter.worker")


@dataclass(slots=True)
class WorkerStats:
    batches: int = 0
    received: int = 0
    written: int = 0  # rows the sink newly inserted (duplicates of redelivered frames excluded)
    acked: int = 0
    dropped_decode: int = 0  # frames that are not envelopes (each one also a dead letter)
    sink_errors: int = 0  # failed sink calls (unavailable or refused)
    queue_errors: int = 0
    dead_lettered: int = 0  # frames set aside in the dead-letter table, then acknowledged
    refused: int = 0  # of those, envelopes the sink refused
    queue_recreated: int = 0  # storage queue found gone and recreated: each one a loss window
    abandoned: int = 0  # frames left unacknowledged at stop (they are redelivered)
    stalls: int = 0  # times nothing was stored nor fetched for stall_after s (each logged ERROR)


_MAX_REASON = 500  # characters of a driver's message kept per dead letter


class StorageWorker:
    """Consume ``consumer`` into ``sink`` in batches of up to ``batch_size`` frames, each written
    at most ``max_delay`` seconds after its first frame arrived.

    ``await worker.run()`` works until cancelled or until :meth:`stop`. ``stop`` lets the batch
    in hand be written and acknowledged if the sink takes it; if the sink is failing, the batch
    is left unacknowledged (redelivered) at once, and whatever the worker is doing, ``run``
    returns within ``stop_timeout`` seconds of ``stop`` (plus closing the connections, itself
    bounded by ``stop_timeout``). A cancelled worker leaves its batch to be redelivered.

    A sink that is unavailable is retried with capped exponential backoff (up to
    ``max_backoff``), holding the batch: nothing is acknowledged, so nothing is lost. Frames
    that cannot be stored become dead letters (see the module docstring); ``name`` is recorded
    with them. Failing for ``stall_after`` seconds without progress is a *stall*: logged as an
    ERROR and counted (see the module docstring).
    """

    def __init__(
        self,
        consumer: StorageConsumer,
        sink: Sink,
        *,
        batch_size: int = 500,
        max_delay: float = 0.2,
        max_backoff: float = 5.0,
        stop_timeout: float = 5.0,
        stall_after: float = 30.0,
        name: str = "",
    ) -> None:
        if batch_size < 1 or max_delay < 0 or stop_timeout < 0 or stall_after <= 0:
            raise ConfigurationError(
                "batch_size must be >= 1, max_delay and stop_timeout >= 0, stall_after > 0"
            )
        self.consumer = consumer
        self.sink = sink
        self.batch_size = batch_size
        self.max_delay = max_delay
        self.max_backoff = max_backoff
        self.stop_timeout = stop_timeout
        self.stall_after = stall_after
        self.name = name
        self.stats = WorkerStats()
        self._stopping = False
        self._stop_event: anyio.Event | None = None
        self._scope: anyio.CancelScope | None = None
        self._progress_at = 0.0  # when the worker last stored a batch or found nothing to do
        self._stalled_since: float | None = None
        self.idle = anyio.Event()  # set whenever a fetch found the queue empty
        self.ready = anyio.Event()  # set once the consumer and the sink are started

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
        consumer = broker.storage_consumer(namespace, name)
        return cls(consumer, sink_from_url(sink_url), name=name, **options)  # type: ignore[arg-type]

    def stop(self) -> None:
        """Finish the batch in hand if the sink takes it, then return from :meth:`run` (within
        ``stop_timeout`` seconds whatever happens). Call it from the worker's event loop."""
        self._stopping = True
        if self._stop_event is not None:
            self._stop_event.set()
        if self._scope is not None:
            # A deadline rather than a watchdog task: a task group would wrap what run()
            # raises in an ExceptionGroup, and callers catch RoomRouterError.
            deadline = anyio.current_time() + self.stop_timeout
            self._scope.deadline = min(self._scope.deadline, deadline)

    async def run(self) -> None:
        self._stop_event = anyio.Event()
        with anyio.CancelScope() as scope:
            self._scope = scope
            if self._stopping:
                self.stop()
            try:
                await self._run()
            finally:
                self._scope = None
        if scope.cancelled_caught:
            log.warning(
                "still busy %.1fs after stop(); left what is not acknowledged to be redelivered",
                self.stop_timeout,
            )

    async def _run(self) -> None:
        async with AsyncExitStack() as stack:
            # Closing is shielded (and bounded): a cancelled (crashed-in-test, or shut-down)
            # worker must still release its connections; what it held unacknowledged is
            # redelivered anyway.
            stack.push_async_callback(self._close, self.consumer.aclose)
            await self.consumer.start()
            stack.push_async_callback(self._close, self.sink.aclose)
            await self.sink.start()
            self.ready.set()
            self._progress_at = anyio.current_time()
            while not self._stopping:
                batch = await self._collect()
                if batch:
                    # Cancelled here, the batch is simply redelivered later (it is not
                    # acked); stop() instead lets it finish if the sink is healthy.
                    await self._store(batch)

    async def _close(self, close: Callable[[], Awaitable[None]]) -> None:
        with anyio.move_on_after(max(self.stop_timeout, 1.0), shield=True) as scope:
            await close()
        if scope.cancelled_caught:
            log.warning("closing a connection took longer than %.1fs; gave up", self.stop_timeout)

    async def _pause(self, seconds: float) -> None:
        """Sleep ``seconds``, or less if :meth:`stop` is called meanwhile."""
        assert self._stop_event is not None
        with anyio.move_on_after(seconds):
            await self._stop_event.wait()

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
            except StorageQueueLost as exc:
                # Already repaired by the consumer; what matters now is that the loss is seen.
                self.stats.queue_recreated += 1
                log.error("%s", exc)
                continue
            except RoomRouterError as exc:
                self.stats.queue_errors += 1
                log.warning("storage queue fetch failed (%s); retrying in %.2fs", exc, backoff)
                self._no_progress(f"every storage queue fetch failed; last: {exc}")
                await self._pause(backoff)
                backoff = min(backoff * 2, self.max_backoff)
                continue
            backoff = 0.05
            if not frames:
                if batch:
                    break
                self._progressed()
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
        good: list[tuple[StoredFrame, Envelope]] = []
        dead: list[DeadLetter] = []
        for item in batch:
            checked = self._check(item)
            if isinstance(checked, str):
                dead.append(self._letter(item, checked))
            else:
                good.append((item, checked))
        refused = await self._write(good)
        if refused is None or (dead + refused and not await self._bury(dead + refused)):
            # Stopping while the sink fails: nothing of the batch is acknowledged.
            self.stats.abandoned += len(batch)
            log.warning("stopping: %d frame(s) left to be redelivered", len(batch))
            return
        try:
            await self.consumer.ack(batch)
            self.stats.acked += len(batch)
            self._progressed()
        except RoomRouterError as exc:
            # Stored but not acknowledged: redelivered later and written again as a no-op.
            self.stats.queue_errors += 1
            log.warning("acknowledging %d frame(s) failed: %s", len(batch), exc)
            self._no_progress(f"acknowledging what was stored failed; last: {exc}")

    def _no_progress(self, why: str) -> None:
        """After a failure: a stall if nothing progressed for ``stall_after`` seconds (one
        ERROR and one count per stall)."""
        now = anyio.current_time()
        if self._stalled_since is None and now - self._progress_at >= self.stall_after:
            self._stalled_since = self._progress_at
            self.stats.stalls += 1
            log.error("storage worker %s stalled: nothing stored for %.0fs while entries may be "
                      "waiting: %s", self.name or "?", now - self._progress_at, why)  # fmt: skip

    def _progressed(self) -> None:
        self._progress_at = anyio.current_time()
        if self._stalled_since is not None:
            log.warning("storage worker %s moves again after %.0fs stalled", self.name or "?",
                        self._progress_at - self._stalled_since)  # fmt: skip
            self._stalled_since = None

    def _check(self, item: StoredFrame) -> Envelope | str:
        """The envelope of ``item``, or why it cannot be one."""
        if item.defect is not None:
            return item.defect
        try:
            envelope = decode_envelope(item.frame)
        except (msgspec.MsgspecError, TypeError) as exc:
            self.stats.dropped_decode += 1
            return f"not an envelope ({len(item.frame or b'')} bytes): {exc}"
        try:
            # The router never publishes such a room (its length limit is its own option,
            # so only the character rules are checked here), and history could never ask
            # for it back.
            validate_room(envelope.room, max_length=sys.maxsize)
            if not envelope.id:
                raise ValueError("the envelope id is empty")
        except ValueError as exc:
            return f"invalid envelope {envelope.id[:64]!r}: {exc}"
        return envelope

    def _letter(self, item: StoredFrame, reason: str) -> DeadLetter:
        return DeadLetter(item.frame or b"", reason[:_MAX_REASON], self.name, time.time())

    async def _write(self, pairs: list[tuple[StoredFrame, Envelope]]) -> list[DeadLetter] | None:
        """Write ``pairs``; return the dead letters of the rows the sink refused, or ``None``
        if stopping while the sink was unavailable (nothing written is then acknowledged).

        A refused batch is split in halves until the refused rows are alone: about twice log2
        of the batch size extra writes per bad row, and every good row is stored.
        """
        if not pairs:
            return []
        try:
            stored = await self._write_retrying([envelope for _, envelope in pairs])
            return [] if stored else None
        except (SinkRefused, ValueError) as exc:
            self.stats.sink_errors += 1
            if len(pairs) == 1:
                self.stats.refused += 1
                return [self._letter(pairs[0][0], f"refused by the sink: {exc}")]
        mid = len(pairs) // 2
        left = await self._write(pairs[:mid])
        if left is None:
            return None
        right = await self._write(pairs[mid:])
        return None if right is None else left + right

    async def _write_retrying(self, envelopes: list[Envelope]) -> bool:
        """True once the sink committed ``envelopes``; False if stop() came while it failed.
        A refusal (:class:`SinkRefused`, ``ValueError``) is raised to the caller: retrying
        cannot help."""

        async def write() -> None:
            self.stats.written += await self.sink.write(envelopes)

        # A refusal is about the rows (InvalidRoomName is a RoomRouterError too): not retried.
        return await self._retrying(
            write, f"sink write of {len(envelopes)} envelope(s)", refusals=(SinkRefused, ValueError)
        )

    async def _retrying(
        self,
        attempt: Callable[[], Awaitable[None]],
        what: str,
        refusals: tuple[type[BaseException], ...] = (),
    ) -> bool:
        """Run ``attempt`` until it succeeds (True), retrying an unavailable sink (any other
        :class:`RoomRouterError`) with capped backoff; False if stop() came while it failed.
        ``refusals`` are raised to the caller at once."""
        backoff = 0.1
        while True:
            try:
                await attempt()
                return True
            except refusals:
                raise
            except RoomRouterError as exc:
                self.stats.sink_errors += 1
                if self._stopping:
                    return False
                log.warning("%s failed (%s); retry in %.1fs", what, exc, backoff)
                self._no_progress(f"the sink keeps failing ({what}); last: {exc}")
                await self._pause(backoff)
                if self._stopping:
                    return False
                backoff = min(backoff * 2, self.max_backoff)

    async def _bury(self, letters: list[DeadLetter]) -> bool:
        """Keep ``letters`` in the sink's dead-letter table (retried like a write); False if
        stop() came while the sink was unavailable."""

        async def keep() -> None:
            try:
                await self.sink.write_dead_letters(letters)
            except NotImplementedError:
                # No table to keep them in: the log is the only record left.
                for letter in letters:
                    log.error("dead letter (not kept: the sink has no dead-letter table): %s; "
                              "frame %r", letter.reason, letter.frame[:256])  # fmt: skip
            except SinkRefused as exc:
                for letter in letters:
                    log.error("dead letter (not kept: the sink refused it too: %s): %s; "
                              "frame %r", exc, letter.reason, letter.frame[:256])  # fmt: skip

        if not await self._retrying(keep, f"keeping {len(letters)} dead letter(s)"):
            return False
        self.stats.dead_lettered += len(letters)
        log.error("set %d frame(s) aside as dead letters (they can never be stored as they "
                  "are); first: %s", len(letters), letters[0].reason)  # fmt: skip
        return True
