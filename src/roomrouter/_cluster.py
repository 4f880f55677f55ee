"""Cluster view: which nodes are alive and which rooms each one hosts.

Every node keeps its own copy, fed by control frames over the broker's control plane. The
router asks it one question on the hot path, :meth:`ClusterView.has_remote_host` — a dict
lookup, no I/O — to decide whether a publish must go to the broker at all.

Why the answer is never stale in a way that loses a message (docs/architecture.md, guarantee 2, the
argument is written out in docs/architecture.md):

* A node announces a room (``Host``) only *after* the broker confirmed its subscription, and
  its first join of the room returns only after every node it knows to be alive acknowledged
  the announcement (``Ack``). A node applies ``Host`` to its view *before* it sends ``Ack``.
  So any publish that starts after the join returned, on a node that acknowledged, sees the host.
* A node that is starting says ``Hello``. Every node that hears it adds it to its live set at
  once — so every later barrier waits for it — and answers ``State`` with its hosted rooms as
  of that moment. Rooms announced before that moment are in the ``State``; the starting node's
  router becomes usable only after it collected the ``State`` of every node the broker says
  heard the ``Hello``, or every node the broker counted before it (RabbitMQ: the consumers
  of a shared queue); when nobody can count, after a discovery window, which ends early once
  every node named in the answers' live lists answered.
* Control frames of one node arrive in the order it sent them (broker guarantee 3) and carry a
  generation number, so a receiver detects a gap (after a reconnect) and asks for a full
  ``State`` (``Sync``). A node first heard through anything but ``Hello`` or ``State`` — one
  that was presumed dead and speaks again after a stall, say — is asked for its ``State`` too:
  a delta alone says nothing of its other rooms.
* A peer that says ``Hello`` while a barrier waits for its ``Ack`` may have missed the
  ``Host`` (it reconnected): the ``Host`` is sent again, to it alone, after the ``State``.
* A starting node knows it has heard everyone once every node the broker counted answered, or
  once every node named in the answers' live lists answered: the broker counts connections,
  and a subscriber that is no node (a monitor) never answers.

Nodes heartbeat every ``heartbeat_interval``; a node not heard from within ``node_ttl`` is
dropped with its rooms, and pending barriers stop waiting for it.

A node silent for the ``suspect_interval`` (a few heartbeats) is *suspect*: barriers stop
waiting for it (a crashed peer must not block every join until its TTL), it keeps its rooms,
and it is sent this node's ``State`` once it is heard again. The node that was silent knows it
was (its own heartbeat ran late, or its connection was lost): until a ``State`` answering its
``Sync`` came from every live node, its view answers "hosted elsewhere" for every room, so
nothing it publishes bypasses the broker. Silence is measured in *loop time*, which does not
advance while this node's own loop runs late: a busy observer never counts its own lateness
against its peers. With a ``control_secret``, every frame carries an HMAC tag and frames
without a valid one are dropped (docs/architecture.md, "The cluster view").
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field

import anyio

from ._control import Ack, Bye, ControlCodec, Frame, Heartbeat, Hello, Host, State, Sync, Unhost
from ._control import decoder as _decoder  # noqa: F401 (tests read frames with it)
from ._control import encoder as _encoder  # noqa: F401 (tests write frames with it)
from ._errors import BrokerError, RoomRouterError, describe
from ._stats import Stats
from .brokers._base import Broker

__all__ = ["ClusterView", "NodeInfo"]

log = logging.getLogger("roomrouter.cluster")


_monotonic = time.monotonic


class _EveryNode(Collection[str]):
    """What the view answers for any room while it may be stale: "hosted elsewhere", by more
    nodes than direct publishing takes, so the publish goes to the room's broker channel."""

    __slots__ = ()

    def __len__(self) -> int:
        return sys.maxsize

    def __contains__(self, node: object) -> bool:
        return True

    def __iter__(self) -> Iterator[str]:
        return iter(())


_EVERY_NODE = _EveryNode()


@dataclass(slots=True)
class _Node:
    gen: int = -1
    rooms: set[str] = field(default_factory=set)
    last_seen: float = 0.0  # loop time (ClusterView._now)
    started: float = 0.0
    members: int = 0
    bye: bool = False  # said Bye and nothing since: kept (rooms hosted) until silent


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """What a node's cluster view knows of one node (itself included): for inspection."""

    node_id: str
    started: float  # wall time (time.time()) it started; 0.0 if not known yet
    last_seen: float  # seconds since it was last heard from (0.0 for this node)
    rooms: frozenset[str]  # rooms it hosts
    members: int  # its local members, as of its last frame


@dataclass(slots=True)
class _Outgoing:
    frame: bytes
    to: str | None
    done: anyio.Event | None = None
    receivers: int | None = None
    error: RoomRouterError | None = None


@dataclass(slots=True)
class _Barrier:
    waiting: set[str]
    frame: bytes  # the Host frame, to send again to a peer that reconnected meanwhile
    done: anyio.Event = field(default_factory=anyio.Event)

    def release(self, node: str) -> None:
        self.waiting.discard(node)
        if not self.waiting:
            self.done.set()


class ClusterView:
    """This node's view of the cluster, and its side of the control protocol."""

    def __init__(
        self,
        node_id: str,
        broker: Broker,
        stats: Stats,
        *,
        local_rooms: Callable[[], Iterable[str]],
        heartbeat_interval: float,
        node_ttl: float,
        barrier_timeout: float,
        on_node_dropped: Callable[[str], None] | None = None,
        local_members: Callable[[], int] = lambda: 0,
        suspect_interval: float | None = None,
        control_secret: bytes | None = None,
    ) -> None:
        self.node_id = node_id
        self._broker = broker
        self._stats = stats
        self._local_rooms = local_rooms
        self.heartbeat_interval = heartbeat_interval
        self.node_ttl = node_ttl
        self.barrier_timeout = barrier_timeout
        self._on_node_dropped = on_node_dropped
        self._local_members = local_members
        self.started = time.time()
        self._nodes: dict[str, _Node] = {}
        self._hosts: dict[str, set[str]] = {}  # room -> remote nodes hosting it
        self._gen = 0
        self._barrier_seq = 0
        self._barriers: dict[int, _Barrier] = {}
        self._states_seen: set[str] = set()
        self._states_named: set[str] = set()  # nodes named live by the States seen
        self._hellos_seen: set[str] = set()  # nodes whose Hello was heard during the start
        self._ready_seen = False  # a State came from a node whose own start was done
        self._ready = False  # this node's start is done
        self._hello_answered = anyio.Event()
        self._hello_expected: int | None = None
        self._hello_window = False  # a discovery window runs (nobody counts the nodes)
        self.suspect_interval = (
            suspect_interval
            if suspect_interval is not None
            else min(3 * heartbeat_interval, node_ttl)
        )
        # A heartbeat later than this means this node's loop stalled long enough for a peer
        # to have suspected it (its heartbeats are heartbeat_interval apart when on time).
        self._stall_grace = (self.suspect_interval - heartbeat_interval) / 2
        self._secret = control_secret
        self._codec = ControlCodec(control_secret, stats)
        # Loop time: monotonic time minus how late this node's heartbeat ran, in all.
        self._lag = 0.0
        self._tick_due = _monotonic() + heartbeat_interval
        self._lease = math.inf  # hosts_of trusts the view until then (set by the ticks)
        self._owed: set[str] = set()  # released from a barrier: owed a State when heard
        self._unsynced = False
        self._sync_seq = 0
        self._sync_answered: set[str] = set()
        self._sync_sent = 0.0
        self._resync_started = -math.inf  # monotonic

    def open(self) -> None:
        """Create the outgoing queue (when the router starts; :meth:`close` disposes of it).

        Every control frame this node sends goes through one FIFO drained by one sender task,
        so frames leave in the order their generation numbers were taken (a State must never
        overtake an older Host, or a receiver would drop rooms). Replies are produced in the
        broker's reader callback, which must not block; the stream is bounded so a flood of
        Hellos cannot grow it.
        """
        self._out_send, self._out_recv = anyio.create_memory_object_stream[_Outgoing](
            max_buffer_size=10_000
        )
        self._tick_due = _monotonic() + self.heartbeat_interval
        self._lease = self._tick_due + self._stall_grace

    # -- queries (hot path) -------------------------------------------------------------------

    # The one clock read is the price of exactness after a stall nothing else saw before this
    # publish (a blocking call that ends in a publish): the lease is the heartbeat's deadline.

    def has_remote_host(self, room: str) -> bool:
        """True if another live node hosts ``room`` (or the view may be stale)."""
        if _monotonic() > self._lease:
            return bool(self._stale())
        return room in self._hosts

    def hosts_of(self, room: str) -> Collection[str]:
        """The other live nodes hosting ``room``: the view's own set (not a copy), or an
        empty tuple; while the view may be stale (this node stalled or reconnected and has
        not resynchronised yet), a collection that stands for every node. Read it before
        awaiting anything."""
        if _monotonic() > self._lease:
            return self._stale()
        return self._hosts.get(room, ())

    def remote_hosts(self, room: str) -> frozenset[str]:
        nodes = self._nodes
        return frozenset(n for n in self._hosts.get(room, ()) if not nodes[n].bye)

    def live_nodes(self) -> frozenset[str]:
        """Other nodes this node believes alive (a node that said Bye is gone from here at
        once, though publishes still reach its rooms until it has been silent a while)."""
        return frozenset(n for n, node in self._nodes.items() if not node.bye)

    def remote_rooms(self) -> frozenset[str]:
        nodes = self._nodes
        if not any(node.bye for node in nodes.values()):
            return frozenset(self._hosts)
        return frozenset(
            r for r, hosts in self._hosts.items() if any(not nodes[n].bye for n in hosts)
        )

    @property
    def synced(self) -> bool:
        """False while this node resynchronises after its own silence (publishes then all go
        through the broker)."""
        return not self._unsynced

    def suspects(self) -> frozenset[str]:
        """Nodes silent for longer than the suspect interval (barriers do not wait for them)."""
        now = self._now()
        return frozenset(
            n for n, node in self._nodes.items() if now - node.last_seen > self.suspect_interval
        )

    # -- announcements (called by the subscription manager) -----------------------------------

    async def announce_host(self, rooms: list[str]) -> None:
        """Tell every node this one now hosts ``rooms``; return when all live nodes applied it.

        A node that does not answer within ``barrier_timeout`` (or is dropped meanwhile) is not
        waited for any longer: it is presumed dead, and its TTL will remove it.
        """
        self._gen += 1
        self._barrier_seq += 1
        seq = self._barrier_seq
        host = Host(self.node_id, self._gen, rooms, seq)
        frame = self._codec.encode(host)
        # A suspect node (silent past the suspect interval) or one that said Bye is not
        # waited for; it is owed a State when heard again (docs/architecture.md, rule 5).
        now = self._now()
        waiting: set[str] = set()
        for node_id, node in self._nodes.items():
            if not node.bye and now - node.last_seen <= self.suspect_interval:
                waiting.add(node_id)
            else:
                self._owed.add(node_id)
        barrier = _Barrier(waiting, frame)
        if barrier.waiting:
            self._barriers[seq] = barrier
        try:
            await self._send_frame(frame)
            if barrier.waiting:
                with anyio.move_on_after(self.barrier_timeout):
                    await self._wait_barrier(barrier)
                if barrier.waiting:
                    self._stats.barrier_timeouts += 1
                    self._owed.update(barrier.waiting)
                    log.warning(
                        "node %s: no acknowledgement from %s within %.1fs for %d room(s)",
                        self.node_id, sorted(barrier.waiting), self.barrier_timeout, len(rooms),
                    )  # fmt: skip
        finally:
            self._barriers.pop(seq, None)

    async def _wait_barrier(self, barrier: _Barrier) -> None:
        """Wait for every Ack, releasing each node as soon as it turns suspect."""
        while barrier.waiting:
            now = self._now()
            wake = math.inf
            for node_id in list(barrier.waiting):
                node = self._nodes.get(node_id)
                silence = math.inf if node is None else now - node.last_seen
                if silence > self.suspect_interval:
                    barrier.release(node_id)
                    self._owed.add(node_id)
                    self._stats.barrier_suspects += 1
                    log.info(
                        "node %s: not waiting for suspect node %s (silent %.2fs)",
                        self.node_id, node_id, silence,
                    )  # fmt: skip
                else:
                    wake = min(wake, self.suspect_interval - silence)
            if not barrier.waiting:
                return
            # Loop time runs no faster than real time: waking this late is never early.
            with anyio.move_on_after(wake + 0.005):
                await barrier.done.wait()

    async def announce_unhost(self, rooms: list[str]) -> None:
        self._gen += 1
        await self._send(Unhost(self.node_id, self._gen, rooms))

    # -- lifecycle ------------------------------------------------------------------------------

    async def join_cluster(self, discovery_window: float) -> None:
        """Say Hello and wait until every node that heard it answered with its State."""
        self._states_seen.clear()
        self._states_named.clear()
        self._hellos_seen.clear()
        self._ready_seen = False
        self._hello_answered = anyio.Event()
        self._hello_window = False
        # A broker that cannot count a broadcast's receivers may count the nodes that will
        # hear it: before the Hello, so that every node counted has its control plane
        # subscribed already (docs/architecture.md, "The cluster view", rule 2).
        counted = None if self._broker.counts_receivers else await self._broker.count_nodes()
        receivers = await self._send(self._hello())
        expected = counted if receivers is None else max(receivers - 1, 0)
        if expected is not None:
            self._hello_expected = expected
            self._check_hello_done()
            with anyio.move_on_after(self.node_ttl):
                await self._hello_answered.wait()
            if not self._hello_answered.is_set():
                self._stats.discovery_timeouts += 1
                silent = self._states_named - self._states_seen
                log.warning(
                    "node %s: %d of %d other subscriber(s) of the control channel did not "
                    "answer within %.1fs%s; starting anyway",
                    self.node_id, expected - len(self._states_seen), expected, self.node_ttl,
                    f" (silent nodes: {sorted(silent)})" if silent else
                    " (no node named them: subscribers that are no node, e.g. a monitor?)",
                )  # fmt: skip
        else:
            # Nobody can count who heard us: give everyone a window to answer, ended early
            # once a node whose start was done answered and every node named answered.
            self._hello_expected = None
            self._hello_window = True
            self._check_hello_done()
            with anyio.move_on_after(discovery_window):
                await self._hello_answered.wait()
        self._ready = True

    async def leave_cluster(self) -> None:
        with anyio.move_on_after(1.0, shield=True):
            try:
                await self._send(Bye(self.node_id))
            except RoomRouterError:
                pass

    async def run_sender(self) -> None:
        async for item in self._out_recv:
            try:
                item.receivers = await self._broker.publish_control(item.frame, to=item.to)
                self._stats.control_sent += 1
            except RoomRouterError as exc:
                item.error = exc
                self._stats.control_send_errors += 1
                log.debug("node %s: control frame to %s failed: %s", self.node_id, item.to, exc)
            except Exception as exc:  # a backend bug must not kill the sender
                item.error = BrokerError(f"control send failed: {describe(exc)}")
                self._stats.control_send_errors += 1
                log.exception("node %s: control send raised", self.node_id)
            if item.done is not None:
                item.done.set()

    async def run_heartbeat(self) -> None:
        # The start (broker connect, Kafka's group join) may have taken longer than a
        # heartbeat: that is no stall of a running node, and nothing was published yet.
        now = _monotonic()
        self._lag += max(now - self._tick_due, 0.0)
        self._tick_due = now + self.heartbeat_interval
        if not self._unsynced:
            self._lease = self._tick_due + self._stall_grace
        while True:
            await anyio.sleep(max(self._tick_due - _monotonic(), 0.0))
            self._tick()
            self.expire()
            try:
                await self._send(Heartbeat(self.node_id, self._gen, self._local_members()))
            except RoomRouterError as exc:
                log.debug("node %s: heartbeat failed: %s", self.node_id, exc)

    def _now(self) -> float:
        """Loop time: monotonic seconds minus every second this node's heartbeat ran late,
        the current lateness included. Peers' silence is measured in it, so time this node's
        own loop was blocked or busy (its reader had no chance to read their frames) is never
        counted against them."""
        now = _monotonic()
        late = now - self._tick_due
        return now - self._lag - (late if late > 0.0 else 0.0)

    def _tick(self) -> None:
        now = _monotonic()
        due = self._tick_due
        late = now - due
        if late > 0.0:
            self._lag += late
        self._tick_due = now + self.heartbeat_interval
        if late > self._stall_grace and self._resync_started < due:  # not seen by a publish
            self._start_resync(f"its heartbeat ran {late:.2f}s late")
        elif not self._unsynced:
            self._lease = self._tick_due + self._stall_grace
        else:
            self._resend_sync()

    def expire(self) -> None:
        """Drop nodes not heard from within the TTL (loop time), with their rooms, and those
        that said Bye and have been silent for the suspect interval since."""
        now = self._now()
        for node_id, node in list(self._nodes.items()):
            silence = now - node.last_seen
            if silence > self.node_ttl:
                log.info("node %s: dropping silent node %s", self.node_id, node_id)
                self._stats.nodes_expired += 1
                self._drop(node_id)
            elif node.bye and silence > self.suspect_interval:
                self._drop(node_id)

    def on_reconnect(self) -> None:
        """The broker reconnected: control frames may have been missed both ways."""
        self._reply(self._hello(), None)
        self._start_resync("its broker connection was lost")

    # -- resynchronisation after this node's own silence ----------------------------------------

    def _stale(self) -> Collection[str]:
        """hosts_of's answer once the lease ran out: this node stalled and no tick saw it yet
        (or it resynchronises): every room counts as hosted elsewhere."""
        if not self._unsynced:
            late = _monotonic() - self._tick_due
            self._start_resync(f"its loop ran {late:.2f}s late")
        return _EVERY_NODE

    def _start_resync(self, why: str) -> None:
        """This node was silent long enough for its peers to stop waiting for it: frames it
        should have acknowledged may still be unread. Until every live node answered a Sync
        with its State, every publish goes through the broker."""
        self._lease = -math.inf
        self._unsynced = True
        self._resync_started = _monotonic()
        self._sync_seq += 1
        self._sync_answered = set()
        self._sync_sent = self._now()
        self._stats.resyncs += 1
        log.info("node %s: resynchronising the cluster view: %s", self.node_id, why)
        self._reply(Sync(self.node_id, self._sync_seq), None)
        self._check_synced()

    def _resend_sync(self) -> None:
        # A Sync or its answer may be lost (a send error, a reconnect): ask the missing again.
        now = self._now()
        if now - self._sync_sent < self.suspect_interval:
            return
        self._sync_sent = now
        for node_id in self._nodes:
            if node_id not in self._sync_answered:
                self._reply(Sync(self.node_id, self._sync_seq), node_id)

    def _check_synced(self) -> None:
        if self._unsynced and self._sync_answered.issuperset(self._nodes):
            self._unsynced = False
            self._lease = max(self._tick_due, _monotonic()) + self._stall_grace
            log.info("node %s: cluster view resynchronised", self.node_id)

    # -- control frames in --------------------------------------------------------------------

    def on_control(self, frame: bytes) -> None:
        """Apply one control frame (called synchronously by the broker's reader)."""
        msg = self._codec.decode(frame)
        if msg is None:
            return  # counted by the codec
        if msg.node == self.node_id:
            return  # our own broadcast
        self._stats.control_received += 1
        now = self._now()
        node = self._nodes.get(msg.node)
        if isinstance(msg, Bye):
            # Joins stop waiting for it at once, but its rooms stay hosted (publishes to them
            # go through the broker) until it has been silent for the suspect interval: a
            # forged Bye of a live node costs broker publishes, not messages; its next frame
            # makes it a live node again, and it is owed a State then.
            if node is not None:
                node.bye = True
                self._owed.add(msg.node)
                for waiting in list(self._barriers.values()):
                    waiting.release(msg.node)
            return
        if node is None:
            node = self._nodes[msg.node] = _Node()
            if not isinstance(msg, Hello | State | Heartbeat):
                # A node first heard mid-stream (it was presumed dead, or we reconnected): a
                # delta says nothing of its other rooms. Ask for all of them. (A heartbeat's
                # generation never matches an unknown node's: that branch asks.)
                self._request_sync(msg.node)
        node.last_seen = now
        node.bye = False
        if msg.node in self._owed:
            # A barrier went on without this node's Ack: it may have missed the Host. Our
            # State, sent after that Host, has the room (a Hello or Sync gets one anyway).
            self._owed.discard(msg.node)
            if not isinstance(msg, Hello | Sync):
                self._stats.owed_states += 1
                self._reply(self._state(), msg.node)

        if isinstance(msg, Host):
            self._apply_delta(msg.node, node, msg.gen, msg.rooms, add=True)
            self._reply(Ack(self.node_id, msg.barrier), msg.node)
        elif isinstance(msg, Unhost):
            self._apply_delta(msg.node, node, msg.gen, msg.rooms, add=False)
        elif isinstance(msg, Ack):
            barrier = self._barriers.get(msg.barrier)
            if barrier is not None:
                barrier.release(msg.node)
        elif isinstance(msg, Heartbeat):
            node.members = msg.members
            if msg.gen != node.gen:
                self._request_sync(msg.node)
        elif isinstance(msg, Hello):
            node.started, node.members = msg.started, msg.members
            self._set_rooms(msg.node, node, msg.gen, msg.rooms)
            # Its whole state, said after this node's control plane was subscribed (it was
            # heard): as good as a State from a node the answers name (a node starting at
            # the same time may never hear this node's Hello, and answer it).
            self._hellos_seen.add(msg.node)
            self._check_hello_done()
            self._reply(self._state(), msg.node)
            # It may have missed the Host of a join that waits for it (it reconnected): send
            # those again, after the State, so it acknowledges instead of timing out.
            for barrier in self._barriers.values():
                if msg.node in barrier.waiting:
                    self._stats.barrier_resends += 1
                    self._reply_frame(barrier.frame, msg.node)
        elif isinstance(msg, State):
            node.started, node.members = msg.started, msg.members
            if msg.gen >= node.gen:
                self._set_rooms(msg.node, node, msg.gen, msg.rooms)
            self._states_seen.add(msg.node)
            self._states_named.update(n for n in msg.live if n != self.node_id)
            self._ready_seen |= msg.ready
            self._check_hello_done()
            if msg.sync and msg.sync == self._sync_seq:
                self._sync_answered.add(msg.node)
                self._check_synced()
        elif isinstance(msg, Sync):
            self._reply(self._state(msg.seq), msg.node)

    # -- internals ------------------------------------------------------------------------------

    def _hosted(self) -> list[str]:
        return sorted(self._local_rooms())

    def _hello(self) -> Hello:
        return Hello(self.node_id, self._gen, self._hosted(), self.started, self._local_members())

    def _state(self, sync: int = 0) -> State:
        return State(
            self.node_id, self._gen, self._hosted(), sorted(self._nodes), self.started,
            self._local_members(), sync, self._ready,
        )  # fmt: skip

    def nodes(self) -> list[NodeInfo]:
        """Every node this view knows alive, this one first."""
        now = self._now()
        mine = NodeInfo(
            self.node_id, self.started, 0.0, frozenset(self._local_rooms()),
            self._local_members(),
        )  # fmt: skip
        return [mine] + [
            NodeInfo(node_id, n.started, now - n.last_seen, frozenset(n.rooms), n.members)
            for node_id, n in sorted(self._nodes.items())
            if not n.bye
        ]

    def _check_hello_done(self) -> None:
        expected = self._hello_expected
        seen = self._states_seen
        # A node named by the answers has answered if we have its State or heard its Hello.
        named_answered = self._states_named <= seen | self._hellos_seen
        if expected is None:
            # A window: only a node whose own start was done knows every live node (a young
            # one may not know them yet), so one of them must have answered.
            if self._hello_window and self._ready_seen and named_answered:
                self._hello_answered.set()
            return
        # Every subscriber the broker counted answered; or every node the answers know of did
        # (the count may include subscribers that are no node). A node unknown to all who
        # answered is starting itself: it hosts nothing yet and has our Hello.
        if len(seen) >= expected or (seen and named_answered):
            self._hello_answered.set()

    def _request_sync(self, node_id: str) -> None:
        self._stats.syncs_requested += 1
        self._reply(Sync(self.node_id), node_id)

    def _apply_delta(
        self, node_id: str, node: _Node, gen: int, rooms: list[str], add: bool
    ) -> None:
        if gen <= node.gen:
            return  # already contained in a State we applied
        if node.gen >= 0 and gen != node.gen + 1:
            # We missed frames of this node (a reconnect): ask for the whole picture.
            self._request_sync(node_id)
        node.gen = gen
        for room in rooms:
            if add:
                node.rooms.add(room)
                self._hosts.setdefault(room, set()).add(node_id)
            else:
                node.rooms.discard(room)
                self._unhost(room, node_id)

    def _set_rooms(self, node_id: str, node: _Node, gen: int, rooms: list[str]) -> None:
        new = set(rooms)
        for room in node.rooms - new:
            self._unhost(room, node_id)
        for room in new - node.rooms:
            self._hosts.setdefault(room, set()).add(node_id)
        node.rooms = new
        node.gen = gen

    def _unhost(self, room: str, node_id: str) -> None:
        hosts = self._hosts.get(room)
        if hosts is not None:
            hosts.discard(node_id)
            if not hosts:
                del self._hosts[room]

    def _drop(self, node_id: str) -> None:
        node = self._nodes.pop(node_id, None)
        self._owed.discard(node_id)
        if node is not None:
            for room in node.rooms:
                self._unhost(room, node_id)
            if self._on_node_dropped is not None:
                self._on_node_dropped(node_id)
        for barrier in list(self._barriers.values()):
            barrier.release(node_id)
        self._check_synced()

    def _reply(self, msg: Frame, to: str | None) -> None:
        self._reply_frame(self._codec.encode(msg), to)

    def _reply_frame(self, frame: bytes, to: str | None) -> None:
        try:
            self._out_send.send_nowait(_Outgoing(frame, to))
        except anyio.WouldBlock:
            self._stats.dropped_control_overflow += 1
        except anyio.ClosedResourceError:
            pass  # the router is closing: nobody needs the answer

    async def _send(self, msg: Frame) -> int | None:
        """Broadcast ``msg`` in FIFO order with the replies; return the receiver count."""
        return await self._send_frame(self._codec.encode(msg))

    async def _send_frame(self, frame: bytes) -> int | None:
        item = _Outgoing(frame, None, anyio.Event())
        await self._out_send.send(item)
        assert item.done is not None
        await item.done.wait()
        if item.error is not None:
            raise item.error
        return item.receivers

    def close(self) -> None:
        self._out_send.close()
        self._out_recv.close()
