"""A hypothesis state machine drives join / leave / publish / close over three nodes and checks
every member's deliveries against a model.

Operations run **concurrently**, as users make them: each step is a batch of lanes that run at
once, each lane a short sequence of operations (program order within a lane is a
happens-before; operations of different lanes are concurrent). One node hears control frames
late (a slow link), so joins on the others really wait in their barrier while other lanes
join, leave and publish.

The routers live on an event loop in a portal thread; the rules call into it. After each step
batch (``settle``) and at teardown, every member must have received exactly the messages the
model says it must, possibly some it *may* receive (published concurrently with a join or a
leave of it, or to a room it left afterwards while still in flight), nothing else, nothing
twice, and per publisher and room in publish order. Membership must be what the operations
imply, and every node's subscriptions must equal its rooms with members.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import anyio
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from roomrouter import Envelope, Member, MemberClosed, RoomRouter

from .backends import BACKENDS, Backend
from .conftest import TEST_ROUTER_OPTIONS, selected_backends, unique_namespace
from .faulty import ControlFault
from .helpers import eventually

ROOMS = ["r0", "r1", "r2", "r.*", "#"]
NODES = 3
SLOTS = 6
#: Node 0 hears control frames this late, so barriers of joins on nodes 1 and 2 stay open.
SLOW_LINK = 0.03

Op = tuple[Any, ...]  # ("join", slot, room) | ("leave", slot, room) | ("close", slot)
#                       | ("publish", node, room)
KINDS = ["join", "join", "leave", "publish", "publish", "close"]


@st.composite
def lanes_of_ops(draw: st.DrawFn) -> list[list[Op]]:
    """One to three lanes of one to three operations. Each batch draws its operations from one
    or two rooms and members, so operations collide (the races under test) instead of
    spreading thin over every pair."""
    rooms = draw(st.lists(st.sampled_from(ROOMS), min_size=1, max_size=2, unique=True))
    slots = draw(st.lists(st.integers(0, SLOTS - 1), min_size=1, max_size=2, unique=True))

    def op(kind: str) -> st.SearchStrategy[Op]:
        if kind == "publish":
            return st.tuples(st.just(kind), st.integers(0, NODES - 1), st.sampled_from(rooms))
        if kind == "close":
            return st.tuples(st.just(kind), st.sampled_from(slots))
        return st.tuples(st.just(kind), st.sampled_from(slots), st.sampled_from(rooms))

    ops = st.sampled_from(KINDS).flatmap(op)
    return draw(st.lists(st.lists(ops, min_size=1, max_size=3), min_size=1, max_size=3))


@dataclass(eq=False)
class _ModelMember:
    node: int
    member: Member
    rooms: set[str] = field(default_factory=set)
    must: set[str] = field(default_factory=set)  # ids it must receive
    may: set[str] = field(default_factory=set)  # ids it may receive (raced, or left after)
    got: list[Envelope] = field(default_factory=list)
    closed: bool = False
    joined: dict[str, int] = field(default_factory=dict)  # room -> step its join was seen


class RouterMachine(RuleBasedStateMachine):
    portal: BlockingPortal
    backend_name: str
    batch_delay: float  # delivery_batch_delay of every node (issue 23)

    def __init__(self) -> None:
        super().__init__()
        self.backend: Backend = BACKENDS[self.backend_name](unique_namespace())
        self.routers: list[RoomRouter] = []
        self._contexts: list[AbstractContextManager[Any]] = []
        self.model: list[_ModelMember] = []
        self.sent: dict[str, Envelope] = {}
        self.in_flight: dict[str, set[str]] = {}  # room -> ids published since the last settle
        self.counter = 0
        self.step = 0  # rule runs so far, to say in a failure when a message was published
        self.sent_step: dict[str, int] = {}

    def teardown(self) -> None:
        try:
            if self.routers:
                self.settle()
                self.portal.call(self.backend.check_subscriptions, self.routers)
        finally:
            for cm in reversed(self._contexts):
                cm.__exit__(None, None, None)
            self.portal.call(self.backend.cleanup)

    # -- rules ----------------------------------------------------------------------------------
    # A fixed pool of member slots (two per node) keeps every rule applicable at every step, so
    # the search spends its budget on interleavings instead of on building members up.

    def _new_member(self, node: int) -> _ModelMember:
        self.counter += 1
        return _ModelMember(node, self.routers[node].member(f"m{self.counter}"))

    @initialize()
    def start_nodes(self) -> None:
        opts = {
            **TEST_ROUTER_OPTIONS,
            **self.backend.router_options,
            "delivery_batch_delay": self.batch_delay,
        }
        for i in range(NODES):
            broker = self.backend.broker()
            if i == 0:
                broker = ControlFault(broker, delay=SLOW_LINK)
            router = RoomRouter(broker, namespace=self.backend.namespace, **opts)
            cm = self.portal.wrap_async_context_manager(router)
            cm.__enter__()
            self._contexts.append(cm)
            self.routers.append(router)
        self.slots = [self._new_member(i % NODES) for i in range(SLOTS)]
        self.model.extend(self.slots)

    @rule(lanes=lanes_of_ops())
    def concurrently(self, lanes: list[list[Op]]) -> None:
        self.step += 1
        members = list(self.slots)  # the members the slots hold as the batch starts
        results = self.portal.call(self._run_lanes, lanes, members)
        closed = {op[1] for lane in lanes for op in lane if op[0] == "close"}
        # -- which member must / may receive each publish of the batch
        for li, lane in enumerate(lanes):
            for oi, op in enumerate(lane):
                if op[0] != "publish":
                    continue
                env: Envelope = results[li][oi]
                self.sent[env.id] = env
                self.sent_step[env.id] = self.step
                room = op[2]
                for slot, m in enumerate(members):
                    verdict = self._verdict(lanes, li, oi, slot, m, room, slot in closed)
                    if verdict == "must":
                        m.must.add(env.id)
                    elif verdict == "may":
                        m.may.add(env.id)
                self.in_flight.setdefault(room, set()).add(env.id)
        # -- joins that raised: only a member closed in the same batch may refuse a join
        for li, lane in enumerate(lanes):
            for oi, op in enumerate(lane):
                if op[0] == "join" and isinstance(results[li][oi], BaseException):
                    assert isinstance(results[li][oi], MemberClosed) and op[1] in closed
        # -- membership after the batch
        for slot, m in enumerate(members):
            if slot in closed:
                self._left(m, set(m.rooms))
                m.closed = True
                new = self._new_member(m.node)
                self.slots[slot] = new
                self.model.append(new)
                continue
            actual = self.portal.call(lambda m=m: m.member.rooms)
            for room in ROOMS:
                touched = [
                    (li, op[0])
                    for li, lane in enumerate(lanes)
                    for op in lane
                    if op[0] in ("join", "leave") and op[1] == slot and op[2] == room
                ]
                if not touched:
                    assert (room in actual) == (room in m.rooms), (m.member, room)
                    continue
                kinds = {kind for _, kind in touched}
                if len({li for li, _ in touched}) == 1 or len(kinds) == 1:
                    want = touched[-1][1] == "join" if len(kinds) > 1 else "join" in kinds
                    assert (room in actual) == want, (m.member, room, touched)
                # else: a join and a leave raced in different lanes; either order is right.
                if "join" in kinds:
                    # The member was in the room for a while, perhaps only between the two:
                    # messages of the room still in flight may reach it then, as after any
                    # join, even if it ends the batch outside the room.
                    m.may |= self.in_flight.get(room, set())
                if room in actual and room not in m.rooms:
                    m.may |= self.in_flight.get(room, set())
                    m.rooms.add(room)
                    m.joined[room] = self.step
                elif room not in actual and room in m.rooms:
                    self._left(m, {room})
                elif "leave" in kinds:
                    self._left(m, {room})  # a leave raced: in-flight ones may or may not come
                    if room in actual:
                        m.rooms.add(room)
                        m.joined[room] = self.step

    @staticmethod
    def _verdict(
        lanes: list[list[Op]], li: int, oi: int, slot: int, m: _ModelMember, room: str,
        closed: bool,
    ) -> str:  # fmt: skip
        """Must, may or must not member ``m`` (slot ``slot``) receive the publish at lane
        ``li``, position ``oi``, to ``room``?"""

        def on_it(op: Op) -> bool:
            return (op[0] in ("join", "leave") and op[1] == slot and op[2] == room) or (
                op[0] == "close" and op[1] == slot
            )

        mine = [op for op in lanes[li][:oi] if on_it(op)]
        later = [op for op in lanes[li][oi + 1 :] if on_it(op)]
        others = [op for j, lane in enumerate(lanes) if j != li for op in lane if on_it(op)]
        if mine:
            surely_in = mine[-1][0] == "join" and not any(op[0] == "close" for op in mine)
        else:
            surely_in = room in m.rooms
        can_be_in = room in m.rooms or any(
            op[0] == "join" for op in lanes[li][: oi + 1] + later + others if on_it(op)
        )
        if surely_in and not closed and not any(op[0] != "join" for op in later + others):
            return "must"
        return "may" if can_be_in or surely_in else "no"

    async def _run_lanes(self, lanes: list[list[Op]], members: list[_ModelMember]) -> list[Any]:
        results: list[list[Any]] = [[None] * len(lane) for lane in lanes]

        async def run(li: int, lane: list[Op]) -> None:
            for oi, op in enumerate(lane):
                if op[0] == "publish":
                    results[li][oi] = await self.routers[op[1]].publish(op[2], b"p")
                    continue
                member = members[op[1]].member
                if op[0] == "join":
                    try:
                        await member.join(op[2])
                    except MemberClosed as exc:
                        results[li][oi] = exc
                elif op[0] == "leave":
                    await member.leave(op[2])
                else:
                    await member.close()

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for li, lane in enumerate(lanes):
                    tg.start_soon(run, li, lane)
        return results

    @precondition(lambda self: any(m.must for m in self.model))
    @rule()
    def settle(self) -> None:
        """Wait until every member has what it must, then check nothing is wrong."""
        self.portal.call(self._collect)
        self.in_flight.clear()
        for m in self.model:
            ids = [e.id for e in m.got]
            assert len(ids) == len(set(ids)), f"duplicate delivery to {m.member.id}"
            missing = m.must - set(ids)
            assert not missing, f"{m.member.id} missed {len(missing)} message(s)"
            extra = set(ids) - m.must - m.may
            assert not extra, f"{m.member.id} got {len(extra)} message(s) it must not: " + (
                self._describe(m, extra)
            )
            # Guarantee 3 is per room: one publisher's rooms may travel different paths (Kafka
            # partitions, read by one consumer in no cross-partition order), so order is
            # checked per (publisher, room).
            by_origin: dict[tuple[str, str], list[str]] = {}
            for e in m.got:
                by_origin.setdefault((e.origin, e.room), []).append(e.id)
            for seq in by_origin.values():
                assert seq == sorted(seq), f"{m.member.id}: out of order"
            m.must.clear()
            m.got.clear()  # `may` stays: such a message can still be in flight
        self.portal.call(self._check_subscriptions)

    async def _check_subscriptions(self) -> None:
        """Guarantee 4 as the routers see it (linger is 0 in tests): each node's subscriptions
        are its rooms with members, once the unsubscribes in flight landed."""
        for node, router in enumerate(self.routers):
            rooms = {r for m in self.model if m.node == node and not m.closed for r in m.rooms}
            assert router.local_rooms == rooms, (router, router.local_rooms ^ rooms)

            def check(router: RoomRouter = router) -> None:
                assert router.subscribed_rooms == router.local_rooms, router

            await eventually(check, timeout=5)

    @invariant()
    def bypass_counts_add_up(self) -> None:
        for r in self.routers:
            s = r.stats()
            assert s["published"] == s["broker_publishes"] + s["bypassed_publishes"]

    # -- helpers --------------------------------------------------------------------------------

    def _describe(self, m: _ModelMember, ids: set[str]) -> str:
        """When each of ``ids`` was published and since when ``m`` is in its room: a stray
        copy of an older message still in flight to the node reads differently from a message
        of a room the member was never in."""
        out = []
        for i in sorted(ids):
            env = self.sent.get(i)
            if env is None:
                out.append(f"{i} (never published by the model)")
                continue
            out.append(
                f"{i} ({env.room!r} from {env.origin}, published at step {self.sent_step[i]}; "
                f"member in it since step {m.joined.get(env.room)}, now {self.step})"
            )
        return ", ".join(out)

    def _left(self, m: _ModelMember, rooms: set[str]) -> None:
        gone = rooms & m.rooms
        m.rooms -= gone
        # Messages of those rooms still in flight may or may not arrive now.
        pending = {i for i in m.must if self.sent[i].room in gone}
        m.must -= pending
        m.may |= pending

    async def _collect(self) -> None:
        with anyio.move_on_after(3):  # what is still missing then is reported by settle()
            for m in self.model:
                while not m.must <= {e.id for e in m.got}:
                    m.got.append(await m.member.receive())
        await anyio.sleep(0.05)  # let stray deliveries (the bugs we look for) arrive
        for m in self.model:
            while (e := m.member.receive_nowait()) is not None:
                m.got.append(e)


@pytest.fixture(scope="module")
def portal() -> Iterator[BlockingPortal]:
    with start_blocking_portal("asyncio") as p:
        yield p


# 0: every envelope is queued at once; 0.02: a batch outlives the operations of a step
# (SLOW_LINK is 0.03), so joins, leaves and closes land while envelopes wait for the flush.
# Batching is shared code above the broker (``_batching.py``): with a delay it runs on the
# in-process broker and on Redis (the broker callbacks' path); test_batching.py's concurrent
# order-and-exactness test runs it on every backend.
_BATCHED = ("memory", "redis")


@pytest.mark.parametrize(
    "backend_name, batch_delay",
    [(name, 0.0) for name in selected_backends()]
    + [(name, 0.02) for name in selected_backends() if name in _BATCHED],
    ids=lambda value: str(value),
)
@pytest.mark.timeout(int(os.environ.get("STATEFUL_TIMEOUT", "600")))
def test_router_state_machine(
    backend_name: str, batch_delay: float, portal: BlockingPortal
) -> None:
    BACKENDS[backend_name]("probe").available()
    machine = type(
        f"RouterMachine_{backend_name.replace('-', '_')}",
        (RouterMachine,),
        {"portal": portal, "backend_name": backend_name, "batch_delay": batch_delay},
    )
    machine.TestCase().runTest()
