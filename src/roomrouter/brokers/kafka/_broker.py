"""The Kafka node: :class:`KafkaBroker`, its options and lifecycle, the reconnect loop and
subscriptions (see the package docstring for the protocol)."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Collection, Sequence
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import anyio
from aiokafka import TopicPartition

from ..._errors import BrokerUnavailable, ConfigurationError, describe, unreachable
from ..._urls import redact
from .._base import Broker, BrokerContext, RecentFrames, StorageConsumer
from ..transport import Backoff, keep_connected
from ._common import ERRORS, LEGAL_TOPIC, OffsetGuard, ensure_topics, names, partition, quiet_stop
from ._publish import Publisher, Record
from ._reader import BROADCAST, Reader, SessionLost
from ._session import Session, close_session, new_clients
from ._storage import KafkaStorageConsumer, open_admin, open_reader, scan_recent

__all__ = ["KafkaBroker"]

log = logging.getLogger("roomrouter.kafka")


class KafkaBroker(Broker):
    """See the package docstring (:mod:`roomrouter.brokers.kafka`).

    Options: ``partitions`` (for a data topic this node creates), ``acks`` (``"all"`` or ``1``),
    ``linger_ms`` (how long a batch waits for more records before it may go; 0 by default,
    see "Batching without lingering" in the package docstring), ``fetch_max_wait_ms`` (the
    longest a fetch waits at the broker for new data: the latency floor of an idle
    partition), ``operation_timeout`` (seconds, bounds every call), ``max_backoff``
    (reconnect), ``health_interval`` (seconds between probes), ``topic_prefix``,
    ``replication_factor`` (of created topics), ``client_options`` (extra keyword arguments
    for the aiokafka clients, e.g. security settings).

    Persistence (see "Storage" in the package docstring): ``recent_size`` (frames per room the
    recent-messages read returns at most), ``recent_scan`` (records per partition it reads at
    most), ``redelivery_after`` (seconds: the storage group's session timeout, after which a
    silent worker's partitions go to the others; brokers enforce a minimum, 6 s by default on
    Apache Kafka).

    ``max_pending`` bounds the records handed to the producer and not yet acknowledged
    (see "Publishing" in the package docstring).
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
        #: Keeps the live reader's partitions contiguous (its counters: holes waited for,
        #: offsets given up on).
        self.offset_guard = OffsetGuard(patience=operation_timeout)

        self._ctx: BrokerContext | None = None
        self._session: Session | None = None
        self._connected = anyio.Event()
        self._closed = False
        self._lock = anyio.Lock()  # one assignment change (subscribe, restore) at a time
        # Made by start() (they need the topics and the node): what the node reads, and the
        # publish path, gone with the router's tasks.
        self._reader: Reader | None = None
        self._publisher: Publisher | None = None
        self._history_lock = anyio.Lock()  # one recent() scan at a time per node
        # Lost sessions still being closed in the background. The router cancels its tasks
        # before it calls aclose, which closes what that interrupted (else their sockets leak).
        self._closing: set[Session] = set()

    @classmethod
    def from_url(cls, url: str, **options: Any) -> KafkaBroker:
        """``kafka://host:port[,host:port][?partitions=16&acks=all&linger_ms=0&
        fetch_max_wait_ms=10&operation_timeout=5&max_backoff=5&health_interval=1&
        topic_prefix=roomrouter&replication_factor=1&recent_size=1000&recent_scan=10000&
        redelivery_after=10&max_pending=10000]``; a host without port gets 9092."""
        parts = urlsplit(url)
        if parts.scheme.lower() != "kafka":
            raise ConfigurationError(f"not a kafka:// URL: {redact(url)!r}")
        if "@" in parts.netloc:
            # aiokafka takes no credentials in an address: kept there, they would reach its
            # errors and ours ("Kafka at user:pw@host"). SASL and TLS go in client_options.
            raise ConfigurationError(
                f"credentials in a kafka:// URL are not supported: {redact(url)!r}; pass "
                "KafkaBroker(client_options={'security_protocol': ..., 'sasl_mechanism': ...})"
            )
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
        self._client_id = "roomrouter-" + re.sub(r"[^A-Za-z0-9_.-]", "_", context.node_id)
        self._reader = Reader(context, self._data_topic, self._control_topic, self.offset_guard)
        service = "Kafka at " + ",".join(self.bootstrap_servers)
        publisher = Publisher(
            service,
            self.operation_timeout,
            self.max_pending,
            self._data_topic,
            self._control_topic,
        )
        self._publisher = publisher
        # A broker that just created the topics may refuse the first writes for a moment
        # (Tansu answers UNKNOWN_SERVER_ERROR): retry within the operation timeout.
        deadline = anyio.current_time() + self.operation_timeout
        backoff = self._backoff()
        while True:
            try:
                await self._connect(deadline - anyio.current_time())
                break
            except BrokerUnavailable:
                delay = backoff.next()
                if anyio.current_time() + delay >= deadline:
                    raise
                await anyio.sleep(delay)
        # The publisher's task runs the outbox's watchdog: it starts before any deadline can
        # pass, and once the router's tasks are gone, it has failed every publish left.
        context.task_group.start_soon(publisher.run, name=f"kafka sender {context.node_id}")
        context.task_group.start_soon(self._supervise, name=f"kafka reader {context.node_id}")

    def _backoff(self) -> Backoff:
        return Backoff(min(0.05, self.max_backoff), self.max_backoff)

    async def aclose(self) -> None:
        self._closed = True
        publisher = self._publisher
        if publisher is not None:
            publisher.outbox.fail_queued("the broker was closed")
        session, self._session = self._session, None
        sessions = [*self._closing, *([session] if session is not None else [])]
        self._closing.clear()
        if sessions:
            with anyio.move_on_after(self.operation_timeout, shield=True):
                for each in sessions:
                    await close_session(each, self.operation_timeout)
        # Stopping the producer answers what it held; a stop cut short may not have, and the
        # watchdog goes with the router: nobody may wait on them for ever.
        if publisher is not None:
            publisher.outbox.close("the broker was closed")

    async def _connect(self, limit: float | None = None) -> Session:
        """Open a session: topics, clients, control partition entered, rooms restored.
        Takes at most ``limit`` seconds (default: the operation timeout)."""
        assert self._reader is not None and self._publisher is not None
        options = self.client_options_with(self._client_id)
        producer, consumer = new_clients(
            options,
            acks=self.acks,
            linger_ms=self.linger_ms,
            fetch_max_wait_ms=self.fetch_max_wait_ms,
        )
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
                session = Session(
                    producer, consumer, partitions, TopicPartition(self._control_topic, 0)
                )
                async with self._lock:
                    await self._reader.restore(session)
        except (*ERRORS, BrokerUnavailable) as exc:
            with anyio.move_on_after(self.operation_timeout, shield=True):
                await quiet_stop(producer, consumer)
            where = ",".join(self.bootstrap_servers)
            raise unreachable("Kafka", where, None, exc) from exc
        self._session = session
        self._connected.set()
        self._publisher.attach(producer, partitions)
        return session

    # -- the session: reader, health probe, reconnect ----------------------------------------

    async def _supervise(self) -> None:
        """Keep a session (the transport core's reconnect template): serve it -- the reader
        and the health probe -- until it is lost, then reconnect with capped backoff
        (recreating missing topics, re-entering every partition at fresh markers) and tell
        the router. A session that fails at once, again and again (a broker that accepts
        connections but not our records), meets a growing delay, not a reconnect storm."""
        assert self._ctx is not None
        await keep_connected(
            self._session_or_connect,
            self._serve,
            on_restored=self._reconnected,
            backoff=self._backoff(),
            what=f"node {self._ctx.node_id}: Kafka session",
            errors=ERRORS,
            stable_after=10 * self.health_interval,
        )

    async def _session_or_connect(self) -> Session:
        """The session start() opened, the first time; a new one after a loss."""
        if self._closed:
            await anyio.sleep_forever()
        session = self._session
        return session if session is not None else await self._connect()

    def _reconnected(self) -> None:
        assert self._ctx is not None
        log.info("node %s: Kafka reconnected, %d room(s) restored",
                 self._ctx.node_id, len(self._reader.rooms if self._reader else ()))  # fmt: skip
        self._ctx.on_reconnect()

    async def _serve(self, session: Session) -> None:
        """Run the reader and the health probe until either fails; then drop the session
        (closed in the background) and raise why."""
        assert self._ctx is not None and self._reader is not None
        ctx, reader = self._ctx, self._reader
        reason: BaseException | None = None
        async with anyio.create_task_group() as tg:

            async def watch(loop: Any, *args: Any) -> None:
                nonlocal reason
                try:
                    await loop(session, *args)
                except (*ERRORS, BrokerUnavailable) as exc:
                    reason = exc
                except Exception as exc:  # unexpected: log it, but keep the node alive
                    reason = exc
                    log.exception("node %s: Kafka reader failed", ctx.node_id)
                tg.cancel_scope.cancel()

            tg.start_soon(watch, reader.read, lambda: self._session)
            tg.start_soon(watch, reader.probe, self.health_interval, self.operation_timeout)
        if self._closed:
            await anyio.sleep_forever()  # aclose closes the clients; the router cancels us
        if self._session is session:
            self._session = None
            self._connected = anyio.Event()
            assert self._publisher is not None
            self._publisher.detach("the session was lost")
            # Close in the background: a producer flushing to a dead broker takes up to the
            # request timeout, and the reconnect should not wait for that.
            self._closing.add(session)
            ctx.task_group.start_soon(self._close_lost, session)
        raise SessionLost(describe(reason) if reason is not None else "the reader stopped")

    async def _close_lost(self, session: Session) -> None:
        await close_session(session, 2 * self.operation_timeout)
        self._closing.discard(session)  # not on cancellation: aclose finishes the job

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
                    assert self._reader is not None
                    async with self._lock:
                        if self._session is not session:
                            continue
                        wanted = {key: self._partition_of(key) for key in keys}
                        markers = await self._reader.mark(session, partitions=set(wanted.values()))
                        if self._session is not session:
                            raise BrokerUnavailable("Kafka connection lost during subscribe")
                        # Synchronous from here (see the package docstring).
                        self._reader.join(session, wanted, markers)
                        return
        except TimeoutError as exc:
            raise BrokerUnavailable("Kafka subscribe timed out") from exc
        except ERRORS as exc:
            raise BrokerUnavailable(f"Kafka subscribe failed: {describe(exc)}") from exc

    async def unsubscribe(self, rooms: Collection[str]) -> None:
        reader = self._reader
        if reader is None:
            return
        for room in rooms:
            reader.rooms.pop(room.encode(), None)
        session = self._session
        if session is not None:
            try:
                reader.assign(session, {})
            except ERRORS as exc:
                raise BrokerUnavailable(f"Kafka unassign failed: {describe(exc)}") from exc

    async def count_nodes(self) -> int | None:
        """0 if this node's marker is the control partition's first record: every node
        appends one before it says anything, so no node entered the partition before; one
        that enters later appends its marker after ours, so all it says (its Hello first)
        reaches this node. Otherwise unknown: Kafka says nobody who reads a partition
        without a consumer group (docs/architecture.md, "The cluster view", rule 2)."""
        return 0 if self._reader is not None and self._reader.control_marker == 0 else None

    async def _wait_session(self) -> Session:
        while self._session is None:
            if self._closed:
                raise BrokerUnavailable("broker closed")
            await self._connected.wait()
        return self._session

    # -- publishing -----------------------------------------------------------------------------

    async def publish(self, room: str, frame: bytes, *, to: Collection[str] | None = None) -> None:
        await self._submit(Record(False, room.encode(), frame, False))

    async def publish_persistent(
        self, room: str, frame: bytes, *, live: bool, to: Collection[str] | None = None
    ) -> None:
        """One record, like :meth:`publish`, flagged for storage: the data topic is the storage
        queue and the recent-messages cache at once. ``live`` changes nothing -- a node that
        does not host the room drops the record by key, as it drops any foreign room's."""
        await self._submit(Record(False, room.encode(), frame, True))

    async def publish_control(self, frame: bytes, *, to: str | None = None) -> int | None:
        key = BROADCAST if to is None else b"@" + to.encode()
        await self._submit(Record(True, key, frame, False))
        return None

    def _submit(self, record: Record) -> asyncio.Future[Any]:
        """Queue ``record`` (no await: call order is send order); the future settles with the
        producer's answer or the settle rule's error, by the operation timeout at the latest.
        A cancelled caller cancels it: the sender then skips the record, or, once handed
        on, its answer is ignored."""
        publisher = self._publisher
        if publisher is None or self._closed:
            raise BrokerUnavailable("broker closed" if self._closed else "broker not running")
        return publisher.outbox.submit(record)

    # -- persistence ----------------------------------------------------------------------------

    async def recent(
        self, room: str, *, since: str | None = None, limit: int | None = None
    ) -> RecentFrames:
        """The room's last ``recent_size`` stored frames, read back from its partition (see
        ``_storage.scan_recent``). A marker appended first fixes the end: every frame
        whose publish returned before this call sits below it. One scan at a time per node."""
        key = room.encode()
        try:
            with anyio.fail_after(self.operation_timeout):
                session = await self._wait_session()
            assert self._reader is not None
            async with self._history_lock:
                if session.history is None:
                    await self._open_history(session)
                part = partition(key, session.partitions)
                with anyio.fail_after(self.operation_timeout):
                    end = (await self._reader.mark(session, partitions=[part]))[part]
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

    async def _open_history(self, session: Session) -> None:
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
        rooms = self._reader.rooms if self._reader is not None else {}
        return frozenset(key.decode() for key, (p, _) in rooms.items() if p in assigned)

    @property
    def filtered(self) -> int:
        """Records of rooms this node does not host, dropped by key before any decoding."""
        return self._reader.filtered if self._reader is not None else 0

    @filtered.setter
    def filtered(self, value: int) -> None:  # the Broker contract's attribute is writable
        if self._reader is not None:
            self._reader.filtered = value

    @property
    def skipped_before_join(self) -> int:
        """Records of hosted rooms dropped because they were older than the room's join."""
        return self._reader.skipped_before_join if self._reader is not None else 0
