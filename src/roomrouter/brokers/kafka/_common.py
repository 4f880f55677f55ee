"""Pieces the Kafka node (``_broker``, ``_reader``, ``_publish``) and the Kafka storage path
(``_storage``) share: topic names and creation, the record flag that marks a frame for
storage, and the guard that keeps reads of a partition contiguous."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import re
import time
from collections.abc import Sequence
from typing import Any

import anyio
from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError
from aiokafka.partitioner import murmur2

from ..._errors import BrokerUnavailable

__all__ = [
    "ERRORS",
    "LEGAL_TOPIC",
    "STORED_HEADERS",
    "OffsetGuard",
    "ensure_topics",
    "is_stored",
    "names",
    "partition",
    "quiet_stop",
    "retrieve",
]

log = logging.getLogger("roomrouter.kafka")

# aiokafka raises its own KafkaError tree, OSError from sockets, and AssertionError when asked
# for a partition its metadata does not (yet) know.
ERRORS = (KafkaError, OSError, TimeoutError, AssertionError)
LEGAL_TOPIC = re.compile(r"[A-Za-z0-9_-]{1,180}")
_TOPIC_EXISTS = 36  # TOPIC_ALREADY_EXISTS
_CONTROL_RETENTION_MS = 3_600_000

#: The header of a record that is also meant for the storage queue (``persist=True``). The
#: data topic *is* the storage queue; storage workers and the recent-messages scan keep only
#: records carrying it, without decoding anything.
_STORED = ("rr-store", b"1")
STORED_HEADERS = [_STORED]


def is_stored(record: Any) -> bool:
    """True if ``record`` (an aiokafka ``ConsumerRecord``) is a frame to store."""
    return record.key is not None and _STORED in record.headers


def names(namespace: str, topic_prefix: str) -> tuple[str, str, str]:
    """The (data topic, control topic, storage group) of ``namespace``.

    A namespace that is a legal topic name without dots is used as it is; any other one
    becomes its sanitised form, a ``.`` and 32 hex digits of its SHA-256. Names of the first
    kind have two dots and names of the second three (the prefix has none), so the two kinds
    never meet, and the digest keeps the second kind apart among themselves (a sanitised form
    alone would let ``a:b`` and ``a-b`` share topics).
    """
    name = namespace
    if not LEGAL_TOPIC.fullmatch(namespace):
        digest = hashlib.sha256(namespace.encode()).hexdigest()[:32]
        name = re.sub(r"[^A-Za-z0-9_-]", "-", namespace)[:80] + "." + digest
    base = f"{topic_prefix}.{name}"
    return f"{base}.data", f"{base}.control", f"{base}.store"


@functools.lru_cache(maxsize=65536)
def partition(key: bytes, count: int) -> int:
    """Kafka's default partitioner (Java client): murmur2 of the key, sign bit cleared. Cached:
    the pure-Python hash costs microseconds and a node publishes to few rooms repeatedly."""
    return (murmur2(key) & 0x7FFFFFFF) % count  # type: ignore[no-any-return]


async def ensure_topics(
    options: dict[str, Any],
    data_topic: str,
    control_topic: str,
    partitions: int,
    replication_factor: int,
) -> int:
    """Create the namespace's topics if missing; return the data topic's real partition count
    (a topic someone else created keeps its own)."""
    admin = AIOKafkaAdminClient(
        **{k: v for k, v in options.items() if k != "client_id"},
        client_id=str(options.get("client_id", "roomrouter")) + "-admin",
    )
    try:
        await admin.start()
        response = await admin.create_topics(
            [
                NewTopic(data_topic, partitions, replication_factor),
                NewTopic(
                    control_topic,
                    1,
                    replication_factor,
                    # Control records matter only live (every node enters at a marker);
                    # keep the partition from growing with heartbeats and probes.
                    topic_configs={"retention.ms": str(_CONTROL_RETENTION_MS)},
                ),
            ]
        )
        for topic, code, message in response.topic_errors:
            if code not in (0, _TOPIC_EXISTS):
                raise BrokerUnavailable(f"cannot create topic {topic}: {code} {message}")
        described = await admin.describe_topics([data_topic])
    finally:
        # Shielded: under a caller's expired timeout an unshielded close is cancelled at once
        # and leaves the admin client's sockets open (ResourceWarnings, a leak per reconnect).
        with anyio.move_on_after(5, shield=True):
            await admin.close()
    data = described[0]
    if data["error_code"] or not data["partitions"]:
        raise BrokerUnavailable(f"topic {data_topic} is not available: {data}")
    count = len(data["partitions"])
    if count != partitions:
        log.warning(
            "topic %s has %d partitions, not %d; using %d", data_topic, count, partitions, count
        )
    return count


class OffsetGuard:
    """Keeps what a consumer hands on from each partition contiguous in offsets.

    Tansu (0.6) can answer a fetch with records *beyond* an offset whose record is not readable
    yet: with several producers appending at once, offset 1675 may be assigned but still
    invisible while 1676..1700 are served. A reader that took them would move its position past
    the hole and never see 1675 -- a lost live message, or worse a lost stored one. So records
    are accepted only in offset order: at a hole the guard seeks the consumer back to the first
    missing offset and drops what came after it, and a later fetch returns the hole filled.

    A hole still there after ``patience`` seconds is taken as permanent and skipped (counted in
    :attr:`skipped`): Apache Kafka leaves holes for transaction markers and compaction, which
    roomrouter's own topics never have, but a foreign producer could add them.
    """

    def __init__(self, patience: float) -> None:
        self.patience = patience
        #: Fetches sent back to fill a hole.
        self.retries = 0
        #: Offsets given up on (holes older than ``patience``).
        self.skipped = 0
        self._holes: dict[TopicPartition, tuple[int, float]] = {}

    def accept(
        self, consumer: Any, tp: TopicPartition, records: Sequence[Any], expected: int | None
    ) -> list[Any]:
        """The leading run of ``records`` that continues at ``expected`` (the next offset the
        caller has not seen; None: accept from the first record on). Records below
        ``expected`` were seen already and are dropped."""
        if expected is None:
            self._holes.pop(tp, None)
            return list(records)
        if records and records[0].offset == expected:
            last = records[-1].offset
            if last - expected == len(records) - 1:  # offsets rise, so: exactly contiguous
                if self._holes:
                    self._holes.pop(tp, None)
                return list(records)
        out: list[Any] = []
        for record in records:
            offset = record.offset
            if offset < expected:
                continue
            if offset > expected:
                if not self._patience_over(tp, expected):
                    consumer.seek(tp, expected)
                    self.retries += 1
                    return out
                self.skipped += offset - expected
                log.warning("%s: offsets %d..%d never became readable; skipped",
                            tp, expected, offset - 1)  # fmt: skip
            out.append(record)
            expected = offset + 1
        self._holes.pop(tp, None)
        return out

    def forget(self, tp: TopicPartition) -> None:
        self._holes.pop(tp, None)

    def _patience_over(self, tp: TopicPartition, expected: int) -> bool:
        now = time.monotonic()
        hole = self._holes.get(tp)
        if hole is None or hole[0] != expected:
            self._holes[tp] = (expected, now)
            return False
        return now - hole[1] >= self.patience


def retrieve(future: asyncio.Future[Any]) -> None:
    """Mark a future's exception as retrieved (nobody waits for it any more)."""
    if not future.cancelled():
        future.exception()


async def quiet_stop(*clients: Any) -> None:
    """Stop aiokafka clients, logging instead of raising (they may be half-started)."""
    for client in clients:
        if client is None:
            continue
        try:
            await client.stop() if hasattr(client, "stop") else await client.close()
        except Exception:
            log.debug("stopping %r failed", client, exc_info=True)
        except asyncio.CancelledError:
            # A producer stopped while its requests hang (a stalled broker) re-raises the
            # CancelledError of its own cancelled sender task. Only a cancel of *this* task is
            # ours to propagate; the other one, escaping a background task, would cancel the
            # router's task group and with it the application.
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            log.debug("stopping %r was cancelled inside the client", client, exc_info=True)
            # stop() gave up before closing the connections (the producer's close of its
            # sender comes first): close them, or their sockets leak.
            connections = getattr(client, "client", None) or getattr(client, "_client", None)
            if connections is not None:
                try:
                    await connections.close()
                except (Exception, asyncio.CancelledError):
                    if task is not None and task.cancelling():
                        raise
                    log.debug("closing the connections of %r failed", client, exc_info=True)
