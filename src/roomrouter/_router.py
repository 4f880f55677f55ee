"""RoomRouter: local members, local bypass, and the glue between broker, cluster view and
subscriptions.

Per published message the router does O(local members of the room) work: one envelope is built,
appended to each local member's inbox, and — only if another live node hosts the room — encoded
once and handed to the broker. No task is spawned per message or per member.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import anyio
import msgspec
from anyio.abc import TaskGroup

from ._cluster import ClusterView
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
from ._member import Member, OverflowPolicy, Recovery
from ._stats import Stats
from ._subscriptions import SubscriptionManager
from .brokers._base import Broker, BrokerContext
from .storage._base import Sink

__all__ = ["RoomRouter"]

log = logging.getLogger("roomrouter")

_NOTHING_RECOVERED = Recovery()


def _by_id(envelope: Envelope) -> str:
    return envelope.id


@dataclass(frozen=True, slots=True)
class _Cached:
    envelopes: list[Envelope]
    truncated: bool


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


class RoomRouter:
    """Routes room messages between local members and the other nodes of a namespace.

    Use it as an async context manager; it runs background tasks (broker reader, subscription
    reconciler, heartbeats) while inside and stops them on exit::

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
        max_payload: largest payload ``publish`` accepts, in bytes.
        max_room_length: longest room name accepted, in characters.
        heartbeat_interval, node_ttl: a node silent for ``node_ttl`` seconds is considered dead
            by the others, and its rooms with it.
        barrier_timeout: how long a first join waits for a silent node's acknowledgement before
            presuming it dead (defaults to ``node_ttl``).
        discovery_window: on brokers that cannot count receivers, how long a starting node
            listens for the others' state (defaults to ``2 * heartbeat_interval``).
        sink: where history is read from (a :class:`~roomrouter.storage.Sink` or a URL such as
            ``"sqlite:///chat.db"`` or ``"postgresql://user@host/db"``); the router opens and
            closes it. Storage workers write it (``roomrouter worker``).
        max_recover: most envelopes one join with ``since=`` or ``history=`` delivers.
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
        max_room_length: int = MAX_ROOM_LENGTH,
        heartbeat_interval: float = 1.0,
        node_ttl: float = 5.0,
        barrier_timeout: float | None = None,
        discovery_window: float | None = None,
        sink: Sink | str | None = None,
        max_recover: int = 10_000,
    ) -> None:
        if not isinstance(broker, Broker):
            raise ConfigurationError(f"broker must be a roomrouter Broker, not {broker!r}")
        if not namespace or not isinstance(namespace, str) or not namespace.isprintable():
            raise ConfigurationError(f"namespace must be a non-empty printable str: {namespace!r}")
        if overflow not in ("drop_oldest", "disconnect"):
            raise ConfigurationError(
                f"overflow must be 'drop_oldest' or 'disconnect': {overflow!r}"
            )
        if inbox_size < 1 or max_payload < 0 or linger < 0:
            raise ConfigurationError("inbox_size must be >= 1; max_payload and linger >= 0")
        if not 0 < heartbeat_interval < node_ttl:
            raise ConfigurationError("need 0 < heartbeat_interval < node_ttl")
        if isinstance(sink, str):
            from .storage import sink_from_url

            sink = sink_from_url(sink)
        if sink is not None and not isinstance(sink, Sink):
            raise ConfigurationError(f"sink must be a roomrouter Sink or a URL, not {sink!r}")
        if node_id is not None and (
            not node_id or len(node_id) > 128 or not node_id.isprintable() or " " in node_id
        ):
            raise ConfigurationError(f"node_id must be printable, without spaces: {node_id!r}")
        self.broker = broker
        self.sink: Sink | None = sink
        self.max_recover = max_recover
        self.namespace = namespace
        self.node_id = node_id or secrets.token_hex(6)
        self.inbox_size = inbox_size
        self.overflow: OverflowPolicy = overflow
        self.max_payload = max_payload
        self.max_room_length = max_room_length
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
        )
        self._subs = SubscriptionManager(
            broker,
            self._stats,
            linger=linger,
            on_subscribed=self._cluster.announce_host,
            on_unsubscribing=self._cluster.announce_unhost,
        )
        self._running = False
        self._exit_stack: AsyncExitStack | None = None

    @classmethod
    def from_url(cls, url: str, **options: Any) -> RoomRouter:
        """Build a router on the broker named by ``url`` (``memory://``, ``redis://``, ...).

        ``options`` are the router's keyword options; the URL's query string configures the
        broker (e.g. ``redis://host/0?sharded=1``).
        """
        from ._urls import broker_from_url

        return cls(broker_from_url(url), **options)

    def __repr__(self) -> str:
        return f"<RoomRouter node={self.node_id} broker={self.broker.name} ns={self.namespace!r}>"

    # -- lifecycle ------------------------------------------------------------------------------

    async def __aenter__(self) -> RoomRouter:
        if self._exit_stack is not None:
            raise RuntimeError("this router is already running")
        stack = AsyncExitStack()
        await stack.__aenter__()
        try:
            if self.sink is not None:
                await stack.enter_async_context(self.sink)
            # Exit runs in reverse: cancel the tasks, wait for them, then close connections.
            stack.push_async_callback(self._close_broker)
            self._cluster.open()
            stack.callback(self._cluster.close)
            tg = await stack.enter_async_context(anyio.create_task_group())
            stack.callback(tg.cancel_scope.cancel)
            await self.broker.start(
                BrokerContext(
                    node_id=self.node_id,
                    namespace=self.namespace,
                    on_data=self._on_data,
                    on_control=self._cluster.on_control,
                    on_reconnect=self._on_reconnect,
                    task_group=tg,
                )
            )
            self._spawn(tg, "control sender", self._cluster.run_sender)
            self._spawn(tg, "heartbeat", self._cluster.run_heartbeat)
            self._spawn(tg, "subscriptions", self._subs.run)
            await self._cluster.join_cluster(self._discovery_window)
        except BaseException:
            await stack.__aexit__(None, None, None)
            raise
        self._exit_stack = stack
        self._running = True
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        stack, self._exit_stack = self._exit_stack, None
        if stack is None:
            return
        self._running = False
        for member in list(self._members.values()):
            member._close("router closed")
        await self._cluster.leave_cluster()
        await stack.__aexit__(exc_type, exc, tb)

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
                    await anyio.sleep(delay)
                    delay = min(delay * 2, 5.0)

        tg.start_soon(supervised, name=f"roomrouter {name} {self.node_id}")

    def _check_running(self) -> None:
        if not self._running:
            raise RouterNotRunning("use the router inside `async with router:`")

    # -- members --------------------------------------------------------------------------------

    def member(self, member_id: str | None = None) -> Member:
        """Create a local member (one client connection). Ids are unique per router while open;
        a random id is chosen if none is given."""
        self._check_running()
        if member_id is None:
            member_id = secrets.token_hex(8)
        if member_id in self._members:
            raise DuplicateMember(f"member {member_id!r} already exists on node {self.node_id}")
        member = Member(self, member_id, self.inbox_size, self.overflow)
        self._members[member_id] = member
        return member

    def get_member(self, member_id: str) -> Member | None:
        return self._members.get(member_id)

    async def _join(
        self, member: Member, room: str, *, since: str | None = None, history: int = 0
    ) -> Recovery:
        self._check_running()
        validate_room(room, self.max_room_length)
        if since is None and not history:
            await self._join_live(member, room)
            return _NOTHING_RECOVERED
        if room in member._rooms:
            return _NOTHING_RECOVERED
        if history < 0 or history > self.max_recover:
            raise ConfigurationError(
                f"history must be between 0 and max_recover={self.max_recover}"
            )
        self._require_persistence()
        # Live envelopes of the room are held back from the inbox while the history is read,
        # then merged with it: the join comes first, so nothing published after it is missed,
        # and the merge by id removes what both paths delivered.
        held: list[Envelope] = []
        member._recovering[room] = held
        try:
            await self._join_live(member, room)
        except BaseException:
            member._recovering.pop(room, None)
            raise
        try:
            if since is not None:
                found, complete = await self._recover_since(room, since)
            else:
                found, complete = await self.history(room, limit=history), True
        except BaseException as exc:
            member._deliver_recovered(member._recovering.pop(room, held))
            if isinstance(exc, RoomRouterError):
                raise HistoryUnavailable(f"history of {room!r} could not be read: {exc}") from exc
            raise
        member._recovering.pop(room, None)
        if room not in member._rooms:  # left (or closed) while the history was read
            return _NOTHING_RECOVERED
        merged = {e.id: e for e in found}
        recovered = len(merged)
        for envelope in held:
            merged.setdefault(envelope.id, envelope)
        ordered = sorted(merged.values(), key=_by_id)
        member._deliver_recovered(ordered)
        # Recovered ones published after the join may still arrive live (the history read can
        # outrun the live path): the member drops those copies.
        arrived = {e.id for e in held}
        member._expect_overlap(room, [e for e in found if e.id not in arrived])
        last = max(found, key=_by_id).id if found else None
        return Recovery(count=recovered, complete=complete, last_id=last)

    async def _recover_since(self, room: str, since: str) -> tuple[list[Envelope], bool]:
        """Stored messages of ``room`` after ``since`` (sink pages + recent cache), and whether
        that is provably all of them."""
        # The cache is read first: what it no longer holds was stored by the time it was read
        # (when the backend says it is not truncated), so the sink, read afterwards, has it.
        cached = await self._recent(room)
        stored: list[Envelope] = []
        if self.sink is not None:
            cursor = since
            while len(stored) < self.max_recover:
                limit = min(1000, self.max_recover - len(stored))
                page = await self.sink.history(room, after=cursor, limit=limit)
                stored.extend(page)
                if len(page) < limit:
                    break
                cursor = page[-1].id
        complete = len(stored) < self.max_recover
        recent = [e for e in cached.envelopes if e.id > since]
        if cached.truncated and complete:
            # The cache lost its oldest entries. It still proves the window complete if it
            # reaches back to `since`, or if the sink already holds messages from inside it
            # (the storage worker caught up past the cache's start).
            oldest = cached.envelopes[0].id if cached.envelopes else None
            complete = oldest is not None and (
                oldest <= since or bool(stored and stored[-1].id >= oldest)
            )
        found = {e.id: e for e in stored}
        for e in recent:
            found.setdefault(e.id, e)
        ordered = sorted(found.values(), key=_by_id)
        if len(ordered) > self.max_recover:
            ordered, complete = ordered[: self.max_recover], False
        return ordered, complete

    async def _join_live(self, member: Member, room: str) -> None:
        if room in member._rooms:
            return
        member._rooms.add(room)
        member._joining.add(room)
        try:
            await self._subs.acquire(room)
        except BaseException:
            member._rooms.discard(room)
            raise
        finally:
            member._joining.discard(room)
        if room not in member._rooms or member.closed:
            self._subs.release(room)  # left or closed while the join was on the wire
            return
        self._local.setdefault(room, {})[member.id] = member

    def _leave(self, member: Member, room: str) -> None:
        if room not in member._rooms:
            return
        member._rooms.discard(room)
        member._overlap.pop(room, None)
        if room in member._joining:
            return  # the pending join sees this and gives its reference back
        members = self._local.get(room)
        if members is not None:
            members.pop(member.id, None)
            if not members:
                del self._local[room]
        self._subs.release(room)

    def _forget(self, member: Member) -> None:
        for room in list(member._rooms):
            self._leave(member, room)
        if self._members.get(member.id) is member:
            del self._members[member.id]

    # -- history --------------------------------------------------------------------------------

    def _require_persistence(self) -> None:
        if self.sink is None and not self.broker.supports_storage:
            raise ConfigurationError(
                f"history needs a sink (RoomRouter(..., sink='sqlite:///chat.db')) or a backend "
                f"with a recent-messages cache; the {self.broker.name} backend has none"
            )

    async def _recent(self, room: str) -> _Cached:
        if not self.broker.supports_storage:
            return _Cached([], False)
        cache = await self.broker.recent(room)
        envelopes = []
        for frame in cache.frames:
            try:
                envelopes.append(decode_envelope(frame))
            except (msgspec.DecodeError, msgspec.ValidationError):
                self._stats.dropped_decode += 1
        return _Cached(envelopes, cache.truncated)

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
        merged: dict[str, Envelope] = {}
        if self.sink is not None:
            try:
                for e in await self.sink.history(room, before=before, after=after, limit=limit):
                    merged[e.id] = e
            except ValueError as exc:
                raise ConfigurationError(str(exc)) from exc
        for e in (await self._recent(room)).envelopes:
            if (before is None or e.id < before) and (after is None or e.id > after):
                merged.setdefault(e.id, e)
        ordered = sorted(merged.values(), key=_by_id)
        return ordered[:limit] if after is not None else ordered[-limit:]

    # -- publishing -----------------------------------------------------------------------------

    async def publish(
        self,
        room: str,
        payload: bytes,
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
        of an envelope a failed publish returned or reported (see below).

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
            for member in tuple(members.values()):
                if member.id != skip and member._deliver(envelope):
                    stats.local_deliveries += 1
        live = self._cluster.has_remote_host(room)
        if live:
            stats.broker_publishes += 1
        else:
            stats.bypassed_publishes += 1
        try:
            if persist:
                # Even a room hosted only here goes to the broker: the storage queue is there.
                stats.persisted += 1
                await self.broker.publish_persistent(room, encode_envelope(envelope), live=live)
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

    def _on_data(self, room: str, frame: bytes) -> None:
        stats = self._stats
        stats.broker_received += 1
        try:
            envelope = decode_envelope(frame)
        except (msgspec.DecodeError, msgspec.ValidationError):
            stats.dropped_decode += 1
            return
        # The channel is what this node subscribed to and what the broker filtered by; the
        # envelope's own claim is just bytes anyone with publish rights on *some* room could
        # write. Routing by the claim would let them reach any room's members.
        if envelope.room != room:
            stats.dropped_room_mismatch += 1
            return
        if envelope.origin == self.node_id:
            stats.dropped_echo += 1
            return
        members = self._local.get(envelope.room)
        if not members:
            stats.dropped_not_hosted += 1
            return
        for member in tuple(members.values()):
            if member._deliver(envelope):
                stats.remote_deliveries += 1

    def _on_reconnect(self) -> None:
        self._stats.reconnects += 1
        self._cluster.on_reconnect()

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
