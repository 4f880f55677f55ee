"""RoomRouterManager's room fan-out with delivery batching (issue 23): an emit is encoded once
and handed to each local client in one loop, without a task per client, so a room's delivery
batch is handed over in one step and each client's Engine.IO writer wakes once per batch.

Big rooms use Engine.IO clients without a network: real ``engineio.AsyncSocket`` objects
registered on real ``socketio.AsyncServer`` nodes (each client connected through the
manager as the server connects one), each drained by Engine.IO's own ``poll()``, which is what
the websocket and polling transports' writers call. Everything below the socket's queue (the
HTTP or WebSocket write) is the transport's and is left out; everything above it is real. The
small-room tests use real python-socketio clients over WebSocket (tests/test_socketio.py).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any

import anyio
import pytest
import socketio
from engineio import packet as eio_packet
from engineio.async_socket import AsyncSocket

from roomrouter.integrations.socketio import RoomRouterManager

from .backends import Backend
from .conftest import open_backend, selected_backends
from .helpers import eventually
from .test_socketio import Clients, broker_url, router_options, serve

pytestmark = pytest.mark.anyio

#: Memory (in process) and Redis (the broker between two node routers); the fan-out is above
#: the broker, so the other backends add nothing here.
BATCH_BACKENDS = [name for name in ("memory", "redis") if name in selected_backends()]

SETTLE = 0.3


def _check(condition: object) -> None:
    assert condition


class FakeClient:
    """One Engine.IO client on a real server, without a network: its socket is drained by
    a writer task that calls the socket's ``poll()``, as Engine.IO's transports do."""

    def __init__(self, server: socketio.AsyncServer, eio_sid: str) -> None:
        self.socket = AsyncSocket(server.eio, eio_sid)
        self.socket.last_ping = None  # no ping cycle here: never "gone"
        self.socket.connected = True
        server.eio.sockets[eio_sid] = self.socket
        self.eio_sid = eio_sid
        self.sid = ""
        #: Socket.IO events received, as [event, *args].
        self.events: list[list[Any]] = []
        #: How many times the writer woke up with packets.
        self.wakes = 0
        self.writer = asyncio.create_task(self._write())

    async def _write(self) -> None:
        while True:
            packets = await self.socket.poll()
            if not packets:
                return
            self.wakes += 1
            for pkt in packets:
                if pkt.packet_type == eio_packet.MESSAGE and pkt.data.startswith("2"):
                    self.events.append(json.loads(pkt.data[1:]))

    def received(self, event: str) -> list[Any]:
        return [e[1:] for e in self.events if e[0] == event]

    async def stop(self) -> None:
        self.socket.queue.put_nowait(None)  # poll() returns [] on it: the writer ends
        await self.writer


class Node:
    def __init__(self, manager: RoomRouterManager, server: socketio.AsyncServer) -> None:
        self.manager = manager
        self.server = server
        self.clients: list[FakeClient] = []

    async def add(self, count: int, *rooms: str) -> list[FakeClient]:
        added = []
        for _ in range(count):
            client = FakeClient(self.server, f"eio-{uuid.uuid4().hex[:12]}")
            client.sid = await self.manager.connect(client.eio_sid, "/")
            for room in rooms:
                await self.manager.enter_room(client.sid, "/", room)
            added.append(client)
        self.clients += added
        return added


@pytest.fixture(params=BATCH_BACKENDS)
async def batch_backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    async with open_backend(request.param) as instance:
        yield instance


@pytest.fixture
async def clients() -> AsyncIterator[Clients]:
    async with AsyncExitStack() as stack:
        yield Clients(stack)


async def make_nodes(
    stack: AsyncExitStack, backend: Backend, count: int, delay: float, **options: Any
) -> list[Node]:
    nodes = []
    for _ in range(count):
        manager = RoomRouterManager(
            broker_url(backend),
            **{**router_options(backend), "delivery_batch_delay": delay, **options},
        )
        server = socketio.AsyncServer(client_manager=manager, async_mode="asgi")
        stack.push_async_callback(server.shutdown)
        await manager.start()
        node = Node(manager, server)

        async def stop_writers(node: Node = node) -> None:
            for client in node.clients:
                await client.stop()

        stack.push_async_callback(stop_writers)
        nodes.append(node)
    return nodes


async def test_a_big_room_gets_every_emit_once_in_order_under_concurrent_emitters(
    batch_backend: Backend,
) -> None:
    """300 clients on each of two nodes, a 5 ms batch delay, four emitters (two per node)
    emitting 40 events each at once: every client gets all 160 once, each emitter's in order."""
    async with AsyncExitStack() as stack:
        nodes = await make_nodes(stack, batch_backend, 2, 0.005)
        for node in nodes:
            await node.add(300, "lecture")

        async def emitter(node: Node, name: str) -> None:
            for k in range(40):
                await node.server.emit("m", (name, k), to="lecture")
                if k % 7 == 0:
                    await asyncio.sleep(0.002)  # bursts and pauses: batches of varied size

        async with anyio.create_task_group() as tg:
            for i, node in enumerate(nodes):
                for j in range(2):
                    tg.start_soon(emitter, node, f"e{i}{j}")
        everyone = [client for node in nodes for client in node.clients]
        await eventually(lambda: _check(all(len(c.events) >= 160 for c in everyone)), 30)
        await anyio.sleep(SETTLE)
        for client in everyone:
            got = client.received("m")
            assert len(got) == 160
            for name in ("e00", "e01", "e10", "e11"):
                assert [k for who, k in got if who == name] == list(range(40))


async def test_a_batch_wakes_each_client_once(batch_backend: Backend) -> None:
    """Twenty emits of node a that arrive at node b in one delivery batch: each of b's 200
    clients gets them from one wake-up of its writer (a task per client and emit, as
    python-socketio's emit makes, would wake it twenty times)."""
    async with AsyncExitStack() as stack:
        a, b = await make_nodes(stack, batch_backend, 2, 0.05)
        listeners = await b.add(200, "lecture")
        await a.add(1, "lecture")
        for k in range(20):
            await a.server.emit("m", k, to="lecture")
        await eventually(lambda: _check(all(len(c.events) >= 20 for c in listeners)), 10)
        await anyio.sleep(SETTLE)
        assert all(c.received("m") == [[k] for k in range(20)] for c in listeners)
        # Twenty publishes of one node within a few ms land in one batch (of up to
        # delivery_batch_max, 256); a slow machine may split them over two.
        assert max(c.wakes for c in listeners) <= 2, Counter(c.wakes for c in listeners)


async def test_skip_sid_and_multi_room_emits_stay_exact(batch_backend: Backend) -> None:
    """Concurrent emits to [r1, r2] with skip_sid, from both nodes, at a 5 ms delay: a client
    in both rooms gets each once, a skipped client none, the others theirs in order."""
    async with AsyncExitStack() as stack:
        nodes = await make_nodes(stack, batch_backend, 2, 0.005)
        groups = []
        for node in nodes:
            groups.append(
                (
                    await node.add(20, "r1"),
                    await node.add(20, "r2"),
                    await node.add(20, "r1", "r2"),
                    await node.add(5),
                )
            )
        skipped = groups[1][2][0]  # in both rooms, on node 1: skipped by every emit

        async def emitter(node: Node, name: str) -> None:
            for k in range(30):
                await node.server.emit("m", [name, k], to=["r1", "r2"], skip_sid=skipped.sid)

        async with anyio.create_task_group() as tg:
            for i, node in enumerate(nodes):
                tg.start_soon(emitter, node, f"e{i}")
        in_rooms = [c for g in groups for c in (*g[0], *g[1], *g[2]) if c is not skipped]
        await eventually(lambda: _check(all(len(c.events) >= 60 for c in in_rooms)), 30)
        await anyio.sleep(SETTLE)
        for client in in_rooms:
            got = [args[0] for args in client.received("m")]
            assert len(got) == 60
            for name in ("e0", "e1"):
                assert [k for who, k in got if who == name] == list(range(30))
        assert skipped.events == []
        assert all(c.events == [] for g in groups for c in g[3])


class FailingServer(socketio.AsyncServer):  # type: ignore[misc]
    """A server whose client ``victim`` disconnects (its Engine.IO socket closes, the server
    forgets it) while its third packet is being sent, and that send fails."""

    victim = ""
    sent_to_victim = 0

    async def _send_eio_packet(self, eio_sid: str, eio_pkt: Any) -> None:
        if eio_sid == self.victim:
            self.sent_to_victim += 1
            if self.sent_to_victim == 3:
                await self.eio.sockets[eio_sid].close(wait=False, abort=True)
                raise ConnectionResetError("the client went away mid-batch")
        await super()._send_eio_packet(eio_sid, eio_pkt)


async def test_a_client_that_disconnects_mid_batch_does_not_stop_the_others(
    batch_backend: Backend,
) -> None:
    async with AsyncExitStack() as stack:
        (a,) = await make_nodes(stack, batch_backend, 1, 0.05)
        b_manager = RoomRouterManager(
            broker_url(batch_backend),
            **{**router_options(batch_backend), "delivery_batch_delay": 0.05},
        )
        b_server = FailingServer(client_manager=b_manager, async_mode="asgi")
        stack.push_async_callback(b_server.shutdown)
        await b_manager.start()
        b = Node(b_manager, b_server)
        clients = await b.add(50, "lecture")

        async def stop_writers() -> None:
            for client in clients:
                await client.stop()

        stack.push_async_callback(stop_writers)
        victim = clients[10]
        b_server.victim = victim.eio_sid
        await a.add(1, "lecture")
        for k in range(10):
            await a.server.emit("m", k, to="lecture")
        others = [c for c in clients if c is not victim]
        await eventually(lambda: _check(all(len(c.events) >= 10 for c in others)), 10)
        await anyio.sleep(SETTLE)
        assert all(c.received("m") == [[k] for k in range(10)] for c in others)
        assert victim.received("m") == [[0], [1]]
        assert not b_manager.is_connected(victim.sid, "/")
        assert b_manager.handler_errors == 0  # the failure stayed the victim's


async def test_real_clients_in_a_batched_room_get_every_emit_once_in_order(
    batch_backend: Backend, clients: Clients
) -> None:
    """python-socketio clients over WebSocket on two uvicorn nodes with a 5 ms batch delay;
    both nodes emit at once to the room, and each client's own ``say`` skips it."""
    url = broker_url(batch_backend)
    options = {**router_options(batch_backend), "delivery_batch_delay": 0.005}
    async with AsyncExitStack() as stack:
        nodes = [
            await stack.enter_async_context(serve(RoomRouterManager(url, **options)))
            for _ in range(2)
        ]
        members = [await clients.connect(nodes[i % 2]) for i in range(8)]
        for member in members:
            await member.join("lecture")

        async def emitter(i: int) -> None:
            for k in range(25):
                await nodes[i].sio.emit("news", [i, k], to="lecture")

        async with anyio.create_task_group() as tg:
            tg.start_soon(emitter, 0)
            tg.start_soon(emitter, 1)
            # A client's emit through the server skips that client.
            tg.start_soon(members[0].sio.call, "say", ("lecture", "hi"))
        for member in members:
            got = await member.wait_for("news", 50)
            for i in (0, 1):
                assert [k for who, k in got if who == i] == list(range(25))
        for member in members[1:]:
            assert await member.wait_for("said", 1) == ["hi"]
        assert members[0].received("said") == []
