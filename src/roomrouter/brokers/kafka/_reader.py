"""What a Kafka node reads, and the loop that reads it.

The consumer's manual assignment is always the control partition plus the partitions of the
rooms with local members (see "Dynamic subscription" and "Where a newly subscribed room
starts" in the package docstring). :class:`Reader` keeps, per hosted room, its partition and
*threshold* (the first offset to deliver), and per assigned partition the next offset to read
(aiokafka resets a partition's state on every ``assign``; the reader seeks back to it). Its
loop hands control records addressed to this node and data records of hosted rooms at or
above their threshold to the router, and drops the rest by key before any decoding.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import anyio
from aiokafka import TopicPartition

from ..._errors import BrokerUnavailable
from .._base import BrokerContext
from ._common import OffsetGuard, partition, retrieve
from ._session import Session, mark

__all__ = ["BROADCAST", "Reader", "SessionLost"]

log = logging.getLogger("roomrouter.kafka")

#: The key of a control record for every node (``@{node}``: one node, ``#{node}``: a marker or
#: health probe of that node, which everyone skips).
BROADCAST = b"*"


class SessionLost(BrokerUnavailable):
    """The session failed (the reader, the health probe, or a client call)."""


class Reader:
    """A node's reading state and loops (see the module docstring). One for the node's life;
    it outlives sessions (:meth:`restore` enters a new one)."""

    def __init__(
        self, ctx: BrokerContext, data_topic: str, control_topic: str, guard: OffsetGuard
    ) -> None:
        self.ctx = ctx
        self.data_topic = data_topic
        self.control_topic = control_topic
        self.guard = guard
        self.direct_key = b"@" + ctx.node_id.encode()
        self.probe_key = b"#" + ctx.node_id.encode()
        #: room key -> (partition, first offset to deliver)
        self.rooms: dict[bytes, tuple[int, int]] = {}
        #: The next offset to read, per assigned partition.
        self.positions: dict[TopicPartition, int] = {}
        #: The offset of this node's last control-partition marker.
        self.control_marker = -1
        #: Records of rooms this node does not host, dropped by key.
        self.filtered = 0
        #: Records of hosted rooms dropped because they were older than the room's join.
        self.skipped_before_join = 0
        self._probe_seen = 0
        self._probe_event = anyio.Event()

    async def mark(
        self, session: Session, *, control: bool = False, partitions: Iterable[int] = ()
    ) -> dict[int, int]:
        """Append a marker to the control partition or to each of ``partitions``; return
        partition -> the marker's offset."""
        targets: dict[int, tuple[str, bytes | None]]
        if control:
            targets = {0: (self.control_topic, self.probe_key)}
        else:
            targets = {p: (self.data_topic, None) for p in partitions}
        return await mark(session.producer, targets)

    async def restore(self, session: Session) -> None:
        """Enter the control partition and every room's partition at fresh markers.

        A reconnect may face recreated (empty) partitions, so old positions and thresholds are
        meaningless: everything restarts at a marker. The caller holds the assignment lock.
        """
        rooms = {key: partition(key, session.partitions) for key in self.rooms}
        control_marker = await self.mark(session, control=True)
        markers = await self.mark(session, partitions=set(rooms.values()))
        # Synchronous from here: the loop sees the new assignment and thresholds together.
        # (An unsubscribe may have run meanwhile; it takes no lock, so keep only what is left.)
        self.rooms = {
            key: (rooms[key], markers[rooms[key]] + 1) for key in self.rooms if key in rooms
        }
        self.control_marker = control_marker[0]
        self.positions = {session.control_tp: control_marker[0] + 1}
        self.assign(session, {p: markers[p] + 1 for p in markers})

    def join(self, session: Session, wanted: dict[bytes, int], markers: dict[int, int]) -> None:
        """Host the rooms ``wanted`` (key -> partition) from their partitions' ``markers`` on.
        Synchronous: their thresholds and the assignment change together."""
        for key, p in wanted.items():
            self.rooms[key] = (p, markers[p] + 1)
        self.assign(session, {p: offset + 1 for p, offset in markers.items()})

    def assign(self, session: Session, seeks: dict[int, int]) -> None:
        """Make the consumer's assignment the control partition plus the partitions of
        :attr:`rooms`. Partitions that stay keep their position; new ones start at ``seeks``.
        Synchronous, so no fetched record is handed out between assign and seek."""
        wanted = {session.control_tp} | {
            TopicPartition(self.data_topic, p) for p, _ in self.rooms.values()
        }
        consumer = session.consumer
        if wanted == consumer.assignment():
            return
        positions = {}
        for tp in wanted:
            position = self.positions.get(tp)
            if position is None:
                position = seeks[tp.partition]
            positions[tp] = position
        consumer.assign(list(wanted))
        for tp, position in positions.items():
            consumer.seek(tp, position)
        self.positions = positions

    async def read(self, session: Session, current: Callable[[], Session | None]) -> None:
        """Read ``session``'s assignment and dispatch, forever (until ``current()`` is another
        session); client errors propagate."""
        ctx = self.ctx
        consumer = session.consumer
        control_tp = session.control_tp
        direct_key, probe_key = self.direct_key, self.probe_key
        guard = self.guard
        while True:
            batches = await consumer.getmany(timeout_ms=1000)
            if current() is not session:
                return
            for tp, fetched in batches.items():
                # Contiguous or not at all: see OffsetGuard (Tansu serves past unreadable
                # offsets; taking those would lose the hole's record for good).
                records = guard.accept(consumer, tp, fetched, self.positions.get(tp))
                if not records:
                    continue
                if tp == control_tp:
                    for record in records:
                        key = record.key
                        if key in (BROADCAST, direct_key):
                            _call(ctx.on_control, record.value, ctx)
                        elif key == probe_key and record.value:
                            self._probe_seen = max(self._probe_seen, _int(record.value))
                            self._probe_event.set()
                else:
                    rooms = self.rooms
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
                self.positions[tp] = records[-1].offset + 1

    async def probe(self, session: Session, interval: float, limit: float) -> None:
        """Append a probe to the control partition and read it back, every ``interval``
        seconds, forever; raise :class:`SessionLost` if a round trip fails or takes longer
        than ``limit`` seconds (see "Faults" in the package docstring)."""
        seq = self._probe_seen
        while True:
            await anyio.sleep(interval)
            seq += 1
            with anyio.move_on_after(limit):
                future = await session.producer.send(
                    self.control_topic, str(seq).encode(), key=self.probe_key, partition=0
                )
                try:
                    await future
                finally:
                    future.add_done_callback(retrieve)
                while self._probe_seen < seq:
                    self._probe_event = anyio.Event()
                    await self._probe_event.wait()
            if self._probe_seen < seq:
                raise SessionLost(f"probe {seq} not read back within {limit} s")


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
