"""RoomRouter: local members, local bypass, and the glue between broker, cluster view and
subscriptions.

Per published message the router does O(local members of the room) work: one envelope is built,
appended to each local member's inbox, and — only if another live node hosts the room — encoded
once and handed to the broker. No task is spawned per message or per member.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from dataclasses import dataclass, field
from functools import partial
from types import TracebackType
from typing import Any

import anyio
import anyio.lowlevel
import msgspec
from anyio.abc import TaskGroup

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
    PayloadTooLarge,
    PublishOutcomeUnknown,
    RoomRouterError,
    RouterNotRunning,
)
from ._host import SupervisedTasks, spawn_detached, stray_cancellation
from ._member import Member, OverflowPolicy, Recovery
from ._presence import PresenceKeeper
from ._recovery import Recoverer
from ._stats import Stats
from ._subscriptions import SubscriptionManager
from .brokers._base import Broker, BrokerContext
from .presence._base import Presence, PresenceEntry, PresenceEvent
from .storage._base import Sink

__all__ = ["RoomRouter"]

log = logging.getLogger("roomrouter")

_NOTHING_RECOVERED = Recovery()

#: Cache reads running at once after a reconnect (one per hosted room, see _recover_gap).
_GAP_READS = 8


def _by_id(envelope: Envelope) -> str:
    return envelope.id


@dataclass(slots=True, eq=False)
class _Join:
    """One member's join of one room: in flight until ``done``; ``joined`` while the member
    is in the room (receiving); ``active`` until a leave or a close ended it. A join with
    ``since``/``history`` has ``recovered``, set once its history was read (or failed:
    ``recovery_error``; or its caller was cancelled: ``abandoned``)."""

    done: anyio.Event = field(default_factory=anyio.Event)
    joined: bool = False
    active: bool = True
    error: RoomRouterError | None = None
    entry: PresenceEntry | None = None  # what the presence store holds for it, if any
    recovered: anyio.Event | None = None
    recovery_error: HistoryUnavailable | None = None
    abandoned: bool = False

    def end_recovery(
        self, error: HistoryUnavailable | None = None, *, abandoned: bool = False
    ) -> None:
        if self.recovered is not None and not self.recovered.is_set():
            self.recovery_error, self.abandoned = error, abandoned
            self.recovered.set()


@dataclass(slots=True, eq=False)
class _Host:
    """What the caller of start/aclose and the host task tell each other."""

    started: anyio.Event = field(default_factory=anyio.Event)
    stop: anyio.Event = field(default_factory=anyio.Event)
    stopped: anyio.Event = field(default_factory=anyio.Event)
    error: Exception | None = None


def _check_headers(headers: Mapping[str, str]) -> None:
    # Headers are stored by sinks as text: refuse what a database would refuse later, at the
    # publish, where the caller can still act on it.
    for key, value in headers.items():
        for text in (key, value):
            if not isinstance(text, str) or "\x00" in text or not _encodable(text):
                raise ConfigurationError(f"header {key!r}: keys and values must be text")


def _encodable(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _check_info(info: Mapping[str, str] | None) -> dict[str, str]:
    if not info:
        return {}
    _check_headers(info)
    size = sum(len(k.encode()) + len(v.encode()) for k, v in info.items())
    if size > 4096:
        raise ConfigurationError(f"member info is {size} bytes; at most 4096")
    return dict(info)


def _rendezvous(node: str, room: str) -> int:
    digest = hashlib.blake2b(f"{node}\x00{room}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def _presence_store(broker: Broker, presence: Presence | str | bool | None) -> Presence | None:
    if presence is None or presence is False:
        return None
    from .presence import presence_from_url
    from .presence.memory import MemoryPresence

    if isinstance(presence, Presence):
        return presence
    if isinstance(presence, str):
        return presence_from_url(presence)
    if presence is True:
        from .brokers.memory import MemoryBroker

        if isinstance(broker, MemoryBroker):
            return MemoryPresence(broker.hub.name)
        raise ConfigurationError(
            f"presence=True needs RoomRouter.from_url (or a memory broker); for the "
            f"{broker.name} backend pass presence='redis://...'"
        )
    raise ConfigurationError(f"presence must be a Presence, a URL or a bool, not {presence!r}")


def _presence_url_of(url: str) -> str:
    """The presence store on the broker's own server: the broker URL without its options."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.scheme.lower() not in ("memory", "redis", "rediss", "unix"):
        raise ConfigurationError(
            f"presence=True: the {parts.scheme} backend keeps no presence; pass "
            "presence='redis://...'"
        )
    from ._urls import _cluster_option

    query = "cluster=1" if _cluster_option(url) else ""  # a Redis Cluster stays one
    return urlunsplit(parts._replace(query=query, fragment=""))


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
    ) -> None:
        if not isinstance(broker, Broker):
            raise ConfigurationError(f"broker must be a roomrouter Broker, not {broker!r}")
        if not namespace or not isinstance(namespace, str) or not namespace.isprintable():
            raise ConfigurationError(f"namespace must be a non-empty printable str: {namespace!r}")
        if overflow not in ("drop_oldest", "disconnect"):
            raise ConfigurationError(
                f"overflow must be 'drop_oldest' or 'disconnect': {overflow!r}"
            )
        if direct_max is None:
            direct_max = broker.default_direct_max
        if not isinstance(direct_max, int) or direct_max < 0:
            raise ConfigurationError(f"direct_max must be an int >= 0: {direct_max!r}")
        if inbox_size < 1 or max_payload < 0 or linger < 0:
            raise ConfigurationError("inbox_size must be >= 1; max_payload and linger >= 0")
        if max_inbox_bytes is None:
            max_inbox_bytes = max(8 << 20, 2 * max_payload)
        elif not isinstance(max_inbox_bytes, int) or max_inbox_bytes < max(max_payload, 1):
            raise ConfigurationError(
                f"max_inbox_bytes must be an int >= max_payload ({max_payload}): "
                f"{max_inbox_bytes!r}"
            )
        if not 0 < heartbeat_interval < node_ttl:
            raise ConfigurationError("need 0 < heartbeat_interval < node_ttl")
        if suspect_interval is not None and not heartbeat_interval < suspect_interval <= node_ttl:
            raise ConfigurationError("need heartbeat_interval < suspect_interval <= node_ttl")
        secret = control_secret.encode() if isinstance(control_secret, str) else control_secret
        if secret is not None and (not isinstance(secret, bytes) or not secret):
            raise ConfigurationError("control_secret must be a non-empty str or bytes")
        if isinstance(sink, str):
            from .storage import sink_from_url

            sink = sink_from_url(sink)
        if sink is not None and not isinstance(sink, Sink):
            raise ConfigurationError(f"sink must be a roomrouter Sink or a URL, not {sink!r}")
        if node_id is not None and (
            not node_id or len(node_id) > 128 or not node_id.isprintable() or " " in node_id
        ):
            raise ConfigurationError(f"node_id must be printable, without spaces: {node_id!r}")
        store = _presence_store(broker, presence)
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
        self._members: dict[str, Member] = {}
        self._local: dict[str, dict[str, Member]] = {}  # room -> member id -> member
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
        self._joins: dict[Member, dict[str, _Join]] = {}
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
        # Delivery gaps (a lost data connection, see _on_reconnect): per hosted room the id of
        # the last persisted envelope delivered from the broker (its place in the room's
        # recent cache) and whether live-only envelopes came (those no cache can give back).
        self._last_persisted: dict[str, str] = {}
        self._live_rooms: set[str] = set()
        # Rooms whose live envelopes are held while the cache is read after a reconnect, and
        # the recovered ids whose live copies may still come (see _gap_filter).
        self._gap_hold: dict[str, list[Envelope]] = {}
        self._gap_overlap: dict[str, set[str]] = {}
        self._gap_pending: set[str] = set()
        self._gap_wake = anyio.Event()
        self._running = False
        self._host: _Host | None = None

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
            options["presence"] = _presence_url_of(url)
        return cls(broker_from_url(url), **options)

    def __repr__(self) -> str:
        return f"<RoomRouter node={self.node_id} broker={self.broker.name} ns={self.namespace!r}>"

    # -- lifecycle ------------------------------------------------------------------------------
    # The router's background work runs in a host task of its own, not in the caller's task:
    # routers then open and close in any order, from any task, inside any framework's lifespan
    # (see _host.py). The caller only waits for the host task to say "started" or "stopped".

    async def start(self) -> None:
        """Connect, join the cluster and start the background tasks; return once the router is
        usable. For frameworks with startup/shutdown hooks; ``async with router:`` does the same.

        Raises what made the start fail (e.g. :class:`~roomrouter.BrokerUnavailable`); nothing
        is left running then. A router starts once; :meth:`aclose` stops it.
        """
        if self._host is not None:
            raise RuntimeError("this router was already started (a router starts once)")
        host = self._host = _Host()
        spawn_detached(partial(self._host_main, host), f"roomrouter host {self.node_id}")
        try:
            await host.started.wait()
        except BaseException:
            # The caller gave up (cancelled): stop what started, then let the cancellation on.
            host.stop.set()
            with anyio.CancelScope(shield=True):
                await host.stopped.wait()
            raise
        if host.error is not None:
            with anyio.CancelScope(shield=True):
                await host.stopped.wait()
            raise host.error

    async def aclose(self) -> None:
        """Close every member, leave the cluster, stop the background tasks and close the
        connections. Idempotent, and callable from any task; returns once all is closed."""
        host = self._host
        if host is None:
            return
        host.stop.set()
        with anyio.CancelScope(shield=True):
            await host.stopped.wait()

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

    async def _host_main(self, host: _Host) -> None:
        """The host task: everything the router runs lives in here, from start to close."""
        try:
            async with AsyncExitStack() as stack:
                if self.sink is not None:
                    await stack.enter_async_context(self.sink)
                # Exit runs in reverse: the task group ends first, then connections close.
                stack.push_async_callback(self._close_broker)
                self._cluster.open()
                stack.callback(self._cluster.close)
                async with anyio.create_task_group() as tg:
                    try:
                        await self._start_in(tg)
                    except Exception as exc:
                        host.error = exc
                    else:
                        self._running = True
                    host.started.set()
                    if host.error is None:
                        await host.stop.wait()
                        await self._stop()
                    tg.cancel_scope.cancel()
        except Exception as exc:
            if not host.started.is_set():
                host.error = exc
            else:
                log.exception("node %s: the router stopped on an error", self.node_id)
        finally:
            self._running = False
            host.started.set()
            host.stopped.set()

    async def _start_in(self, tg: TaskGroup) -> None:
        # The broker's and the presence store's tasks run under the same supervision as the
        # router's own loops: a failure is logged, counted and restarted, never the end of
        # the router (nor, before the host task, of the application's task group).
        supervised = SupervisedTasks(tg, self._spawn)
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
        self._spawn(tg, "control sender", self._cluster.run_sender)
        self._spawn(tg, "heartbeat", self._cluster.run_heartbeat)
        self._spawn(tg, "subscriptions", self._subs.run)
        self._spawn(tg, "gap recovery", self._run_gap_recovery)
        if self._presence is not None:
            await self._presence.start(self.namespace, supervised)
            self._spawn(tg, "presence writer", self._presence.run_writer)
            self._spawn(tg, "presence refresh", self._presence.run_refresh)
        await self._cluster.join_cluster(self._discovery_window)

    async def _stop(self) -> None:
        self._running = False
        self._subs.close()
        for member in list(self._members.values()):
            member._close("router closed")
        if self._presence is not None:
            await self._presence.close()
        await self._cluster.leave_cluster()

    async def _close_broker(self) -> None:
        with anyio.CancelScope(shield=True):
            try:
                await self.broker.aclose()
            except Exception:
                log.exception("node %s: closing the broker failed", self.node_id)

    def _spawn(self, tg: TaskGroup, name: str, loop: Callable[[], Awaitable[None]]) -> None:
        """Run ``loop`` under supervision: an exception is logged, counted, and the loop restarted
        after a capped backoff. Cancellation (router exit) ends it."""

        async def supervised() -> None:
            delay = 0.05
            while True:
                try:
                    await loop()
                    return
                except Exception:
                    self._stats.task_restarts += 1
                    log.exception(
                        "node %s: background task %r failed; restarting", self.node_id, name
                    )
                except anyio.get_cancelled_exc_class():
                    if not stray_cancellation():
                        raise  # the router is closing
                    self._stats.task_restarts += 1
                    log.error(
                        "node %s: background task %r ended with a CancelledError nobody asked "
                        "for (raised by a client library); restarting", self.node_id, name,
                        exc_info=True,
                    )  # fmt: skip
                await anyio.sleep(delay)
                delay = min(delay * 2, 5.0)

        tg.start_soon(supervised, name=f"roomrouter {name} {self.node_id}")

    def _check_running(self) -> None:
        if not self._running:
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
        details = _check_info(info)
        if max_inbox_bytes is None:
            max_inbox_bytes = self.max_inbox_bytes
        elif not isinstance(max_inbox_bytes, int) or max_inbox_bytes < 1:
            raise ConfigurationError(f"max_inbox_bytes must be an int >= 1: {max_inbox_bytes!r}")
        member = Member(
            self, self._stats, member_id, self.inbox_size, self.overflow, details, max_inbox_bytes
        )
        member.listed = listed
        self._members[member_id] = member
        return member

    def get_member(self, member_id: str) -> Member | None:
        return self._members.get(member_id)

    # Join state lives here, one _Join per (member, room), and members ask for it through the
    # narrow interface of _member.Membership. A join is in flight until its room is ready (the
    # subscription manager's one readiness state per room); a second join of the same member
    # waits for the first; a leave ends the join whatever its stage, and the join that is still
    # on the wire gives its reference back itself, so every acquire has exactly one release.

    def _rooms_of(self, member: Member) -> frozenset[str]:
        joins = self._joins.get(member)
        if not joins:
            return frozenset()
        return frozenset(room for room, join in joins.items() if join.joined)

    async def _join(
        self, member: Member, room: str, *, since: str | None = None, history: int = 0
    ) -> Recovery:
        self._check_running()
        validate_room(room, self.max_room_length)
        if since is None and not history:
            await self._join_live(member, room)
            return _NOTHING_RECOVERED
        if history < 0 or history > self.max_recover:
            raise ConfigurationError(
                f"history must be between 0 and max_recover={self.max_recover}"
            )
        self._require_persistence()
        if room in self._joins.get(member, ()) and await self._await_join(member, room):
            return _NOTHING_RECOVERED  # joined or joining (and then joined): a second join
        # Live envelopes of the room are held back from the inbox while the history is read,
        # then merged with it: the join comes first, so nothing published after it is missed,
        # and the merge by id removes what both paths delivered.
        held: list[Envelope] = []
        member._recovering[room] = held
        try:
            join = await self._join_live(member, room, recovering=True)
        except BaseException:
            member._recovering.pop(room, None)
            raise
        assert join is not None  # none was there (checked above, with no await since)
        try:
            if since is not None:
                found, complete = await self._recovery.since(room, since)
            else:
                found, complete = await self.history(room, limit=history), True
        except BaseException as exc:
            # The join did not deliver what it promised: the member is left out of the room
            # (and what the join acquired released), so a retry recovers from the start.
            # Second joins waiting for this one fail with it, or, if its caller was
            # cancelled, make the join themselves.
            member._recovering.pop(room, None)
            self._leave(member, room)
            if not isinstance(exc, Exception):
                join.end_recovery(abandoned=True)
                raise
            error = HistoryUnavailable(f"history of {room!r} could not be read: {exc}")
            error.__cause__ = exc  # for the waiters' errors (see _await_join)
            join.end_recovery(error)
            if isinstance(exc, RoomRouterError):
                raise error from exc
            raise
        join.end_recovery()
        member._recovering.pop(room, None)
        if room not in self._rooms_of(member):  # left (or closed) while the history was read
            return _NOTHING_RECOVERED
        # `found` is in id order without repeats; only held-back live ones need a merge.
        recovered = len(found)
        if held:
            merged = {e.id: e for e in found}
            for envelope in held:
                merged.setdefault(envelope.id, envelope)
            member._deliver_recovered(sorted(merged.values(), key=_by_id))
            arrived = {e.id for e in held}
            found_only = [e for e in found if e.id not in arrived]
        else:
            member._deliver_recovered(found)
            found_only = found
        # Recovered ones published after the join may still arrive live (the history read can
        # outrun the live path): the member drops those copies.
        member._expect_overlap(room, found_only)
        last = found[-1].id if found else None
        return Recovery(count=recovered, complete=complete, last_id=last)

    async def _await_join(self, member: Member, room: str) -> bool:
        """Wait for ``member``'s join of ``room`` that is there already, if any, until the
        member is in the room *for good*: the room ready and, for a join with ``since`` or
        ``history``, its history read. A second join returning earlier said "joined" while
        the first's failed recovery could still take the member out. Returns False if there
        is none (any more: a join cancelled by its caller is its caller's business, not
        ours), True once it ended joined (or left meanwhile: a leave that came later wins);
        raises what made it fail."""
        while True:
            member._check_open()
            current = self._joins.get(member, {}).get(room)
            if current is None:
                return False
            waited = False
            if not current.joined:
                await current.done.wait()
                waited = True
                if current.error is not None:
                    raise current.error
                if not current.joined and current.active:
                    continue  # that join was cancelled: make our own
            if current.recovered is not None and not current.recovered.is_set():
                await current.recovered.wait()
                waited = True
                if current.recovery_error is not None:
                    error = current.recovery_error
                    raise HistoryUnavailable(str(error)) from error.__cause__
                if current.abandoned:
                    continue
            if not waited:
                await anyio.lowlevel.checkpoint()
            return True

    async def _join_live(
        self, member: Member, room: str, *, recovering: bool = False
    ) -> _Join | None:
        """Return once ``member`` is in ``room`` and the room is ready (or the member left it
        again meanwhile: a leave that came later wins). Returns the join it made, None if it
        waited for one that was there (see _await_join). ``recovering``: the caller reads the
        history next and ends the join's recovery (``_Join.end_recovery``)."""
        if await self._await_join(member, room):
            return None
        # No await since _await_join found no join: this one is the only one.
        joins = self._joins.setdefault(member, {})
        join = joins[room] = _Join(recovered=anyio.Event() if recovering else None)
        try:
            await self._subs.acquire(room)
        except BaseException as exc:
            if joins.get(room) is join:
                del joins[room]
            if isinstance(exc, RoomRouterError):
                join.error = exc
            join.end_recovery(abandoned=True)  # nothing to recover into: waiters look again
            join.done.set()
            raise
        if not join.active:  # left, or the member closed, while the join was on the wire
            self._subs.release(room)
            join.end_recovery()  # the leave came later and wins: nothing for waiters to wait
            join.done.set()
            member._check_open()
            return join
        join.joined = True
        self._local.setdefault(room, {})[member.id] = member
        if self._presence is not None and member.listed:
            join.entry = PresenceEntry(member.id, self.node_id, time.time(), member.info)
            self._presence.add(room, join.entry)
        join.done.set()
        return join

    def _leave(self, member: Member, room: str) -> None:
        joins = self._joins.get(member)
        join = joins.pop(room, None) if joins else None
        if join is not None:
            self._end_join(member, room, join)

    def _forget(self, member: Member) -> None:
        for room, join in self._joins.pop(member, {}).items():
            self._end_join(member, room, join)
        if self._members.get(member.id) is member:
            del self._members[member.id]

    def _end_join(self, member: Member, room: str, join: _Join) -> None:
        join.active = False
        member._overlap.pop(room, None)
        if not join.joined:
            return  # still on the wire: that join sees `active` gone and releases its reference
        join.joined = False
        members = self._local.get(room)
        if members is not None:
            members.pop(member.id, None)
            if not members:
                del self._local[room]
                self._forget_gap_state(room)
        if self._presence is not None and join.entry is not None:
            self._presence.remove(room, join.entry)
        self._subs.release(room)

    # -- presence and affinity ------------------------------------------------------------------

    def _presence_entries(self) -> Iterator[tuple[str, PresenceEntry]]:
        for joins in self._joins.values():
            for room, join in joins.items():
                if join.joined and join.entry is not None:
                    yield room, join.entry
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
        entry = PresenceEntry(key, self.node_id, time.time(), _check_info(info))
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
        if not 1 <= limit <= 10_000:
            raise ConfigurationError("limit must be between 1 and 10000")
        self._require_persistence()
        try:
            return await self._recovery.history(room, before=before, after=after, limit=limit)
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from exc

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
        if not isinstance(payload, bytes):
            # Bytes-like only, sized before the copy: bytes(5) would be five NUL bytes,
            # bytes([104, 105]) b"hi", and bytes(10**12) a MemoryError before any size check.
            if isinstance(payload, memoryview):
                size = payload.nbytes
            elif isinstance(payload, bytearray):
                size = len(payload)
            else:
                raise TypeError(
                    f"payload must be bytes, bytearray or memoryview, not {type(payload).__name__}"
                )
            if size > self.max_payload:
                raise PayloadTooLarge(
                    f"payload is {size} bytes; this router's max_payload is {self.max_payload}"
                )
            payload = bytes(payload)
        if len(payload) > self.max_payload:
            raise PayloadTooLarge(
                f"payload is {len(payload)} bytes; this router's max_payload is {self.max_payload}"
            )
        if persist and not self.broker.supports_storage:
            raise ConfigurationError(f"the {self.broker.name} backend has no storage queue")
        if headers:
            _check_headers(headers)
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
            # A copy: a delivery may close a member ("disconnect" policy), which edits the dict.
            delivered = 0
            for member in tuple(members.values()):
                if member.id != skip and member._deliver(envelope):
                    delivered += 1
            stats.local_deliveries += delivered
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
            # `to` only when set: a broker written before direct publishing (supports_direct
            # False, so never given one) need not accept it.
            if persist:
                # Even a room hosted only here goes to the broker: the storage queue is there.
                stats.persisted += 1
                frame = encode_envelope(envelope)
                if to is None:
                    await self.broker.publish_persistent(room, frame, live=live)
                else:
                    await self.broker.publish_persistent(room, frame, live=live, to=to)
            elif to is not None:
                await self.broker.publish(room, encode_envelope(envelope), to=to)
            elif live:
                await self.broker.publish(room, encode_envelope(envelope))
        except PublishOutcomeUnknown as exc:
            # A fresh error per call (a backend may fail a whole batch with one instance),
            # carrying the id the caller needs for a safe retry.
            raise PublishOutcomeUnknown(
                f"{exc} (envelope {envelope.id}: retry with id={envelope.id!r})", envelope.id
            ) from exc
        return envelope

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
        if (self._gap_hold or self._gap_overlap) and self._gap_filter(envelope):
            return
        # Where this node is in the room's stream, for a recovery after a lost connection: a
        # dict store per envelope, per room (not per member).
        if envelope.persist:
            self._last_persisted[room] = envelope.id
        elif room not in self._live_rooms:
            self._live_rooms.add(room)
        delivered = 0  # counted here, added once: a big room runs this loop per member
        for member in tuple(members.values()):
            if member._deliver(envelope):
                delivered += 1
        stats.remote_deliveries += delivered

    def _on_reconnect(self) -> None:
        self._stats.reconnects += 1
        self._cluster.on_reconnect()
        # The data connection was lost: frames published meanwhile were not delivered. Hold
        # each hosted room's live frames from now on (the broker calls this before it hands
        # on any frame of the new connection) until its cache was read, see _recover_gap.
        for room in self._local:
            self._gap_hold.setdefault(room, [])
            self._gap_pending.add(room)
        self._gap_wake.set()

    # -- delivery gaps (docs/architecture.md, "Delivery semantics") --------------------------------

    def _gap_filter(self, envelope: Envelope) -> bool:
        """True if ``envelope`` is not for the members now: held while its room's cache is
        read, or the live copy of one already recovered from the cache (dropped)."""
        room = envelope.room
        held = self._gap_hold.get(room)
        if held is not None:
            held.append(envelope)
            return True
        recovered = self._gap_overlap.get(room)
        if recovered is None or not envelope.persist:
            return False
        if envelope.id in recovered:
            recovered.discard(envelope.id)
            if not recovered:
                del self._gap_overlap[room]
            self._stats.dropped_duplicate += 1
            return True
        # A persisted frame the cache read did not hold was written after it: the live copies
        # of what it held (same server order as the cache) have all come by now.
        del self._gap_overlap[room]
        return False

    async def _run_gap_recovery(self) -> None:
        limiter = anyio.CapacityLimiter(_GAP_READS)
        while True:
            await self._gap_wake.wait()
            self._gap_wake = anyio.Event()
            while self._gap_pending:
                rooms = list(self._gap_pending)
                self._gap_pending.clear()
                async with anyio.create_task_group() as tg:
                    for room in rooms:
                        tg.start_soon(self._recover_gap, room, limiter)

    async def _recover_gap(self, room: str, limiter: anyio.CapacityLimiter) -> None:
        """Give ``room``'s members what was published while the data connection was down.

        Persisted envelopes come back from the room's recent cache: everything after the last
        one this node delivered, in cache order (the broker's order, the order they would
        have arrived in), once. Where that cannot be proved complete the members get a gap
        mark (:class:`~roomrouter.DeliveryGap`) first: live-only envelopes reached this room
        before (none is in any cache), the backend has no cache, the node had delivered no
        persisted envelope of the room yet (no place to start from) and the cache holds some
        from other nodes, its last one is no longer in the cache, or the cache could not be
        read. A room that has carried nothing but persisted envelopes here is taken to be
        persisted-only: a first live-only one published during the outage is not seen.
        """
        last = self._last_persisted.get(room)
        storage = self.broker.supports_storage
        gap = room in self._live_rooms or not storage
        missed: list[Envelope] = []
        if storage and not (gap and last is None):
            try:
                async with limiter:
                    cached = await self._recovery.in_cache_order(room, last)
            except Exception as exc:  # whatever it was, the hold below must be released
                log.warning("node %s: cannot read the cache of %r after a reconnect: %r",
                            self.node_id, room, exc)  # fmt: skip
                gap = True
            else:
                cached = [e for e in cached if e.origin != self.node_id]  # never lost here
                if last is None:
                    # Nothing of the room delivered from the broker yet: no place to start
                    # from. An empty cache proves nothing persisted was missed; else say so.
                    gap = gap or bool(cached)
                else:
                    at = next((i for i, e in enumerate(cached) if e.id == last), None)
                    if at is None:  # evicted or expired: what is left after it, but said
                        gap = True
                        missed = [e for e in cached if e.id > last]
                    else:
                        missed = cached[at + 1 :]
        if room in self._gap_pending:
            return  # reconnected again meanwhile: the next round reads from the same place
        held = self._gap_hold.pop(room, [])
        members = self._local.get(room)
        if not members:
            return
        stats = self._stats
        if gap:
            stats.delivery_gaps += 1
            for member in tuple(members.values()):
                member._deliver_gap(room)
        self._gap_overlap.pop(room, None)  # a previous round's: those copies will not come
        recovered = {e.id for e in missed}
        before = stats.remote_deliveries
        for envelope in missed:
            self._deliver_remote(envelope)
        stats.recovered_after_reconnect += stats.remote_deliveries - before
        arrived = {e.id for e in held}
        for envelope in held:
            if envelope.id in recovered:
                stats.dropped_duplicate += 1
            else:
                self._deliver_remote(envelope)
        if any(e.persist and e.id not in recovered for e in held):
            return  # the live stream passed the cache read: no copy of it is still to come
        still_to_come = recovered - arrived
        if still_to_come:
            self._gap_overlap[room] = still_to_come

    def _forget_gap_state(self, room: str) -> None:
        self._last_persisted.pop(room, None)
        self._live_rooms.discard(room)
        self._gap_overlap.pop(room, None)

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
