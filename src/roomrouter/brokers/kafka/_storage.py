"""Kafka persistence: the data topic is the storage queue and the recent-messages cache.

A persisted frame is one record of the data topic carrying the ``rr-store`` header
(:data:`~._common.STORED_HEADERS`); nothing is written twice.

* **Storage queue.** Storage workers form the consumer group ``{prefix}.{namespace}.store``
  over the data topic (:class:`KafkaStorageConsumer`). Kafka splits the partitions among them
  (competing consumers); each keeps the flagged records and passes over the rest. A worker
  commits a partition's offset only up to its oldest frame not yet acknowledged (written by the
  sink), so after a crash the group hands the partition to another member, which resumes at
  the committed offset: at-least-once, made exactly-once by the sink's write by id. A member
  that stops heartbeating for ``redelivery_after`` seconds (the session timeout) is dropped.
* **Recent cache.** :func:`scan_recent` reads the room's partition *backwards* from its end in
  growing chunks, keeping the room's flagged records, until it has ``recent_size`` of them or
  has read ``recent_scan`` records. Whether that is "truncated" is decided with the group's
  committed offset ``C``: every flagged record below ``C`` is in the sink, so the cache is
  complete together with the sink unless a record of the room at or above ``C`` was cut off.

Offsets are always read contiguously (:class:`~._common.OffsetGuard`), and the end of a
partition comes from a marker record or a fetch's high watermark, never from ``ListOffsets``
(which Tansu answers wrongly after batched produces).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import anyio
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import OffsetOutOfRangeError

from ..._errors import BrokerUnavailable, describe, unreachable
from .._base import (
    RecentFrames,
    RecentScan,
    StorageConsumer,
    StoredFrame,
    frame_id,
    recent_bound,
)
from ._common import ERRORS, OffsetGuard, ensure_topics, is_stored, names, quiet_stop

if TYPE_CHECKING:
    from ._broker import KafkaBroker

__all__ = ["KafkaStorageConsumer", "open_admin", "open_reader", "scan_recent"]

log = logging.getLogger("roomrouter.kafka")

#: How long a worker may hold a batch (a sink being retried) before the group presumes it
#: stuck and gives its partitions to others; they are then stored twice, harmlessly.
_MAX_POLL_INTERVAL_MS = 300_000
_IDLE_COMMIT_INTERVAL = 1.0


async def open_reader(options: dict[str, Any], fetch_max_wait_ms: int) -> Any:
    """A group-less consumer positioned only by explicit seeks (``auto_offset_reset="none"``:
    reading below the log start raises instead of jumping elsewhere)."""
    return await _started(
        AIOKafkaConsumer(
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="none",
            fetch_max_wait_ms=fetch_max_wait_ms,
            isolation_level="read_uncommitted",
            **options,
        )
    )


async def open_admin(options: dict[str, Any]) -> Any:
    return await _started(AIOKafkaAdminClient(**options))


async def _started(client: Any) -> Any:
    """``client`` started, or stopped again (half-started clients hold sockets) and raised."""
    try:
        await client.start()
    except BaseException:
        with anyio.CancelScope(shield=True):
            await quiet_stop(client)
        raise
    return client


async def committed_offsets(
    admin: Any, group: str, tps: Sequence[TopicPartition]
) -> dict[TopicPartition, int | None]:
    """The group's committed offset per partition (None: nothing committed yet). Partitions are
    named explicitly: Tansu drops the connection on the list-everything form."""
    reply = await admin.list_consumer_group_offsets(group, partitions=list(tps))
    out: dict[TopicPartition, int | None] = dict.fromkeys(tps)
    for tp, meta in reply.items():
        if tp in out and meta.offset >= 0:
            out[tp] = meta.offset
    return out


async def read_range(
    reader: Any, tp: TopicPartition, lo: int, hi: int, guard: OffsetGuard
) -> tuple[list[Any], int, bool]:
    """The records of ``tp`` with ``lo <= offset < hi``, in order, every one of them (the
    caller bounds the time). Returns them, the first offset actually read (above ``lo`` if the
    log no longer starts that low) and whether the log's start was met."""
    reader.seek(tp, lo)
    expected = lo
    out: list[Any] = []
    at_start = lo == 0
    while expected < hi:
        try:
            batches = await reader.getmany(tp, timeout_ms=200)
        except OffsetOutOfRangeError:
            start = (await reader.beginning_offsets([tp]))[tp]
            if start <= expected:
                raise BrokerUnavailable(
                    f"{tp}: offset {expected} out of range, log starts at {start}"
                ) from None
            lo = expected = start
            at_start = True
            reader.seek(tp, start)
            continue
        for record in guard.accept(reader, tp, batches.get(tp, ()), expected):
            if record.offset >= hi:
                expected = hi
                break
            out.append(record)
            expected = record.offset + 1
    return out, lo, at_start


async def scan_recent(
    reader: Any,
    admin: Any,
    *,
    group: str,
    tp: TopicPartition,
    key: bytes,
    end: int,
    size: int,
    scan: int,
    step_timeout: float,
    since: str | None = None,
    limit: int | None = None,
) -> RecentFrames:
    """The last ``size`` stored frames of room ``key`` below offset ``end`` of ``tp``, read
    backwards in growing chunks, at most ``scan`` records (see the module docstring); with
    ``since``, the scan stops at the chunk that reaches it (see ``_base.RecentScan``), with
    ``limit`` it keeps at most that many.

    Each broker round (the committed offset, one chunk) must finish within ``step_timeout``.
    ``truncated`` is True when frames of the room may exist below what is returned that no
    storage worker has committed yet: then only the sink can prove a window complete, and the
    router reports it incomplete unless it does.
    """
    cap = size if limit is None else min(size, limit)
    bound = recent_bound(since)
    guard = OffsetGuard(patience=step_timeout)
    with anyio.fail_after(step_timeout):
        committed = (await committed_offsets(admin, group, [tp]))[tp] or 0
    reader.assign([tp])
    found: list[tuple[int, bytes]] = []
    hi = end
    chunk = min(max(2 * size, 256), scan)
    scanned = 0
    at_start = hi <= 0
    reached = False
    while not at_start and not reached and len(found) <= cap and scanned < scan:
        lo = max(0, hi - min(chunk, scan - scanned))
        with anyio.fail_after(step_timeout):
            records, lo, at_start = await read_range(reader, tp, lo, hi, guard)
        kept_now = [(r.offset, r.value) for r in records if r.key == key and is_stored(r)]
        found[:0] = kept_now
        if bound is not None:
            ids = (frame_id(value) for _, value in kept_now)
            reached = any(i is not None and i[:13] < bound for i in ids)
        scanned += hi - lo
        hi = lo
        chunk *= 2
    scanner = RecentScan(since, cap)
    taken = 0
    for _, value in reversed(found):
        taken += 1
        if not scanner.add(value):
            break
    dropped = found[: len(found) - taken]
    truncated = not scanner.reached and (
        any(offset >= committed for offset, _ in dropped) or (not at_start and hi > committed)
    )
    return RecentFrames(scanner.result(evicted=False).frames, truncated, scanner.skipped)


class KafkaStorageConsumer(StorageConsumer):
    """A member of the namespace's storage group (see the module docstring).

    :meth:`start` only makes sure the topics exist; the consumer joins the group on its first
    :meth:`fetch`, so a consumer used just for :meth:`pending` (monitoring) takes no partition
    away from the workers.
    """

    def __init__(self, broker: KafkaBroker, namespace: str, name: str) -> None:
        self._broker = broker
        self._data_topic, self._control_topic, self._group = names(namespace, broker.topic_prefix)
        client_id = "roomrouter-worker-" + re.sub(r"[^A-Za-z0-9_.-]", "_", name)
        self._options = broker.client_options_with(client_id)
        self._partitions = 0
        self._consumer: Any = None
        self._reader: Any = None  # for pending()
        self._admin: Any = None
        self._guard = OffsetGuard(patience=broker.operation_timeout)
        # Per assigned partition: the next offset to hand on, the offsets handed on and not
        # acknowledged yet, and the offset last committed.
        self._next: dict[TopicPartition, int] = {}
        self._held: dict[TopicPartition, set[int]] = {}
        self._committed: dict[TopicPartition, int] = {}
        self._idle_commit_at = 0.0

    async def start(self) -> None:
        broker = self._broker
        try:
            with anyio.fail_after(broker.operation_timeout):
                self._partitions = await ensure_topics(
                    self._options,
                    self._data_topic,
                    self._control_topic,
                    broker.partitions,
                    broker.replication_factor,
                )
        except (*ERRORS, BrokerUnavailable) as exc:
            where = ",".join(broker.bootstrap_servers)
            raise unreachable("Kafka", where, None, exc) from exc

    async def aclose(self) -> None:
        # Stopping the group member leaves the group, so its partitions move at once instead
        # of after the session timeout; what it held unacknowledged is redelivered.
        clients = (self._consumer, self._reader, self._admin)
        self._consumer = self._reader = self._admin = None
        with anyio.move_on_after(self._broker.operation_timeout, shield=True):
            await quiet_stop(*clients)

    async def _member(self) -> Any:
        if self._consumer is not None:
            return self._consumer
        session_ms = max(int(self._broker.redelivery_after * 1000), 100)
        options = dict(self._options)
        # A JoinGroup is answered only when the rebalance completes, which may take the
        # rebalance timeout (the session timeout here): the request must outlive it.
        options["request_timeout_ms"] = session_ms + options["request_timeout_ms"]
        consumer = AIOKafkaConsumer(
            group_id=self._group,
            enable_auto_commit=False,
            # A group that never committed starts at the beginning: frames persisted before
            # the first worker ran must be stored too.
            auto_offset_reset="earliest",
            session_timeout_ms=session_ms,
            rebalance_timeout_ms=session_ms,
            heartbeat_interval_ms=max(session_ms // 3, 50),
            max_poll_interval_ms=_MAX_POLL_INTERVAL_MS,
            fetch_max_wait_ms=self._broker.fetch_max_wait_ms,
            isolation_level="read_uncommitted",
            **options,
        )
        with anyio.fail_after(self._broker.operation_timeout):
            await _started(consumer)
        consumer.subscribe([self._data_topic], listener=_Rebalance(self, consumer))
        self._consumer = consumer
        return consumer

    async def fetch(self, max_frames: int, wait: float) -> list[StoredFrame]:
        out: list[StoredFrame] = []
        try:
            consumer = await self._member()
            deadline = anyio.current_time() + wait
            while True:
                remaining = max(deadline - anyio.current_time(), 0.0)
                batches = await consumer.getmany(
                    timeout_ms=int(remaining * 1000), max_records=max_frames - len(out)
                )
                for tp, fetched in batches.items():
                    records = self._guard.accept(consumer, tp, fetched, self._next.get(tp))
                    if not records:
                        continue
                    held = self._held.setdefault(tp, set())
                    for record in records:
                        if is_stored(record):
                            # A flagged record without a value (a tombstone) is handed on as
                            # empty: the worker dead-letters it instead of choking on None.
                            value = record.value if record.value is not None else b""
                            out.append(StoredFrame(value, (tp, record.offset)))
                            held.add(record.offset)
                    self._next[tp] = records[-1].offset + 1
                if out or anyio.current_time() >= deadline:
                    break
            if not out:
                # Records that are not for storage (live-only frames, markers) are passed
                # over; commit past them now and then, or a restart would read them again.
                now = anyio.current_time()
                if now >= self._idle_commit_at:
                    self._idle_commit_at = now + _IDLE_COMMIT_INTERVAL
                    await self._commit(quiet=True)
        except (*ERRORS, TimeoutError) as exc:
            raise BrokerUnavailable(f"Kafka storage fetch failed: {describe(exc)}") from exc
        return out

    async def ack(self, frames: Sequence[StoredFrame]) -> None:
        for item in frames:
            token: tuple[TopicPartition, int] = item.token  # type: ignore[assignment]
            tp, offset = token
            held = self._held.get(tp)
            if held is not None:
                held.discard(offset)
        await self._commit(quiet=False)

    async def _commit(self, *, quiet: bool) -> None:
        """Commit, per assigned partition, up to the oldest frame still held (or everything
        handed on): every flagged record below a committed offset is in the sink."""
        consumer = self._consumer
        if consumer is None:
            return
        assigned = consumer.assignment()
        offsets = {}
        for tp, upto in self._next.items():
            held = self._held.get(tp)
            safe = min(held) if held else upto
            if tp in assigned and safe > self._committed.get(tp, -1):
                offsets[tp] = safe
        if not offsets:
            return
        # The commit runs as a task of its own that a cancelled or timed-out caller leaves to
        # finish: cancelling aiokafka's commit mid-way orphans its shielded request, whose
        # failure then surfaces as an unretrieved exception on the event loop.
        commit = asyncio.ensure_future(consumer.commit(offsets))
        commit.add_done_callback(_retrieve)
        try:
            with anyio.fail_after(self._broker.operation_timeout):
                await asyncio.shield(commit)
        except (*ERRORS, TimeoutError) as exc:
            # A rebalance took the partition away: its new owner re-reads from the last
            # commit and the sink ignores what was written already.
            if quiet:
                log.debug("storage commit failed: %r", exc)
                return
            raise BrokerUnavailable(f"Kafka storage commit failed: {describe(exc)}") from exc
        for tp, offset in offsets.items():
            self._committed[tp] = max(self._committed.get(tp, -1), offset)

    def _revoked(self, tps: Sequence[TopicPartition]) -> None:
        for tp in tps:
            self._next.pop(tp, None)
            self._held.pop(tp, None)
            self._committed.pop(tp, None)
            self._guard.forget(tp)

    async def pending(self) -> int:
        """Flagged records above the group's committed offsets, counted by reading them (up to
        each partition's high watermark): what the workers have not acknowledged yet."""
        broker = self._broker
        try:
            with anyio.fail_after(4 * broker.operation_timeout):
                if self._reader is None:
                    self._admin = await open_admin(self._options)
                    self._reader = await open_reader(self._options, broker.fetch_max_wait_ms)
                reader = self._reader
                tps = [TopicPartition(self._data_topic, p) for p in range(self._partitions)]
                committed = await committed_offsets(self._admin, self._group, tps)
                reader.assign(tps)  # fresh partition states: no stale high watermark
                missing = [tp for tp in tps if committed[tp] is None]
                starts = await reader.beginning_offsets(missing) if missing else {}
                following = {
                    tp: offset if (offset := committed[tp]) is not None else starts[tp]
                    for tp in tps
                }
                for tp, offset in following.items():
                    reader.seek(tp, offset)
                return await _count_stored(reader, following)
        except (*ERRORS, TimeoutError) as exc:
            raise BrokerUnavailable(f"Kafka pending count failed: {describe(exc)}") from exc


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Mark a background commit's outcome as seen (the caller may have stopped waiting)."""
    if not task.cancelled() and task.exception() is not None:
        log.debug("storage commit finished with %r", task.exception())


async def _count_stored(reader: Any, following: dict[TopicPartition, int]) -> int:
    guard = OffsetGuard(patience=1.0)
    count = 0
    waiting = set(following)
    while waiting:
        batches = await reader.getmany(timeout_ms=100)
        for tp, fetched in batches.items():
            records = guard.accept(reader, tp, fetched, following[tp])
            if records:
                count += sum(1 for r in records if is_stored(r))
                following[tp] = records[-1].offset + 1
        for tp in list(waiting):
            highwater = reader.highwater(tp)
            if highwater is not None and following[tp] >= highwater:
                waiting.discard(tp)
    return count


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    """Keeps the consumer's bookkeeping in step with the group's assignment."""

    def __init__(self, owner: KafkaStorageConsumer, consumer: Any) -> None:
        self._owner = owner
        self._consumer = consumer

    async def on_partitions_revoked(self, revoked: Sequence[TopicPartition]) -> None:
        # Commit what is safe before the partitions move, so the next owner repeats less.
        await self._owner._commit(quiet=True)
        self._owner._revoked(list(revoked))

    async def on_partitions_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        owner = self._owner
        for tp in assigned:
            # The committed offset (or the log start for a new group): reading resumes there,
            # and the guard holds the first fetch to it.
            position = await self._consumer.position(tp)
            owner._next[tp] = position
            owner._committed[tp] = position
