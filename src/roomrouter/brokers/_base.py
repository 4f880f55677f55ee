"""The contract between the router and a broker backend.

A broker carries two planes for one node of one namespace:

* the **data plane**: one logical channel per room. The node receives the frames of exactly the
  rooms it is subscribed to (:meth:`Broker.subscribe` / :meth:`Broker.unsubscribe`) and publishes
  frames to any room (:meth:`Broker.publish`), whether or not it is subscribed to it.
* the **control plane**: one broadcast channel every node of the namespace hears, plus one direct
  channel per node (:meth:`Broker.publish_control`). The cluster view (heartbeats, which node
  hosts which room, the join barrier) runs over it.

The broker pushes what it receives: it calls ``context.on_data(room, frame)`` and
``context.on_control(frame)`` from its reader task, synchronously, one frame at a time, in the
order the broker delivered them. Handlers never block and never raise. ``room`` is the room
whose channel (Redis channel, RabbitMQ routing key, Kafka record key) the frame arrived on,
taken from the transport and never from the frame: the router drops an envelope that claims
another room (counted in ``dropped_room_mismatch``), so a publisher that can write to one
room's channel cannot reach the members of another.

Guarantees a backend must give (the contract suite in ``tests/`` checks them):

1. **Confirmed subscription.** When :meth:`~Broker.subscribe` returns, the broker itself has
   registered the subscriptions: every frame published to those rooms afterwards, by any node, is
   delivered to this node (while the connection lives).
2. **Exact filtering.** The node receives no frame of a room it is not subscribed to (a backend
   that cannot filter at the broker must filter before calling ``on_data`` and count the drops
   in :attr:`Broker.filtered`).
3. **Order.** Frames published by one node to one room, and control frames sent by one node, are
   delivered in the order :meth:`~Broker.publish` / :meth:`~Broker.publish_control` were
   *called*. Both methods therefore take their place in the send queue before their first
   ``await``.
4. **Errors.** Every failure is raised as :class:`~roomrouter.BrokerUnavailable` (or another
   :class:`~roomrouter.BrokerError`), never as the client library's own exception, and no call
   waits longer than the backend's operation timeout.
5. **Recovery.** After a lost connection the backend reconnects on its own with capped
   exponential backoff, restores every subscription it held (data rooms and control channels),
   and then calls ``context.on_reconnect()`` so the router can resynchronise its cluster view.
   Frames published while the connection was down may be lost (live delivery is at-most-once).

**Direct publishing** (optional, :attr:`Broker.supports_direct`). A pub/sub broker echoes a
node's publish back to the node itself, so in a room hosted on two nodes half of what each
receives is its own frames. When the router knows the room's few remote hosts it passes them
as ``to=`` to :meth:`~Broker.publish` / :meth:`~Broker.publish_persistent`: a backend that
supports it sends the frame to those nodes' own data channels (one per node, subscribed at
:meth:`~Broker.start`) instead of the room channel, and hands it to the receiver's
``context.on_direct(frame)`` (the room is then the envelope's own: anyone able to write to a
node's channel could write to its control channels too). Guarantee 3 holds across both ways:
frames one node publishes to one room arrive in call order whether each went to the room
channel or to the node channel (Redis: one publisher connection and one subscriber
connection per node, one server). A backend without it ignores ``to`` and publishes to the
room channel, which is always correct: a node that does not host the room drops the frame.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Final, Protocol

import msgspec

__all__ = [
    "RECENT_SKEW_MS",
    "Broker",
    "BrokerContext",
    "RecentFrames",
    "RecentScan",
    "StorageConsumer",
    "StoredFrame",
    "TaskStarter",
    "frame_id",
    "recent_bound",
]


class TaskStarter(Protocol):
    """Where a backend starts its background tasks: the ``start_soon`` of an anyio task group.
    The router's runs every task under supervision (a failure is logged, counted and the task
    restarted with backoff), and cancels them all when it closes."""

    def start_soon(
        self, func: Callable[..., Coroutine[Any, Any, Any]], *args: object, name: object = None
    ) -> object: ...


@dataclass(frozen=True, slots=True)
class BrokerContext:
    """What the router hands a broker when it starts it."""

    node_id: str
    namespace: str
    #: ``on_data(room, frame)``: ``room`` is the channel's room, see the module docstring.
    on_data: Callable[[str, bytes], None]
    on_control: Callable[[bytes], None]
    on_reconnect: Callable[[], None]
    #: Where the broker starts its background tasks, so they are supervised (restarted after a
    #: failure, with backoff) and cancelled with the router. A task that returns is done.
    task_group: TaskStarter
    #: ``on_direct(frame)``: a data frame that arrived on this node's own data channel (direct
    #: publishing, see the module docstring); its room is the envelope's.
    on_direct: Callable[[bytes], None] = lambda frame: None


class Broker(ABC):
    """A broker backend for one node. One instance serves one router."""

    #: Short backend name (``"memory"``, ``"redis"``, ...).
    name: ClassVar[str]
    #: True if :meth:`publish_control` returns the number of nodes that received a broadcast.
    #: The router then knows how many answers to wait for when it joins the cluster.
    counts_receivers: ClassVar[bool] = False

    #: True if :meth:`publish` honours ``to=`` (direct publishing, see the module docstring).
    supports_direct: ClassVar[bool] = False
    #: The router's ``direct_max`` when the application gives none: the most remote hosts a
    #: publish is addressed to (1 on Redis, where one PUBLISH per host costs; RabbitMQ reaches
    #: any number of hosts with one publish).
    default_direct_max: ClassVar[int] = 1

    #: Frames the backend received but dropped itself because this node does not host the room
    #: (backends that cannot filter at the broker). Zero for the others.
    filtered: int = 0

    @abstractmethod
    async def start(self, context: BrokerContext) -> None:
        """Connect and subscribe to the control plane (broadcast and this node's direct channel).

        Returns once control frames sent by other nodes from now on will be delivered. Raises
        :class:`~roomrouter.BrokerUnavailable` if the broker cannot be reached.
        """

    @abstractmethod
    async def aclose(self) -> None:
        """Close connections. Background tasks are cancelled by the router's task group."""

    @abstractmethod
    async def subscribe(self, rooms: Collection[str]) -> None:
        """Subscribe to the data channels of ``rooms`` (one batch), see guarantee 1.

        All or nothing: if it raises, none of ``rooms`` counts as subscribed.
        """

    @abstractmethod
    async def unsubscribe(self, rooms: Collection[str]) -> None:
        """Stop receiving ``rooms``. Best effort when disconnected: the rooms are forgotten either
        way, so they are not restored on reconnect."""

    @abstractmethod
    async def publish(self, room: str, frame: bytes, *, to: Collection[str] | None = None) -> None:
        """Publish one data frame to ``room``; returns once the broker accepted it.

        ``to``: the only nodes (other than this one) that host the room, as the router knows
        them; a backend with :attr:`supports_direct` sends the frame to just those nodes'
        data channels, the others ignore it (see the module docstring). Read before the first
        ``await``.
        """

    @abstractmethod
    async def publish_control(self, frame: bytes, *, to: str | None = None) -> int | None:
        """Send a control frame to every node (``to=None``, including this one) or to one node.

        Returns the number of nodes that received a broadcast if the backend knows it
        (:attr:`counts_receivers`), else ``None``.
        """

    async def count_nodes(self) -> int | None:
        """How many *other* nodes must answer a ``Hello`` broadcast after this returns, for a
        broker whose :meth:`publish_control` cannot count receivers; ``None`` if unknown (the
        router then waits a discovery window, ended early by the answers' live lists).

        Exact means two things (docs/architecture.md, "The cluster view", rule 2): every node
        counted hears a broadcast sent after the count returns (while it lives), and every
        node that may host a room whose ``Host`` this node did not receive is counted. Called
        once per start, after :meth:`start` returned.
        """
        return None

    # -- persistence (optional capability; docs/architecture.md, guarantees 6 and 7) ----------

    #: True if the backend has a durable storage queue and a recent-messages cache.
    supports_storage: ClassVar[bool] = False

    async def publish_persistent(
        self, room: str, frame: bytes, *, live: bool, to: Collection[str] | None = None
    ) -> None:
        """Append ``frame`` to the namespace's durable storage queue and to the room's recent
        cache, and — if ``live`` — publish it on the data plane like :meth:`publish` (with
        ``to`` as there).

        Returns once the broker holds the frame durably; the three writes are atomic where the
        backend allows (Redis: one MULTI/EXEC). Order: like :meth:`publish`, call order.
        """
        raise NotImplementedError(f"the {self.name} backend has no storage queue")

    async def recent(
        self, room: str, *, since: str | None = None, limit: int | None = None
    ) -> RecentFrames:
        """The room's recent-messages cache, oldest first (for recovery after reconnect).

        ``since`` (an envelope id): the read may start at that position instead of the
        cache's start -- it returns at least every cached frame whose id is above ``since``
        and may return some at or below it, which the caller filters (see
        :class:`RecentScan`). ``limit``: at most that many frames, the newest ones; fewer
        than asked is then reported as ``truncated``. Entries that hold no frame (written by
        something else) are skipped and counted in :attr:`RecentFrames.skipped`.
        """
        raise NotImplementedError(f"the {self.name} backend has no recent-messages cache")

    def storage_consumer(self, namespace: str, consumer: str) -> StorageConsumer:
        """A competing consumer of ``namespace``'s storage queue named ``consumer``; usable
        without starting this broker (storage workers are not cluster nodes)."""
        raise NotImplementedError(f"the {self.name} backend has no storage queue")

    async def broker_subscriptions(self) -> frozenset[str]:
        """The rooms this node is subscribed to, *as the broker itself reports them*.

        For tests and ``roomrouter inspect``; backends that cannot ask the broker raise
        ``NotImplementedError``.
        """
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class RecentFrames:
    """What a room's recent cache holds. ``truncated`` is True if older frames were evicted
    (the cache is capped), so the cache alone no longer reaches back to the room's start.

    A backend that knows what the storage workers have committed (Kafka: the group's offsets)
    may say False when every evicted frame was stored *before* this read: the router reads the
    sink after the cache, so cache and sink together are then complete."""

    frames: list[bytes]
    truncated: bool
    #: Cache entries skipped because they hold no frame, or no envelope id (garbage written
    #: by something other than a roomrouter node); the router counts them.
    skipped: int = 0


#: How far behind ``since`` (in milliseconds of the ids' UUIDv7 clock) a backwards scan of a
#: recent cache goes on before it stops. Ids are made by each publisher's clock and a cache
#: holds them in arrival order, so a frame published before the one ``since`` names may
#: carry a higher id if its node's clock runs ahead; such a frame lies further back in the
#: cache, but within the clocks' skew plus the publish latency. A scan that stops only at an
#: id this far below ``since`` returns every cached id above ``since`` as long as the skew
#: plus latency stays below it (docs/architecture.md, "Persistence, history and recovery").
RECENT_SKEW_MS: Final = 2000


class _Head(msgspec.Struct, array_like=True, tag=1, tag_field="v"):
    """The first field of an envelope frame (see roomrouter._envelope): its id. Decoding only
    this skips the payload, so a scan can test where to stop without decoding envelopes."""

    id: str


_head_decoder: Final = msgspec.msgpack.Decoder(_Head)


def frame_id(frame: bytes) -> str | None:
    """The envelope id of ``frame``, or None if the frame is no envelope (garbage)."""
    try:
        return _head_decoder.decode(frame).id
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


class RecentScan:
    """A backwards scan of a recent cache (newest entry first) that stops where ``since`` asks.

    Feed it entries newest first with :meth:`add`; it answers False once the scan may stop:
    an entry ``RECENT_SKEW_MS`` older than ``since`` was seen (every cached frame above
    ``since`` was then seen, see :data:`RECENT_SKEW_MS`), or ``limit`` frames were kept.
    :meth:`result` puts the kept frames back in cache order and says whether they are
    truncated: True when the scan stopped on ``limit``, or when it ran out of entries without
    reaching ``since`` and ``evicted`` says the cache lost older ones.
    """

    __slots__ = ("_bound", "_limit", "frames", "reached", "skipped")

    def __init__(self, since: str | None, limit: int | None) -> None:
        self._bound = recent_bound(since)
        self._limit = limit
        self.frames: list[bytes] = []  # newest first
        self.reached = False  # an entry below the bound was seen
        self.skipped = 0

    @property
    def full(self) -> bool:
        return self._limit is not None and len(self.frames) >= self._limit

    def add(self, frame: bytes | None) -> bool:
        """Take the next older entry's frame (None: the entry holds none); False: stop."""
        if self.reached or self.full:
            return False
        ident = None if frame is None else frame_id(frame)
        if frame is None or ident is None:
            self.skipped += 1
            return True
        if self._bound is not None and ident[:13] < self._bound:
            self.reached = True
            return False
        self.frames.append(frame)
        return not self.full

    def result(self, evicted: bool) -> RecentFrames:
        """``evicted``: the cache lost entries older than the oldest one scanned."""
        frames = self.frames[::-1]
        truncated = (self.full and not self.reached) or (not self.reached and evicted)
        return RecentFrames(frames, truncated, self.skipped)


def recent_bound(since: str | None) -> str | None:
    """The id prefix (``xxxxxxxx-xxxx``: the UUIDv7 milliseconds) a scan for ``since`` stops
    below."""
    if since is None:
        return None
    try:
        ms = int(since[:8] + since[9:13], 16) - RECENT_SKEW_MS
    except ValueError:
        return None  # not an id: scan it all
    if ms <= 0:
        return None
    h = f"{ms:012x}"
    return f"{h[:8]}-{h[8:12]}"


@dataclass(frozen=True, slots=True)
class StoredFrame:
    """One frame taken from the storage queue; ``token`` acknowledges it.

    ``defect`` is set when the backend found an entry that cannot hold a frame at all (a Redis
    stream entry without the frame field): ``frame`` is then what the entry held, and the
    worker sets it aside as a dead letter with that reason.
    """

    frame: bytes
    token: object
    defect: str | None = None


class StorageConsumer(ABC):
    """A competing consumer of a storage queue.

    Guarantees: every frame appended to the queue is eventually handed to some consumer; it is
    handed to another consumer again if the one holding it does not :meth:`ack` it within the
    backend's redelivery time (the holder crashed); frames are removed only by :meth:`ack`.
    Delivery is therefore at-least-once: the sink's idempotent write by id makes it
    exactly-once in the sink.

    Loss of the queue itself (Redis restarted without persistence, the key flushed or expired,
    the RabbitMQ queue deleted) is repaired by the consumer: it recreates the queue (or group)
    and raises :class:`~roomrouter.StorageQueueLost` from that one :meth:`fetch`, so the loss
    is counted and reported rather than retried in silence; the next fetch goes on normally.
    """

    async def __aenter__(self) -> StorageConsumer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    @abstractmethod
    async def start(self) -> None:
        """Connect (and create the queue or group if missing)."""

    @abstractmethod
    async def aclose(self) -> None:
        """Disconnect; frames fetched and not acknowledged will be redelivered."""

    @abstractmethod
    async def fetch(self, max_frames: int, wait: float) -> list[StoredFrame]:
        """Up to ``max_frames`` frames; waits at most ``wait`` seconds for the first one.

        Raises :class:`~roomrouter.BrokerUnavailable` (retry later) or
        :class:`~roomrouter.StorageQueueLost` (repaired; report it, then fetch again)."""

    @abstractmethod
    async def ack(self, frames: Sequence[StoredFrame]) -> None:
        """Acknowledge frames (after the sink committed them): they are not redelivered."""

    async def pending(self) -> int:
        """Frames in the queue not yet acknowledged (for tests and monitoring)."""
        raise NotImplementedError
