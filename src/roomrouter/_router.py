"""RoomRouter: local members, local bypass, and the glue between broker, cluster view and
subscriptions.

Per published message the router does O(local members of the room) work: one envelope is built,
appended to each local member's inbox, and — only if another live node hosts the room — encoded
once and handed to the broker. No task is spawned per message or per member.

The router routes; the rest is in modules of its own, each behind a small in-package interface:
the join table and recovery on join (``_joins.Joins``, the ``Membership`` a member talks to),
history reads (``_recovery.Recoverer``), delivery gaps after a reconnect
(``_gaps.GapRecovery``), a member's inbox as the router sees it (``_inbox.Inbox``), the host
task (``_lifecycle.HostTask``) and the checks of what the application hands in (``_options``).
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from types import TracebackType
from typing import Any

import anyio
import anyio.lowlevel
import msgspec
from anyio.abc import TaskGroup

from ._batching import DEFAULT_BATCH_DELAY, DEFAULT_BATCH_MAX, Fanout
from ._cluster import ClusterView, NodeInfo
from ._envelope import (
    MAX_ROOM_LENGTH,
    Envelope,
    IdGenerator,
    decode_envelope,
    encode_envelope,
    validate_id,
    validate_room,
)
from ._errors import (
    ConfigurationError,
    DuplicateMember,
    HistoryUnavailable,
    PublishOutcomeUnknown,
    RoomRouterError,
    RouterNotRunning,
)
from ._gaps import GapRecovery
from ._host import SupervisedTasks
from ._inbox import Inbox
from ._joins import Joins
from ._lifecycle import HostTask
from ._member import Member, OverflowPolicy
from ._options import (
    check_headers,
    check_info,
    check_options,
    payload_bytes,
    presence_store,
    presence_url_of,
)
from ._presence import PresenceKeeper
from ._recovery import Recoverer
from ._stats import Stats
from ._subscriptions import SubscriptionManager
from .brokers._base import Broker, BrokerContext
from .presence._base import Presence, PresenceEntry, PresenceEvent
from .storage._base import Sink, check_history_limit

__all__ = ["RoomRouter"]

log = logging.getLogger("roomrouter")


def _rendezvous(node: str, room: str) -> int:
    digest = hashlib.blake2b(f"{node}\x00{room}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


class RoomRouter:
    """Routes room messages between local members and the other nodes of a namespace.

    Use it as an async context manager, or call :meth:`start` and :meth:`aclose` (e.g. from a
    framework's startup and shutdown hooks). It runs background tasks (broker reader,
    subscription reconciler, heartbeats) in a task of its own, so routers can be opened and
    closed in any order and from any task::

        async with RoomRouter.from_url("redis://127.0.0.1:6379/0", namespace="chat") as router:
            member = router.member("alice")
            await member.join("lecture-42")
            await router.publish("lecture-42", b"hi")
            envelope = await member.receive()

    Options:
        namespace: nodes see each other only within one namespace (prefix of every broker key).
        node_id: unique id of this node; random by default.
        linger: seconds a room stays subscribed after its last local member left (a rejoin in
            that window costs nothing). 0 unsubscribes at once.
        inbox_size, overflow: bound and policy of every member's inbox (see :class:`Member`).
        max_inbox_bytes: payload bytes one member's inbox holds at most (the overflow policy
            applies when one more would exceed it), so one slow member cannot keep more than
            its share alive; at least ``max_payload``. Default ``max(8 MiB, 2 * max_payload)``.
            :meth:`member` can set its own.
        max_payload: largest payload ``publish`` accepts, in bytes.
        max_room_length: longest room name accepted, in characters.
        heartbeat_interval, node_ttl: a node silent for ``node_ttl`` seconds is considered dead
            by the others, and its rooms with it.
        barrier_timeout: how long a first join waits for a silent node's acknowledgement before
            presuming it dead (defaults to ``node_ttl``).
        discovery_window: on brokers that can count neither receivers nor nodes (Kafka, past
            a namespace's first node), the longest a starting node listens for the others'
            state (defaults to ``2 * heartbeat_interval``).
        sink: where history is read from (a :class:`~roomrouter.storage.Sink` or a URL such as
            ``"sqlite:///chat.db"`` or ``"postgresql://user@host/db"``); the router opens and
            closes it. Storage workers write it (``roomrouter worker``).
        max_recover: most envelopes one join with ``since=`` or ``history=`` delivers.
        presence: where presence (:meth:`presence`, :meth:`watch_presence`) is kept: a
            :class:`~roomrouter.presence.Presence`, a URL (``"redis://host/0"``,
            ``"memory://"``) — it may differ from the broker — or ``True`` for the broker's own
            server (memory; Redis with :meth:`from_url`). Off by default.
        direct_max: a room hosted on at most this many other nodes is published to those
            nodes' own channels rather than the room channel, on brokers that support it
            (memory, Redis): a pub/sub broker echoes a room-channel publish back to its
            sender, which is then half of what a node of a two-node room receives. 0 always
            uses the room channel. The default is the backend's (``Broker.default_direct_max``):
            1 on Redis, where Redis's and the nodes' CPU per message measured lowest
            (``benchmarks/echo_routing.py``); 64 on RabbitMQ, where one publish reaches any
            number of hosts (docs/scaling.md).
        suspect_interval: a node silent this long is not waited for by joins any more (it
            keeps its rooms until ``node_ttl``); more than ``heartbeat_interval``, at most
            ``node_ttl``. Defaults to ``3 * heartbeat_interval`` (capped at ``node_ttl``).
        control_secret: a shared secret (str or bytes) that signs every control frame with
            an HMAC; frames without a valid tag are dropped. Every node of the namespace needs
            the same one. Also a URL option (``?control_secret=...``) of :meth:`from_url`.
        delivery_batch_delay: seconds a room's envelopes may gather before the members waiting
            for them are woken, once per batch (:meth:`set_batch_delay` per room; 0: at once);
            ``delivery_batch_max`` envelopes wake them sooner. Order, exactness and overflow
            are unchanged; docs/batching.md has the figures behind the default.
    """

    def __init__(
        self,
        broker: Broker,
        *,
        namespace: str = "default",
        node_id: str | None = None,
        linger: float = 1.0,
        inbox_size: int = 1024,
        overflow: OverflowPolicy = "drop_oldest",
        max_payload: int = 1 << 20,
        max_inbox_bytes: int | None = None,
        max_room_length: int = MAX_ROOM_LENGTH,
        heartbeat_interval: float = 1.0,
        node_ttl: float = 5.0,
        barrier_timeout: float | None = None,
        discovery_window: float | None = None,
        sink: Sink | str | None = None,
        max_recover: int = 10_000,
        presence: Presence | str | bool | None = None,
        direct_max: int | None = None,
        suspect_interval: float | None = None,
        control_secret: str | bytes | None = None,
        delivery_batch_delay: float = DEFAULT_BATCH_DELAY,
        delivery_batch_max: int = DEFAULT_BATCH_MAX,
    ) -> None:
        if direct_max is None:  # the backend's (check_options refuses a broker that is none)
            direct_max = getattr(broker, "default_direct_max", 1)
        max_inbox_bytes, secret, sink = check_options(
            broker,
            namespace=namespace,
            node_id=node_id,
            linger=linger,
            inbox_size=inbox_size,
            overflow=overflow,
            max_payload=max_payload,
            max_inbox_bytes=max_inbox_bytes,
            heartbeat_interval=heartbeat_interval,
            node_ttl=node_ttl,
            sink=sink,
            direct_max=direct_max,
            suspect_interval=suspect_interval,
            control_secret=control_secret,
        )
        store = presence_store(broker, presence)
        self.broker = broker
        self.sink: Sink | None = sink
        self.max_recover = max_recover
        self.namespace = namespace
        self.node_id = node_id or secrets.token_hex(6)
        self.inbox_size = inbox_size
        self.overflow: OverflowPolicy = overflow
        self.max_payload = max_payload
        self.max_inbox_bytes = max_inbox_bytes
        self.max_room_length = max_room_length
        self.direct_max = direct_max if broker.supports_direct else 0
        self._discovery_window = (
            discovery_window if discovery_window is not None else 2 * heartbeat_interval
        )
        self._stats = Stats()
        self._ids = IdGenerator()
        self._cluster = ClusterView(
            self.node_id,
            broker,
            self._stats,
            local_rooms=lambda: self._subs.hosted(),
            heartbeat_interval=heartbeat_interval,
            node_ttl=node_ttl,
            barrier_timeout=barrier_timeout if barrier_timeout is not None else node_ttl,
            on_node_dropped=self._on_node_dropped,
            local_members=lambda: len(self._members),
            suspect_interval=suspect_interval,
            control_secret=secret,
        )
        self._subs = SubscriptionManager(
            broker,
            self._stats,
            linger=linger,
            on_subscribed=self._cluster.announce_host,
            on_unsubscribing=self._cluster.announce_unhost,
        )
        self._tracked: dict[tuple[str, str], PresenceEntry] = {}  # (room, key) -> entry
        self._presence = (
            None
            if store is None
            else PresenceKeeper(
                store,
                self.node_id,
                self._stats,
                local_entries=self._presence_entries,
                heartbeat_interval=heartbeat_interval,
                ttl=node_ttl,
            )
        )
        self._recovery = Recoverer(broker, sink, self._stats, max_recover)
        self._joins = Joins(
            self.node_id,
            self._subs,
            self._recovery,
            self._presence,
            max_room_length=max_room_length,
            max_recover=max_recover,
            check_running=self._check_running,
            require_persistence=self._require_persistence,
            read_history=lambda room, n: self.history(room, limit=n),
            on_room_empty=lambda room: self._gaps.forget(room),
            settle=lambda room: self._fanout.settle(room),
        )
        # The join table's maps, the same objects for the router's life: routing reads them.
        self._members = self._joins.members  # member id -> inbox
        self._local = self._joins.local  # room -> member id -> inbox
        self._fanout = Fanout(
            self._local,
            delivery_batch_delay,
            delivery_batch_max,
            stats=self._stats,
            node_id=self.node_id,
            inbox_size=inbox_size,
            inbox_bytes=max_inbox_bytes,
        )
        self._gaps = GapRecovery(
            self.node_id,
            broker,
            self._recovery,
            self._stats,
            self._local,
            self._deliver_remote,
            settle=self._fanout.settle,
        )
        # The same objects as the gap state's (see GapRecovery): read per delivered envelope.
        self._gap_hold = self._gaps.hold
        self._gap_overlap = self._gaps.overlap
        self._last_persisted = self._gaps.last_persisted
        self._live_rooms = self._gaps.live_rooms
        self._host = HostTask(self.node_id, self._stats)

    @classmethod
    def from_url(cls, url: str, **options: Any) -> RoomRouter:
        """Build a router on the broker named by ``url`` (``memory://``, ``redis://``, ...).

        ``options`` are the router's keyword options; the URL's query string configures the
        broker (e.g. ``redis://host/0?sharded=1``), except ``control_secret``, the router's.
        ``presence=True`` keeps presence on the broker's server (memory, Redis).
        """
        from ._urls import broker_from_url, pop_router_options

        url, found = pop_router_options(url)
        for key in found.keys() & options.keys():
            raise ConfigurationError(f"{key} given both in the URL and as an option")
        options.update(found)
        if options.get("presence") is True:
            options["presence"] = presence_url_of(url)
        return cls(broker_from_url(url), **options)

    def __repr__(self) -> str:
        return f"<RoomRouter node={self.node_id} broker={self.broker.name} ns={self.namespace!r}>"

    # -- lifecycle (the host task: _lifecycle.py) -----------------------------------------------

    async def start(self) -> None:
        """Connect, join the cluster and start the background tasks; return once the router is
        usable. For frameworks with startup/shutdown hooks; ``async with router:`` does the same.

        Raises what made the start fail (e.g. :class:`~roomrouter.BrokerUnavailable`); nothing
        is left running then. A router starts once; :meth:`aclose` stops it.
        """
        await self._host.start(self._enter, self._start_in, self._stop)

    async def aclose(self) -> None:
        """Close every member, leave the cluster, stop the background tasks and close the
        connections. Idempotent, and callable from any task; returns once all is closed."""
        await self._host.close()

    async def __aenter__(self) -> RoomRouter:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def _enter(self, stack: AsyncExitStack) -> None:
        # What lives as long as the host task. Exit runs in reverse: the task group ends
        # first, then connections close.
        if self.sink is not None:
            await stack.enter_async_context(self.sink)
        stack.push_async_callback(self._close_broker)
        self._cluster.open()
        stack.callback(self._cluster.close)

    async def _start_in(self, tg: TaskGroup) -> None:
        # The broker's and the presence store's tasks run under the same supervision as the
        # router's own loops: a failure is logged, counted and restarted, never the end of
        # the router (nor, before the host task, of the application's task group).
        supervised = SupervisedTasks(tg, self._host.spawn)
        await self.broker.start(
            BrokerContext(
                node_id=self.node_id,
                namespace=self.namespace,
                on_data=self._on_data,
                on_control=self._cluster.on_control,
                on_reconnect=self._on_reconnect,
                task_group=supervised,
                on_direct=self._on_direct,
            )
        )
        self._host.spawn(tg, "control sender", self._cluster.run_sender)
        self._host.spawn(tg, "heartbeat", self._cluster.run_heartbeat)
        self._host.spawn(tg, "subscriptions", self._subs.run)
        self._host.spawn(tg, "gap recovery", self._gaps.run)
        if self._presence is not None:
            await self._presence.start(self.namespace, supervised)
            self._host.spawn(tg, "presence writer", self._presence.run_writer)
            self._host.spawn(tg, "presence refresh", self._presence.run_refresh)
        await self._cluster.join_cluster(self._discovery_window)

    async def _stop(self) -> None:
        self._subs.close()
        self._fanout.close()
        for inbox in list(self._members.values()):
            inbox.close("router closed")
        if self._presence is not None:
            await self._presence.close()
        await self._cluster.leave_cluster()

    async def _close_broker(self) -> None:
        with anyio.CancelScope(shield=True):
            try:
                await self.broker.aclose()
            except Exception:
                log.exception("node %s: closing the broker failed", self.node_id)

    def _check_running(self) -> None:
        if not self._host.running:
            raise RouterNotRunning("use the router inside `async with router:`")

    # -- members --------------------------------------------------------------------------------

    def member(
        self,
        member_id: str | None = None,
        *,
        info: Mapping[str, str] | None = None,
        listed: bool = True,
        max_inbox_bytes: int | None = None,
    ) -> Member:
        """Create a local member (one client connection). Ids are unique per router while open;
        a random id is chosen if none is given. ``info`` is the app's data about it that
        presence shows (e.g. ``{"name": "Alice"}``; text, at most 4 KiB in all).
        ``listed=False`` keeps it out of presence (an integration whose member stands for many
        clients lists those itself, with :meth:`track_presence`). ``max_inbox_bytes``
        overrides the router's for this member (an envelope bigger than it is still queued,
        alone)."""
        self._check_running()
        if member_id is None:
            member_id = secrets.token_hex(8)
        if not isinstance(member_id, str) or not member_id or not member_id.isprintable():
            raise ConfigurationError(f"member id must be a non-empty printable str: {member_id!r}")
        if member_id in self._members:
            raise DuplicateMember(f"member {member_id!r} already exists on node {self.node_id}")
        details = check_info(info)
        if max_inbox_bytes is None:
            max_inbox_bytes = self.max_inbox_bytes
        elif not isinstance(max_inbox_bytes, int) or max_inbox_bytes < 1:
            raise ConfigurationError(f"max_inbox_bytes must be an int >= 1: {max_inbox_bytes!r}")
        inbox = Inbox(
            self._joins, self._stats, member_id, self.inbox_size, self.overflow, max_inbox_bytes
        )
        member = Member(inbox, self._joins, details)
        member.listed = listed
        self._members[member_id] = inbox
        return member

    def get_member(self, member_id: str) -> Member | None:
        inbox = self._members.get(member_id)
        return None if inbox is None else inbox.member

    # -- presence and affinity ------------------------------------------------------------------

    def _presence_entries(self) -> Iterator[tuple[str, PresenceEntry]]:
        yield from self._joins.presence_entries()
        for (room, _), entry in self._tracked.items():
            yield room, entry

    def track_presence(self, room: str, key: str, info: Mapping[str, str] | None = None) -> None:
        """Show ``key`` in ``room``'s presence as a client of this node, for integrations
        whose clients are not members (the Socket.IO manager serves many sockets with one
        member per room). Like a member's entry it dies with this node; :meth:`untrack_presence`
        removes it. No-op when presence is off."""
        self._check_running()
        validate_room(room, self.max_room_length)
        if self._presence is None or (room, key) in self._tracked:
            return
        entry = PresenceEntry(key, self.node_id, time.time(), check_info(info))
        self._tracked[room, key] = entry
        self._presence.add(room, entry)

    def untrack_presence(self, room: str, key: str) -> None:
        """Remove what :meth:`track_presence` showed; no-op if nothing was."""
        entry = self._tracked.pop((room, key), None)
        if entry is not None and self._presence is not None:
            self._presence.remove(room, entry)

    def _on_node_dropped(self, node_id: str) -> None:
        if self._presence is not None:
            self._presence.forget_node(node_id)

    def _require_presence(self) -> PresenceKeeper:
        self._check_running()
        if self._presence is None:
            raise ConfigurationError(
                "presence is off: RoomRouter(..., presence='redis://...' or 'memory://'), or "
                "presence=True for the broker's own server"
            )
        return self._presence

    async def presence(self, room: str) -> list[PresenceEntry]:
        """Who is in ``room`` on every live node, oldest join first: member id, node, join
        time and the member's ``info``. This node's own joins and leaves are included as soon
        as they returned; other nodes' a store round trip later. Members of a node that died
        vanish within its TTL."""
        keeper = self._require_presence()
        validate_room(room, self.max_room_length)
        await keeper.flush()
        return await keeper.store.members(room)

    def watch_presence(
        self, room: str
    ) -> AbstractAsyncContextManager[AsyncIterator[PresenceEvent]]:
        """Join and leave events of ``room`` on every node::

            async with router.watch_presence("lecture-42") as events:
                async for event in events:      # PresenceEvent(kind, room, entry)
                    ...

        Live and at-most-once like messages: read :meth:`presence` after subscribing for the
        state, then follow the events."""
        keeper = self._require_presence()
        validate_room(room, self.max_room_length)
        return keeper.store.watch(room)

    def preferred_node(self, room: str) -> str:
        """The live node (this one included) that ``room``'s clients should connect to, by
        rendezvous hashing: every node with the same view of live nodes names the same one,
        and a node joining or leaving moves only the rooms that node wins or held. A load
        balancer (or a redirect) that sends a room's clients there lets the local bypass serve
        the whole room without the broker (docs/affinity.md)."""
        validate_room(room, self.max_room_length)
        nodes = self._cluster.live_nodes() | {self.node_id}
        return max(nodes, key=lambda node: (_rendezvous(node, room), node))

    # -- history --------------------------------------------------------------------------------

    def _require_persistence(self) -> None:
        if self.sink is None and not self.broker.supports_storage:
            raise ConfigurationError(
                f"history needs a sink (RoomRouter(..., sink='sqlite:///chat.db')) or a backend "
                f"with a recent-messages cache; the {self.broker.name} backend has none"
            )

    async def history(
        self,
        room: str,
        *,
        before: str | None = None,
        after: str | None = None,
        limit: int = 50,
    ) -> list[Envelope]:
        """Stored messages of ``room`` in id order: the last ``limit`` before ``before`` (or the
        newest), or the first ``limit`` after ``after``.

        Reads the sink and the backend's recent-messages cache and merges them, so messages
        published a moment ago and not yet written by a storage worker are included.
        """
        self._check_running()
        validate_room(room, self.max_room_length)
        # The sinks' rule (an int in 1..MAX_HISTORY_LIMIT, not a bool), also where only the
        # broker's recent cache answers.
        try:
            check_history_limit(limit)
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from None
        self._require_persistence()
        try:
            return await self._recovery.history(room, before=before, after=after, limit=limit)
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from exc

    async def recover(self, room: str, since: str) -> tuple[list[Envelope], bool]:
        """What a join of ``room`` with ``since`` would deliver, read without joining: the stored
        messages after the id ``since`` in id order (at most ``max_recover``), and whether
        that is provably all of them (docs/architecture.md, guarantee 7). For a transport of
        the app's own that replays a client's missed messages itself (the python-socketio
        integration does); a member that goes on live joins with ``since`` instead, which
        leaves no gap between what was read and what arrives.

        Raises :class:`~roomrouter.ConfigurationError` if ``since`` is not a message id (an
        ``Envelope.id``) or the router has no persistence, and
        :class:`~roomrouter.HistoryUnavailable` if the history cannot be read.
        """
        self._check_running()
        validate_room(room, self.max_room_length)
        validate_id(since)
        self._require_persistence()
        try:
            return await self._recovery.since(room, since)
        except HistoryUnavailable:
            raise
        except RoomRouterError as exc:  # the sink or the broker's cache: as a join says it
            raise HistoryUnavailable(f"history of {room!r} could not be read: {exc}") from exc

    # -- publishing -----------------------------------------------------------------------------

    async def publish(
        self,
        room: str,
        payload: bytes | bytearray | memoryview,
        *,
        exclude: Member | str | None = None,
        headers: Mapping[str, str] | None = None,
        persist: bool = False,
        id: str | None = None,  # shadows the builtin: it is the envelope's field name
    ) -> Envelope:
        """Publish ``payload`` to every member of ``room`` on every node; return the envelope.

        Local members get it in process at once. The broker is used only if another live node
        hosts the room (or ``persist`` is set); this call then returns when the broker accepted
        the frame. ``exclude`` skips one member (the sender's connection). ``id`` gives the
        envelope this id instead of a new one: a lowercase UUIDv7 string, normally the ``id``
        of an envelope a failed publish returned or reported (see below). ``payload`` is
        bytes-like (``bytes``, ``bytearray``, ``memoryview``; copied once into the envelope's
        ``bytes``); anything else raises :class:`TypeError`.

        Errors, and whether to retry (local members were served either way):

        * :class:`~roomrouter.PublishOutcomeUnknown` -- the frame was sent and its
          acknowledgement was lost; it may have been delivered and stored. Retry with
          ``id=exc.envelope_id``: the sinks write by id, so it is stored once (remote members
          may receive it twice and can drop the repeat by id; local ones get it again).
        * :class:`~roomrouter.BrokerUnavailable` (any other) -- the frame was not sent: retrying
          is safe, with or without the id.
        * :class:`~roomrouter.InvalidRoomName`, :class:`~roomrouter.PayloadTooLarge`,
          :class:`~roomrouter.ConfigurationError` -- the call is wrong; a retry fails the same.
        """
        self._check_running()
        validate_room(room, self.max_room_length)
        if not isinstance(payload, bytes) or len(payload) > self.max_payload:
            payload = payload_bytes(payload, self.max_payload)  # or a clear error
        if persist and not self.broker.supports_storage:
            raise ConfigurationError(f"the {self.broker.name} backend has no storage queue")
        if headers:
            check_headers(headers)
        envelope = Envelope(
            id=self._ids.next() if id is None else validate_id(id),
            room=room,
            origin=self.node_id,
            ts=time.time(),
            payload=payload,
            headers=dict(headers) if headers else {},
            persist=persist,
        )
        stats = self._stats
        stats.published += 1
        members = self._local.get(room)
        if members:
            skip = exclude.id if isinstance(exclude, Member) else exclude
            stats.local_deliveries += self._fanout.deliver(members, envelope, skip)
        hosts = self._cluster.hosts_of(room)
        live = bool(hosts)
        # The broker reads `to` before its first await, so the live set needs no copy.
        to = hosts if live and len(hosts) <= self.direct_max else None
        if live:
            stats.broker_publishes += 1
            if to is not None:
                stats.direct_publishes += 1
        else:
            stats.bypassed_publishes += 1
        try:
            if persist:
                # Even a room hosted only here goes to the broker: the storage queue is there.
                stats.persisted += 1
                frame = encode_envelope(envelope)
                await self.broker.publish_persistent(room, frame, live=live, to=to)
            elif live:
                await self.broker.publish(room, encode_envelope(envelope), to=to)
        except PublishOutcomeUnknown as exc:
            # A fresh error per call (a backend may fail a whole batch with one instance),
            # carrying the id the caller needs for a safe retry.
            raise PublishOutcomeUnknown(
                f"{exc} (envelope {envelope.id}: retry with id={envelope.id!r})", envelope.id
            ) from exc
        return envelope

    def set_batch_delay(self, room: str, delay: float | None) -> None:
        """Give ``room`` its own ``delivery_batch_delay`` (None: the router's again); a batch
        the room has waiting is delivered now."""
        self._fanout.set_delay(room, delay)

    def flush_batches(self, room: str | None = None) -> None:
        """Deliver the envelopes waiting in ``room``'s delivery batch (every room's if None)
        to the local members now, instead of when the batch's delay ends (see
        ``delivery_batch_delay``): e.g. before reading :meth:`Member.pending`."""
        if room is None:
            self._fanout.close()
        else:
            self._fanout.settle(room)

    # -- broker callbacks -----------------------------------------------------------------------

    def _decode(self, frame: bytes) -> Envelope | None:
        """A data frame from the broker, counted; None (and counted) if it is no envelope."""
        stats = self._stats
        stats.broker_received += 1
        try:
            return decode_envelope(frame)
        except (msgspec.DecodeError, msgspec.ValidationError):
            stats.dropped_decode += 1
            return None

    def _on_data(self, room: str, frame: bytes) -> None:
        envelope = self._decode(frame)
        if envelope is None:
            return
        # The channel is what this node subscribed to and what the broker filtered by; the
        # envelope's own claim is just bytes anyone with publish rights on *some* room could
        # write. Routing by the claim would let them reach any room's members.
        if envelope.room != room:
            self._stats.dropped_room_mismatch += 1
            return
        self._deliver_remote(envelope)

    def _on_direct(self, frame: bytes) -> None:
        # A frame sent to this node's own channel (direct publishing): the room is the
        # envelope's, as trustworthy as the channel (see roomrouter.brokers._base).
        self._stats.direct_received += 1
        envelope = self._decode(frame)
        if envelope is not None:
            self._deliver_remote(envelope)

    def _deliver_remote(self, envelope: Envelope) -> None:
        stats = self._stats
        if envelope.origin == self.node_id:
            stats.dropped_echo += 1
            return
        room = envelope.room
        members = self._local.get(room)
        if not members:
            stats.dropped_not_hosted += 1
            return
        if (self._gap_hold or self._gap_overlap) and self._gaps.filter(envelope):
            return
        # Where this node is in the room's stream, for a recovery after a lost connection: a
        # dict store per envelope, per room (not per member).
        if envelope.persist:
            self._last_persisted[room] = envelope.id
        elif room not in self._live_rooms:
            self._live_rooms.add(room)
        stats.remote_deliveries += self._fanout.deliver(members, envelope, None)

    def _on_reconnect(self) -> None:
        self._stats.reconnects += 1
        self._cluster.on_reconnect()
        # The broker calls this before it hands on any frame of the new connection: the
        # hosted rooms' live frames are held from here until their caches were read.
        self._gaps.on_reconnect()

    # -- introspection --------------------------------------------------------------------------

    @property
    def subscribed_rooms(self) -> frozenset[str]:
        """Rooms subscribed at the broker right now (confirmed; lingering rooms included)."""
        return self._subs.subscribed

    @property
    def local_rooms(self) -> frozenset[str]:
        """Rooms with at least one local member."""
        return frozenset(self._local)

    def live_nodes(self) -> frozenset[str]:
        """Other nodes of the namespace this node believes alive."""
        return self._cluster.live_nodes()

    def nodes(self) -> list[NodeInfo]:
        """Every live node of the namespace as this node's view knows it, this one first: id,
        start time, seconds since last heard, hosted rooms, local members (for inspection)."""
        return self._cluster.nodes()

    def remote_hosts(self, room: str) -> frozenset[str]:
        """Other live nodes hosting ``room`` (as this node's cluster view knows it)."""
        return self._cluster.remote_hosts(room)

    async def rooms(self) -> frozenset[str]:
        """Rooms with members anywhere in the cluster (live nodes only).

        A room disappears once its last member anywhere left and its host's linger expired.
        """
        return frozenset(self._local) | self._cluster.remote_rooms()

    def stats(self) -> dict[str, int]:
        """A snapshot of this router's counters (see :class:`~roomrouter._stats.Stats`)."""
        snapshot = self._stats.snapshot()
        snapshot["broker_filtered"] = self.broker.filtered
        snapshot["members"] = len(self._members)
        snapshot["local_rooms"] = len(self._local)
        snapshot["subscribed_rooms"] = len(self._subs.subscribed)
        snapshot["live_nodes"] = len(self._cluster.live_nodes())
        return snapshot
