"""Kafka broker: one topic per namespace, key = room, and a node *assigns* itself (no consumer
group) exactly the partitions that hold its rooms.

Topics (``{prefix}`` is ``roomrouter`` unless ``topic_prefix`` says otherwise, and the
namespace is kept if it is a legal topic name without dots, else sanitised and followed by
``.`` and a hash, so no two namespaces share a topic; see ``_kafka_common.names``):

* ``{prefix}.{namespace}.data`` -- ``partitions`` partitions (default 16). A frame of room R is
  a record with key ``R`` (UTF-8) in partition ``murmur2(key) % partitions``, the partitioner
  of the Java client, so every record of a room lands in one partition, in send order.
* ``{prefix}.{namespace}.control`` -- one partition every node reads. The record key says who
  it is for: ``*`` every node, ``@{node}`` one node (the others skip it), ``#{node}`` a marker
  or health probe of that node (everyone skips it).

Both are created (admin client) when missing. A topic that already exists keeps its partition
count, and every node reads that count from the broker when it connects, so nodes agree on
which partition holds a room even if someone else created the topic.

**Dynamic subscription.** The consumer's manual assignment is always: the control partition
plus the partitions of the rooms with local members. A partition shared with rooms this node
does not host still delivers their records to the client; they are dropped by key, before any
decoding, and counted in :attr:`KafkaBroker.filtered`.

**Where a newly subscribed room starts (markers).** :meth:`KafkaBroker.subscribe` appends one
empty *marker* record (null key) to each partition of the batch, with ``acks`` and waits for
the broker's answer, which carries the marker's offset ``M``. Kafka appends to a partition in
one total order, so every record acknowledged before the subscribe started sits below ``M``
and every record produced after ``subscribe`` returns sits above it. Then, synchronously (no
``await`` between the two steps, so the reader cannot interleave), the room's *threshold* is set
to ``M + 1`` -- the reader drops records of that room with a lower offset, which covers a room
joining a partition that is already assigned and still has a backlog -- and a newly assigned
partition is positioned with ``seek(M + 1)``. A seek sets the fetch position in the client at
once, so nothing depends on the broker's offset-reset logic. The control partition is entered
the same way at start and after a reconnect.

Kafka behaviours this relies on (Apache Kafka and Tansu both have them; Tansu 0.6 was checked):

* a produce response carries the offset the broker assigned to the record (``acks`` of
  ``1`` or ``all``; ``acks=0`` is refused because it returns no offset);
* offsets within a partition grow in append order, and a fetch from offset ``o`` returns the
  records at ``>= o`` in order;
* nothing else: not ``ListOffsets`` (``end_offsets``/``seek_to_end``, which Tansu answers
  wrongly after batched produces), not ``auto_offset_reset`` (``latest`` replays old records on
  Tansu; the consumer runs with ``none`` and is always positioned explicitly), not record
  timestamps (node clocks may disagree), not consumer groups.

Positions of partitions that stay assigned survive a re-assignment (aiokafka resets every
partition's state on :meth:`assign`): the reader tracks the next offset of every assigned
partition itself and the broker seeks back to it.

**Control plane.** Control frames are records on the control partition, so a frame sent to one
node is still read by all, and skipped by key. ``counts_receivers`` is False: Kafka cannot say
who read a record, so a starting router listens for ``discovery_window`` seconds, unless its
marker is the control partition's first record (:meth:`KafkaBroker.count_nodes`) or the first
answers' live lists say everyone answered.

**Publishing.** One producer per node, ``acks="all"`` by default, ``linger_ms`` 0 by default;
no idempotent or transactional producer (Tansu refuses them). :meth:`publish` appends
to a queue before its first ``await`` and waits on a future for the broker's acknowledgement.
One sender task moves the queue's head into one producer batch per partition
(``create_batch``/``send_batch``: the per-record ``send()`` costs a coroutine, a future and
metadata lookups, most of the publisher's CPU) and hands them on without awaiting answers, so
call order is send order and many publishes share a request. One done callback per batch
settles its publishes. Deadlines: one timer per sender round (a submission that has to wait
for the partition's previous batch), and one watchdog for all publishes, which fails a record
still queued at its deadline with ``BrokerUnavailable`` (never left) and one the producer has
with ``PublishOutcomeUnknown``. Bound: at most ``max_pending`` records (default 10 000) are
handed on and unanswered; beyond that the queue waits and its callers stay suspended
(backpressure by awaiting, in call order), each at most the operation timeout.

**Batching without lingering.** aiokafka keeps one produce request in flight per broker
connection; whatever is published meanwhile waits in the send queue and goes as one batch per
partition in the next request. That already makes batches as large as the load and the
broker's round trip allow, so ``linger_ms`` defaults to 0: a linger adds nothing under load
and delays every publish of a publisher that waits for its acknowledgements (a sequential
loop, a few tasks) by its full value, with no request in flight to hide it. On Tansu
(``benchmarks/kafka_publish.py``, medians of 3 on a shared 2-core host), 64 tasks went from
24k to 49k msg/s and one sequential loop from 504 to 1,580.

A publisher that awaits each acknowledgement is bounded by ``tasks / round trip``, like raw
aiokafka's ``send_and_wait()`` in the same shape, which stays ~1.15-1.4x ahead: the hand-off
to the sender task costs one event-loop iteration on the way out, and the answer reaches the
caller two iterations later than aiokafka's own per-record futures (``send_batch`` returns a
shielded future; one done callback then settles the batch's publishes). And a node reading
the partition makes Tansu slower to answer: in a sequential loop Tansu used ~1 ms of CPU per
publish with a reader attached and ~0.25 ms without, for raw aiokafka and this broker alike,
on cores the publisher shares.

**Latency.** ``fetch_max_wait_ms`` defaults to 10. Apache Kafka answers a fetch as soon as one
byte is there (``fetch_min_bytes=1``), so on it the wait only bounds idle polling; Tansu 0.6
holds every fetch for the full wait, so there it is the latency: measured on one host
(``benchmarks/_kafka_probe.py``), 10 ms gives p50 ~5 ms publish-to-receive, 500 ms gives
~250 ms. The price of 10 ms is ~100 fetch requests per second per idle node (~5% of a core
with Tansu); on Apache Kafka ``?fetch_max_wait_ms=500`` keeps the latency and drops that cost.

**Holes.** Tansu can serve records past an offset that is not readable yet (several producers
appending to one partition). The reader accepts records only in offset order and seeks back to
a hole until it fills (``_kafka_common.OffsetGuard``), so no live frame is skipped for good.

**Storage** (``_kafka_storage``): the data topic is also the storage queue and the recent cache.
A persisted frame is one record flagged with a header; storage workers are the consumer group
``{prefix}.{namespace}.store`` and commit after the sink did; ``recent(room)`` reads the room's
partition backwards from a fresh marker.

**Faults.** aiokafka reconnects sockets on its own but cannot tell a broker that restarted
with an empty log (Tansu's memory storage, or topics deleted) from one that is merely quiet: a
fetch beyond the end of a recreated partition just comes back empty. So every
``health_interval`` the node appends a probe record to the control partition and expects to
read it back within ``operation_timeout``. If that fails, or a client call fails, the node
drops its clients, reconnects with capped exponential backoff, recreates missing topics,
re-enters the control partition and every assigned partition with fresh markers (a recreated
partition restarts at offset 0), and then calls ``context.on_reconnect()``. Frames published
while the node was cut off are lost (live delivery is at-most-once).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
from collections import deque
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import anyio
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError, KafkaTimeoutError, ProducerClosed

from .._errors import (
    BrokerUnavailable,
    ConfigurationError,
    PublishOutcomeUnknown,
    describe,
    unreachable,
)
from .._urls import redact
from ._base import Broker, BrokerContext, RecentFrames, StorageConsumer
from ._kafka_common import (
    ERRORS,
    LEGAL_TOPIC,
    STORED_HEADERS,
    OffsetGuard,
    ensure_topics,
    names,
    partition,
    quiet_stop,
    retrieve,
)
from ._kafka_storage import KafkaStorageConsumer, open_admin, open_reader, scan_recent

__all__ = ["KafkaBroker"]

log = logging.getLogger("roomrouter.kafka")

_BROADCAST = b"*"


@dataclass(slots=True, eq=False)
class _Send:
    """One frame waiting in the send queue, then for the broker's acknowledgement.

    ``future`` is what the publishing call awaits; whoever settles it first wins (the
    producer's answer, the watchdog at the deadline, ``aclose``), and a cancelled caller
    cancels it, which tells the sender to drop the frame if it has not handed it on yet."""

    control: bool
    key: bytes
    value: bytes
    deadline: float  # loop time; non-decreasing along the queue (one timeout for all)
    stored: bool  # also a storage-queue record (carries STORED_HEADERS)
    future: asyncio.Future[None]

    def fail(self, error: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(error)


def _settle(items: list[_Send], future: asyncio.Future[Any]) -> None:
    """Settle the publishes of one batch from the producer's answer for it."""
    error: BaseException | None = None
    if future.cancelled():
        error = PublishOutcomeUnknown("Kafka send cancelled after the producer took it")
    elif (exc := future.exception()) is not None:  # retrieving it also silences asyncio
        if _refused(exc):
            error = BrokerUnavailable(f"Kafka refused the record: {describe(exc)}")
        else:
            error = PublishOutcomeUnknown(f"Kafka did not acknowledge the record: {describe(exc)}")
    for item in items:
        if not item.future.done():
            if error is None:
                item.future.set_result(None)
            else:
                item.future.set_exception(error)


def _refused(exc: BaseException) -> bool:
    """True if the producer's error says the broker did not append the record: a definite,
    non-retriable answer from it. Timeouts, lost connections and a producer stopped with the
    record in flight leave the outcome open."""
    return (
        isinstance(exc, KafkaError)
        and not exc.retriable
        and not isinstance(exc, (KafkaTimeoutError, ProducerClosed))
    )


@dataclass(slots=True, eq=False)
class _Session:
    """The clients of one connection epoch. Replaced wholesale after a failure."""

    producer: Any
    consumer: Any
    partitions: int  # of the data topic, as the broker reports it
    control_tp: TopicPartition
    # Opened on first use by recent(): a second, group-less consumer that scans a partition
    # backwards without disturbing the live reader's positions, and an admin client that reads
    # the storage group's committed offsets.
    history: Any = None
    admin: Any = None


class _SessionLost(Exception):
    pass


class KafkaBroker(Broker):
    """See the module docstring.

    Options: ``partitions`` (for a data topic this node creates), ``acks`` (``"all"`` or ``1``),
    ``linger_ms`` (how long a batch waits for more records before it may go; 0 by default,
    see "Batching without lingering" in the module docstring), ``fetch_max_wait_ms`` (the
    longest a fetch waits at the broker for new data: the latency floor of an idle
    partition), ``operation_timeout`` (seconds, bounds every call), ``max_backoff``
    (reconnect), ``health_interval`` (seconds between probes), ``topic_prefix``,
    ``replication_factor`` (of created topics), ``client_options`` (extra keyword arguments
    for the aiokafka clients, e.g. security settings).

    Persistence (see "Storage" in the module docstring): ``recent_size`` (frames per room the
    recent-messages read returns at most), ``recent_scan`` (records per partition it reads at
    most), ``redelivery_after`` (seconds: the storage group's session timeout, after which a
    silent worker's partitions go to the others; brokers enforce a minimum, 6 s by default on
    Apache Kafka).

    ``max_pending`` bounds the records handed to the producer and not yet acknowledged
    (see "Publishing" in the module docstring).
    """

    name = "kafka"
    counts_receivers = False
    supports_storage = True

    def __init__(
        self,
        bootstrap_servers: str | Sequence[str] = "127.0.0.1:9092",
        *,
        partitions: int = 16,
        acks: str | int = "all",
        linger_ms: int = 0,
        fetch_max_wait_ms: int = 10,
        operation_timeout: float = 5.0,
        max_backoff: float = 5.0,
        health_interval: float = 1.0,
        topic_prefix: str = "roomrouter",
        replication_factor: int = 1,
        client_options: dict[str, Any] | None = None,
        recent_size: int = 1000,
        recent_scan: int = 10_000,
        redelivery_after: float = 10.0,
        max_pending: int = 10_000,
    ) -> None:
        if acks not in ("all", 1, -1):
            raise ConfigurationError(
                f"acks must be 'all' or 1, not {acks!r}: the join protocol needs the offset "
                "the broker assigned, which acks=0 does not return"
            )
        if partitions < 1 or replication_factor < 1:
            raise ConfigurationError("partitions and replication_factor must be >= 1")
        if not 0 <= linger_ms <= 1000 or not 0 <= fetch_max_wait_ms <= 60_000:
            raise ConfigurationError("need 0 <= linger_ms <= 1000 and 0 <= fetch_max_wait_ms")
        if operation_timeout <= 0 or health_interval <= 0 or max_backoff <= 0:
            raise ConfigurationError("timeouts and intervals must be > 0")
        if max_pending < 1:
            raise ConfigurationError("max_pending must be >= 1")
        if recent_size < 1 or recent_scan < 1 or redelivery_after <= 0:
            raise ConfigurationError("recent_size, recent_scan and redelivery_after must be > 0")
        if not LEGAL_TOPIC.fullmatch(topic_prefix):
            raise ConfigurationError(f"topic_prefix must match {LEGAL_TOPIC.pattern}")
        if isinstance(bootstrap_servers, str):
            bootstrap_servers = [s for s in bootstrap_servers.split(",") if s]
        self.bootstrap_servers = list(bootstrap_servers)
        self.partitions = partitions
        self.acks = acks
        self.linger_ms = linger_ms
        self.fetch_max_wait_ms = fetch_max_wait_ms
        self.operation_timeout = operation_timeout
        self.max_backoff = max_backoff
        self.health_interval = health_interval
        self.topic_prefix = topic_prefix
        self.replication_factor = replication_factor
        self.client_options = dict(client_options or {})
        self.recent_size = recent_size
        self.recent_scan = recent_scan
        self.redelivery_after = redelivery_after
        self.max_pending = max_pending
        #: Records of hosted rooms dropped because they were older than the room's join.
        self.skipped_before_join = 0
        #: Keeps the live reader's partitions contiguous (its counters: holes waited for,
        #: offsets given up on).
        self.offset_guard = OffsetGuard(patience=operation_timeout)

        self._ctx: BrokerContext | None = None
        self._session: _Session | None = None
        self._connected = anyio.Event()
        self._closed = False
        self._lock = anyio.Lock()  # one assignment change (subscribe, restore) at a time
        # room key -> (partition, first offset to deliver)
        self._rooms: dict[bytes, tuple[int, int]] = {}
        self._positions: dict[TopicPartition, int] = {}  # next offset to read, per assigned tp
        self._control_marker = -1  # the offset of this node's last control-partition marker
        # Publishing (see _enqueue): the send queue in call order, the records the producer
        # holds in hand order, and how many of the current session's are unacknowledged.
        self._queue: deque[_Send] = deque()
        self._inflight: deque[_Send] = deque()
        self._unacked = 0
        self._epoch = 0  # counts sessions: answers of an older producer do not count
        self._sender_idle = False
        self._send_wake = anyio.Event()
        self._watch_idle = False
        self._watch_wake = anyio.Event()
        self._watching = False  # the watchdog runs: only then may a publish wait
        self._probe_seen = 0
        self._probe_event = anyio.Event()
        self._history_lock = anyio.Lock()  # one recent() scan at a time per node
        # Lost sessions still being closed in the background. The router cancels its tasks
        # before it calls aclose, which closes what that interrupted (else their sockets leak).
        self._closing: set[_Session] = set()

    @classmethod
    def from_url(cls, url: str, **options: Any) -> KafkaBroker:
        """``kafka://host:port[,host:port][?partitions=16&acks=all&linger_ms=0&
        fetch_max_wait_ms=10&operation_timeout=5&max_backoff=5&health_interval=1&
        topic_prefix=roomrouter&replication_factor=1&recent_size=1000&recent_scan=10000&
        redelivery_after=10&max_pending=10000]``; a host without port gets 9092."""
        parts = urlsplit(url)
        if parts.scheme.lower() != "kafka":
            raise ConfigurationError(f"not a kafka:// URL: {redact(url)!r}")
        servers = []
        for host in parts.netloc.split(","):
            host = host.strip()
            if not host:
                continue
            servers.append(host if re.search(r":\d+$", host) else f"{host}:9092")
        if not servers:
            raise ConfigurationError(f"no broker address in {redact(url)!r}")
        converters: dict[str, Any] = {
            "partitions": int,
            "acks": lambda v: "all" if v in ("all", "-1") else int(v),
            "linger_ms": int,
            "fetch_max_wait_ms": int,
            "operation_timeout": float,
            "max_backoff": float,
            "health_interval": float,
            "topic_prefix": str,
            "replication_factor": int,
            "recent_size": int,
            "recent_scan": int,
            "redelivery_after": float,
            "max_pending": int,
        }
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            convert = converters.get(key)
            if convert is None:
                raise ConfigurationError(f"unknown option {key!r} in {redact(url)!r}")
            try:
                options.setdefault(key, convert(value))
            except ValueError as exc:
                raise ConfigurationError(f"bad {key} in {redact(url)!r}") from exc
        return cls(servers, **options)

    # -- names ----------------------------------------------------------------------------------

    @staticmethod
    def topic_names(namespace: str, topic_prefix: str = "roomrouter") -> tuple[str, str]:
        """The (data, control) topic names of ``namespace``."""
        data, control, _ = names(namespace, topic_prefix)
        return data, control

    @staticmethod
    def storage_group(namespace: str, topic_prefix: str = "roomrouter") -> str:
        """The consumer group of ``namespace``'s storage workers."""
        return names(namespace, topic_prefix)[2]

    def partition_for(self, room: str) -> int:
        """The data partition that holds ``room`` (as of the current connection)."""
        return self._partition_of(room.encode())

    def _partition_of(self, key: bytes) -> int:
        count = self._session.partitions if self._session is not None else self.partitions
        return partition(key, count)

    def client_options_with(self, client_id: str) -> dict[str, Any]:
        """Keyword arguments for one more aiokafka client of this broker's configuration."""
        return {
            "bootstrap_servers": self.bootstrap_servers,
            "client_id": client_id,
            "request_timeout_ms": int(self.operation_timeout * 1000),
            **self.client_options,
        }

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self, context: BrokerContext) -> None:
        self._ctx = context
        self._data_topic, self._control_topic, self._storage_group = names(
            context.namespace, self.topic_prefix
        )
        self._direct_key = b"@" + context.node_id.encode()
        self._probe_key = b"#" + context.node_id.encode()
        self._client_id = "roomrouter-" + re.sub(r"[^A-Za-z0-9_.-]", "_", context.node_id)
        # A broker that just created the topics may refuse the first writes for a moment
        # (Tansu answers UNKNOWN_SERVER_ERROR): retry within the operation timeout.
        deadline = anyio.current_time() + self.operation_timeout
        delay = 0.05
        while True:
            try:
                await self._connect(deadline - anyio.current_time())
                break
            except BrokerUnavailable:
                if anyio.current_time() + delay >= deadline:
                    raise
                await anyio.sleep(delay)
                delay *= 2
        context.task_group.start_soon(self._supervise, name=f"kafka reader {context.node_id}")
        context.task_group.start_soon(self._send_loop, name=f"kafka sender {context.node_id}")
        self._watching = True  # from now on: the task starts before any deadline can pass
        context.task_group.start_soon(self._watchdog, name=f"kafka publish timer {context.node_id}")

    async def aclose(self) -> None:
        self._closed = True
        self._watching = False
        error = BrokerUnavailable("broker closed")
        # Failed, not removed: the sender may be inside send() with the head; it drops
        # settled records itself.
        for item in self._queue:
            item.fail(error)
        session, self._session = self._session, None
        sessions = [*self._closing, *([session] if session is not None else [])]
        self._closing.clear()
        if sessions:
            with anyio.move_on_after(self.operation_timeout, shield=True):
                for each in sessions:
                    await _close_session(each)
        # Stopping the producer answers what it held; a stop cut short may not have, and the
        # watchdog goes with the router: nobody may wait on them for ever.
        for item in self._inflight:
            item.fail(PublishOutcomeUnknown("Kafka broker closed with the record in flight"))
        self._inflight.clear()

    async def _connect(self, limit: float | None = None) -> None:
        """Open a session: topics, clients, control partition entered, rooms restored.
        Takes at most ``limit`` seconds (default: the operation timeout)."""
        options = self.client_options_with(self._client_id)
        try:
            producer = AIOKafkaProducer(
                acks=self.acks,
                linger_ms=self.linger_ms,
                enable_idempotence=False,
                **options,
            )
            consumer = AIOKafkaConsumer(
                group_id=None,
                enable_auto_commit=False,
                auto_offset_reset="none",  # never let the client pick a position (see docstring)
                fetch_max_wait_ms=self.fetch_max_wait_ms,
                isolation_level="read_uncommitted",
                **options,
            )
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(f"bad Kafka client options: {exc}") from exc
        session: _Session | None = None
        try:
            with anyio.fail_after(self.operation_timeout if limit is None else limit):
                partitions = await ensure_topics(
                    options,
                    self._data_topic,
                    self._control_topic,
                    self.partitions,
                    self.replication_factor,
                )
                await producer.start()
                await consumer.start()
                session = _Session(
                    producer, consumer, partitions, TopicPartition(self._control_topic, 0)
                )
                async with self._lock:
                    await self._restore(session)
        except (*ERRORS, BrokerUnavailable) as exc:
            with anyio.move_on_after(self.operation_timeout, shield=True):
                await quiet_stop(producer, consumer)
            where = ",".join(self.bootstrap_servers)
            raise unreachable("Kafka", where, None, exc) from exc
        self._session = session
        # A new producer: the old one's records are answered (or not) by it, not counted here.
        self._epoch += 1
        self._unacked = 0
        self._connected.set()
        if self._queue:
            self._wake_sender()

    async def _restore(self, session: _Session) -> None:
        """Enter the control partition and every room's partition at fresh markers.

        A reconnect may face recreated (empty) partitions, so old positions and thresholds are
        meaningless: everything restarts at a marker. Caller holds the lock.
        """
        rooms = {key: partition(key, session.partitions) for key in self._rooms}
        control_marker = await self._mark(session, control=True)
        markers = await self._mark(session, partitions=set(rooms.values()))
        # Synchronous from here: the reader sees the new assignment and thresholds together.
        # (An unsubscribe may have run meanwhile; it takes no lock, so keep only what is left.)
        self._rooms = {
            key: (rooms[key], markers[rooms[key]] + 1) for key in self._rooms if key in rooms
        }
        self._control_marker = control_marker[0]
        self._positions = {session.control_tp: control_marker[0] + 1}
        self._assign(session, {p: markers[p] + 1 for p in markers})

    async def _mark(
        self, session: _Session, *, control: bool = False, partitions: Iterable[int] = ()
    ) -> dict[int, int]:
        """Append a marker to each partition; return partition -> the marker's offset."""
        targets: dict[int, tuple[str, bytes | None]]
        if control:
            targets = {0: (self._control_topic, self._probe_key)}
        else:
            targets = {p: (self._data_topic, None) for p in partitions}
        futures: dict[int, asyncio.Future[Any]] = {}
        try:
            for p, (topic, key) in targets.items():
                futures[p] = await session.producer.send(topic, b"", key=key, partition=p)
            results = await asyncio.gather(*futures.values(), return_exceptions=True)
        except BaseException:
            for future in futures.values():
                future.add_done_callback(retrieve)
            raise
        offsets = {}
        for p, result in zip(futures, results, strict=True):
            if isinstance(result, BaseException):
                raise BrokerUnavailable(
                    f"Kafka marker write failed: {describe(result)}"
                ) from result
            offsets[p] = result.offset
        return offsets

    def _assign(self, session: _Session, seeks: dict[int, int]) -> None:
        """Make the consumer's assignment the control partition plus the partitions of
        ``self._rooms``. Partitions that stay keep their position; new ones start at ``seeks``.
        Synchronous, so no fetched record is handed out between assign and seek."""
        wanted = {session.control_tp} | {
            TopicPartition(self._data_topic, p) for p, _ in self._rooms.values()
        }
        consumer = session.consumer
        if wanted == consumer.assignment():
            return
        positions = {}
        for tp in wanted:
            position = self._positions.get(tp)
            if position is None:
                position = seeks[tp.partition]
            positions[tp] = position
        consumer.assign(list(wanted))
        for tp, position in positions.items():
            consumer.seek(tp, position)
        self._positions = positions

    # -- reader and health ------------------------------------------------------------------------

    async def _supervise(self) -> None:
        """Run the reader and the health probe; on failure reconnect and restore."""
        assert self._ctx is not None
        node_id = self._ctx.node_id
        backoff = 0.0
        while not self._closed:
            session = self._session
            if session is None:
                # A session that fails at once, again and again (a broker that accepts
                # connections but not our records), must not turn into a reconnect storm.
                await anyio.sleep(backoff)
                await self._reconnect()
                continue
            began = anyio.current_time()
            reason: BaseException | None = None
            async with anyio.create_task_group() as tg:

                async def watch(loop: Any, session: _Session = session) -> None:
                    nonlocal reason
                    try:
                        await loop(session)
                    except (*ERRORS, _SessionLost, BrokerUnavailable) as exc:
                        reason = exc
                    except Exception as exc:  # unexpected: log it, but keep the node alive
                        reason = exc
                        log.exception("node %s: Kafka reader failed", node_id)
                    tg.cancel_scope.cancel()

                tg.start_soon(watch, self._read_loop)
                tg.start_soon(watch, self._probe_loop)
            if self._closed:
                return
            log.warning("node %s: Kafka session lost: %r", node_id, reason)
            if anyio.current_time() - began < 10 * self.health_interval:
                backoff = min(max(2 * backoff, 0.05), self.max_backoff)
            else:
                backoff = 0.0
            if self._session is session:
                self._session = None
                self._connected = anyio.Event()
                # Close in the background: a producer flushing to a dead broker takes up to the
                # request timeout, and the reconnect should not wait for that.
                self._closing.add(session)
                self._ctx.task_group.start_soon(self._close_lost, session)

    async def _close_lost(self, session: _Session) -> None:
        await _close_session_quietly(session, 2 * self.operation_timeout)
        self._closing.discard(session)  # not on cancellation: aclose finishes the job

    async def _reconnect(self) -> None:
        assert self._ctx is not None
        delay = 0.05
        while not self._closed:
            try:
                await self._connect()
            except BrokerUnavailable as exc:
                log.info("node %s: Kafka reconnect failed (%s); retry in %.2fs",
                         self._ctx.node_id, exc, delay)  # fmt: skip
                await anyio.sleep(delay)
                delay = min(delay * 2, self.max_backoff)
                continue
            log.info("node %s: Kafka reconnected, %d room(s) restored",
                     self._ctx.node_id, len(self._rooms))  # fmt: skip
            self._ctx.on_reconnect()
            return

    async def _read_loop(self, session: _Session) -> None:
        assert self._ctx is not None
        ctx = self._ctx
        consumer = session.consumer
        control_tp = session.control_tp
        direct_key, probe_key = self._direct_key, self._probe_key
        guard = self.offset_guard
        while True:
            batches = await consumer.getmany(timeout_ms=1000)
            if self._session is not session:
                return
            for tp, fetched in batches.items():
                # Contiguous or not at all: see OffsetGuard (Tansu serves past unreadable
                # offsets; taking those would lose the hole's record for good).
                records = guard.accept(consumer, tp, fetched, self._positions.get(tp))
                if not records:
                    continue
                if tp == control_tp:
                    for record in records:
                        key = record.key
                        if key in (_BROADCAST, direct_key):
                            _call(ctx.on_control, record.value, ctx)
                        elif key == probe_key and record.value:
                            self._probe_seen = max(self._probe_seen, _int(record.value))
                            self._probe_event.set()
                else:
                    rooms = self._rooms
                    for record in records:
                        key = record.key
                        if key is None:
                            continue  # a marker
                        room = rooms.get(key)
                        if room is None:
                            self.filtered += 1
                        elif record.offset < room[1]:
                            self.skipped_before_join += 1
                        else:
                            _call_data(key, record.value, ctx)
                self._positions[tp] = records[-1].offset + 1

    async def _probe_loop(self, session: _Session) -> None:
        """Append a probe to the control partition and read it back, forever; raise if the
        round trip fails or takes longer than the operation timeout."""
        seq = self._probe_seen
        while True:
            await anyio.sleep(self.health_interval)
            seq += 1
            with anyio.move_on_after(self.operation_timeout):
                future = await session.producer.send(
                    self._control_topic, str(seq).encode(), key=self._probe_key, partition=0
                )
                try:
                    await future
                finally:
                    future.add_done_callback(retrieve)
                while self._probe_seen < seq:
                    self._probe_event = anyio.Event()
                    await self._probe_event.wait()
            if self._probe_seen < seq:
                raise _SessionLost(f"probe {seq} not read back within {self.operation_timeout}s")

    # -- subscriptions --------------------------------------------------------------------------

    async def subscribe(self, rooms: Collection[str]) -> None:
        keys = [room.encode() for room in rooms]
        if not keys:
            return
        try:
            with anyio.fail_after(self.operation_timeout):
                while True:
                    # Wait for a session outside the lock: a reconnect needs the lock to restore.
                    session = await self._wait_session()
                    async with self._lock:
                        if self._session is not session:
                            continue
                        wanted = {key: self._partition_of(key) for key in keys}
                        markers = await self._mark(session, partitions=set(wanted.values()))
                        if self._session is not session:
                            raise BrokerUnavailable("Kafka connection lost during subscribe")
                        # Synchronous from here (see the module docstring).
                        for key, p in wanted.items():
                            self._rooms[key] = (p, markers[p] + 1)
                        self._assign(session, {p: offset + 1 for p, offset in markers.items()})
                        return
        except TimeoutError as exc:
            raise BrokerUnavailable("Kafka subscribe timed out") from exc
        except ERRORS as exc:
            raise BrokerUnavailable(f"Kafka subscribe failed: {describe(exc)}") from exc

    async def unsubscribe(self, rooms: Collection[str]) -> None:
        for room in rooms:
            self._rooms.pop(room.encode(), None)
        session = self._session
        if session is not None:
            try:
                self._assign(session, {})
            except ERRORS as exc:
                raise BrokerUnavailable(f"Kafka unassign failed: {describe(exc)}") from exc

    async def count_nodes(self) -> int | None:
        """0 if this node's marker is the control partition's first record: every node
        appends one before it says anything, so no node entered the partition before; one
        that enters later appends its marker after ours, so all it says (its Hello first)
        reaches this node. Otherwise unknown: Kafka says nobody who reads a partition
        without a consumer group (docs/architecture.md, "The cluster view", rule 2)."""
        return 0 if self._control_marker == 0 else None

    async def _wait_session(self) -> _Session:
        while self._session is None:
            if self._closed:
                raise BrokerUnavailable("broker closed")
            await self._connected.wait()
        return self._session

    # -- publishing -----------------------------------------------------------------------------

    async def publish(self, room: str, frame: bytes, *, to: Collection[str] | None = None) -> None:
        await self._enqueue(False, room.encode(), frame)

    async def publish_persistent(
        self, room: str, frame: bytes, *, live: bool, to: Collection[str] | None = None
    ) -> None:
        """One record, like :meth:`publish`, flagged for storage: the data topic is the storage
        queue and the recent-messages cache at once. ``live`` changes nothing -- a node that
        does not host the room drops the record by key, as it drops any foreign room's."""
        await self._enqueue(False, room.encode(), frame, stored=True)

    async def publish_control(self, frame: bytes, *, to: str | None = None) -> int | None:
        await self._enqueue(True, _BROADCAST if to is None else b"@" + to.encode(), frame)
        return None

    async def _enqueue(
        self, control: bool, key: bytes, value: bytes, *, stored: bool = False
    ) -> None:
        if not self._watching:  # closed, not started, or its tasks are gone with the router
            raise BrokerUnavailable("broker closed" if self._closed else "broker not running")
        # Takes its place in the queue before the first await: call order is send order. No
        # timer of its own: the watchdog settles the future at the deadline.
        future = asyncio.get_running_loop().create_future()
        deadline = future.get_loop().time() + self.operation_timeout
        item = _Send(control, key, value, deadline, stored, future)
        self._queue.append(item)
        if self._sender_idle:
            self._wake_sender()
        if self._watch_idle:
            self._watch_idle = False
            self._watch_wake.set()
        # A cancelled caller cancels the future: the sender then skips the record (or, once
        # handed, its answer is ignored).
        await future

    def _wake_sender(self) -> None:
        self._sender_idle = False
        self._send_wake.set()

    async def _send_loop(self) -> None:
        """Hand queued records to the producer, many per wake-up, without awaiting answers.

        Order: one task hands records in queue order, and the producer keeps one partition's
        records in that order. Bound: at most ``max_pending`` handed and unanswered; beyond
        that the queue waits (backpressure: the callers stay suspended in ``_enqueue``)."""
        queue = self._queue
        while True:
            if not queue or self._unacked >= self.max_pending:
                self._sender_idle = True
                self._send_wake = anyio.Event()
                await self._send_wake.wait()
                continue
            session = self._session
            if session is None:
                # The watchdog fails what expires meanwhile; _connect wakes us.
                self._sender_idle = True
                self._send_wake = anyio.Event()
                await self._send_wake.wait()
                continue
            await self._send_batch(session)

    async def _send_batch(self, session: _Session) -> None:
        """Move records from the head of the queue into one producer batch per partition and
        hand those on, without awaiting the answers; one done callback per batch settles its
        publishes. The producer builds batches itself too, but its ``send()`` costs a coroutine,
        a future and metadata lookups per record -- most of the publisher's time.

        One timer per round: submitting waits when the partition already has a batch waiting
        to go (the producer keeps one per partition, behind the one in flight); past the
        deadline of the round's first record, what was not submitted fails as not sent."""
        queue, inflight, producer = self._queue, self._inflight, session.producer
        while inflight and inflight[0].future.done():  # answered: let them go
            inflight.popleft()
        now = anyio.current_time()
        while queue and (queue[0].future.done() or queue[0].deadline <= now):
            # Too late to send: it would be handed on before the timer could stop it.
            queue.popleft().fail(BrokerUnavailable("Kafka did not take the record in time"))
        if not queue:
            return
        # Fill: synchronous, so nothing joins the queue's head meanwhile. Stops at a full
        # batch (the next round starts a new one) or at the bound.
        batches: dict[int, tuple[Any, list[_Send]]] = {}  # partition key -> (builder, items)
        room = self.max_pending - self._unacked
        partitions = session.partitions
        while queue and room > 0:
            item = queue[0]
            if item.future.done():  # the caller gave up, or the watchdog failed it
                queue.popleft()
                continue
            part = -1 if item.control else partition(item.key, partitions)
            entry = batches.get(part)
            if entry is None:
                entry = batches[part] = (producer.create_batch(), [])
            headers = STORED_HEADERS if item.stored else None
            if (
                entry[0].append(timestamp=None, key=item.key, value=item.value, headers=headers)
                is None
            ):
                break  # full (a first record always fits)
            entry[1].append(queue.popleft())
            room -= 1
        deadline = batches[next(iter(batches))][1][0].deadline if batches else now
        epoch = self._epoch
        try:
            with anyio.move_on_after(deadline - now):
                for part, (builder, items) in list(batches.items()):
                    topic = self._control_topic if part == -1 else self._data_topic
                    try:
                        future = await producer.send_batch(builder, topic, partition=max(part, 0))
                    except ERRORS as exc:
                        del batches[part]
                        error = BrokerUnavailable(f"Kafka send failed: {describe(exc)}")
                        for item in items:
                            item.fail(error)
                        continue
                    del batches[part]
                    # Handed on: from now on each may reach the broker.
                    self._unacked += len(items)
                    inflight.extend(items)
                    future.add_done_callback(functools.partial(self._answered, epoch, items))
        finally:
            # Stopped by the timer (or the router closing): these never left, and neither the
            # queue nor the watchdog knows them any more.
            for _, items in batches.values():
                for item in items:
                    item.fail(BrokerUnavailable("Kafka did not take the record in time; not sent"))

    def _answered(self, epoch: int, items: list[_Send], future: asyncio.Future[Any]) -> None:
        if epoch == self._epoch:
            self._unacked -= len(items)
            if self._sender_idle and self._queue:
                self._wake_sender()
        _settle(items, future)

    async def _watchdog(self) -> None:
        """Fail every publish whose deadline passed: ``BrokerUnavailable`` if the record is
        still queued, ``PublishOutcomeUnknown`` if the producer has it. Deadlines grow along
        both deques, so the heads say when to look next: one timer for all publishes."""
        queue, inflight = self._queue, self._inflight
        try:
            await self._watch(queue, inflight)
        finally:
            # Cancelled with the router (aclose may come later, or never): without the
            # watchdog no deadline holds, so nobody may stay waiting.
            self._watching = False
            for item in queue:
                item.fail(BrokerUnavailable("broker stopped; not sent"))
            for item in inflight:
                item.fail(PublishOutcomeUnknown("broker stopped with the record in flight"))

    async def _watch(self, queue: deque[_Send], inflight: deque[_Send]) -> None:
        while True:
            now = anyio.current_time()
            while inflight and (inflight[0].future.done() or inflight[0].deadline <= now):
                item = inflight.popleft()
                item.fail(
                    PublishOutcomeUnknown(
                        "Kafka did not acknowledge the record in time; the producer had it, "
                        "so it may have been appended"
                    )
                )
            # Still queued (the records of a round being submitted are the sender's: its
            # timer settles them).
            while queue and (queue[0].future.done() or queue[0].deadline <= now):
                queue.popleft().fail(
                    BrokerUnavailable("Kafka did not take the record in time; not sent")
                )
            heads = [d[0].deadline for d in (queue, inflight) if d]
            if not heads:
                self._watch_idle = True
                self._watch_wake = anyio.Event()
                await self._watch_wake.wait()
            else:
                await anyio.sleep(max(min(heads) - now, 0.001))

    # -- persistence ----------------------------------------------------------------------------

    async def recent(
        self, room: str, *, since: str | None = None, limit: int | None = None
    ) -> RecentFrames:
        """The room's last ``recent_size`` stored frames, read back from its partition (see
        ``_kafka_storage.scan_recent``). A marker appended first fixes the end: every frame
        whose publish returned before this call sits below it. One scan at a time per node."""
        key = room.encode()
        try:
            with anyio.fail_after(self.operation_timeout):
                session = await self._wait_session()
            async with self._history_lock:
                if session.history is None:
                    await self._open_history(session)
                part = partition(key, session.partitions)
                with anyio.fail_after(self.operation_timeout):
                    end = (await self._mark(session, partitions=[part]))[part]
                return await scan_recent(
                    session.history,
                    session.admin,
                    group=self._storage_group,
                    tp=TopicPartition(self._data_topic, part),
                    key=key,
                    end=end,
                    size=self.recent_size,
                    scan=self.recent_scan,
                    step_timeout=self.operation_timeout,
                    since=since,
                    limit=limit,
                )
        except TimeoutError as exc:
            raise BrokerUnavailable("Kafka history read timed out") from exc
        except ERRORS as exc:
            raise BrokerUnavailable(f"Kafka history read failed: {describe(exc)}") from exc

    async def _open_history(self, session: _Session) -> None:
        """Open the session's history reader and admin client (both or neither)."""
        options = self.client_options_with(self._client_id + "-history")
        admin = reader = None
        try:
            with anyio.fail_after(self.operation_timeout):
                admin = await open_admin(options)
                reader = await open_reader(options, self.fetch_max_wait_ms)
            if self._session is not session:  # replaced meanwhile: it would never close them
                raise BrokerUnavailable("Kafka connection lost while reading history")
        except BaseException:
            with anyio.CancelScope(shield=True):
                await quiet_stop(reader, admin)
            raise
        session.admin, session.history = admin, reader

    def storage_consumer(self, namespace: str, consumer: str) -> StorageConsumer:
        return KafkaStorageConsumer(self, namespace, consumer)

    # -- introspection (tests, inspect) ---------------------------------------------------------

    def assigned_partitions(self) -> frozenset[int]:
        """The data partitions in the consumer's real assignment."""
        session = self._session
        if session is None:
            return frozenset()
        return frozenset(
            tp.partition for tp in session.consumer.assignment() if tp.topic == self._data_topic
        )

    async def broker_subscriptions(self) -> frozenset[str]:
        """Rooms this node hosts whose partition is in the consumer's real assignment."""
        assigned = self.assigned_partitions()
        return frozenset(key.decode() for key, (p, _) in self._rooms.items() if p in assigned)


def _call(handler: Any, value: bytes | None, ctx: BrokerContext) -> None:
    try:
        handler(value if value is not None else b"")
    except Exception:  # a handler bug must not kill the reader
        log.exception("node %s: message handler raised", ctx.node_id)


def _call_data(key: bytes, value: bytes | None, ctx: BrokerContext) -> None:
    # The record key is the room (it chose the partition, and it is what the node filters by):
    # the router checks the envelope against it.
    try:
        ctx.on_data(key.decode(errors="replace"), value if value is not None else b"")
    except Exception:  # a handler bug must not kill the reader
        log.exception("node %s: message handler raised", ctx.node_id)


def _int(value: bytes) -> int:
    try:
        return int(value)
    except ValueError:
        return 0


async def _close_session(session: _Session) -> None:
    await quiet_stop(session.consumer, session.producer, session.history, session.admin)


async def _close_session_quietly(session: _Session, limit: float) -> None:
    with anyio.move_on_after(limit, shield=True):
        await _close_session(session)
