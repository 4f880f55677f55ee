"""RoomRouterManager end to end: python-socketio ``AsyncServer``s on real uvicorn servers on
loopback ports, python-socketio ``AsyncClient``s over WebSocket, on the memory, Redis, RabbitMQ
and Kafka backends (``ROOMROUTER_BACKENDS`` selects among them).

Each node is its own server, manager and router (own broker connections); the servers run in
the test's event loop, so memory-backend nodes share one in-process hub.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest
import socketio
import uvicorn

from roomrouter import (
    ConfigurationError,
    InvalidRoomName,
    PayloadTooLarge,
    RoomRouter,
    RouterNotRunning,
)
from roomrouter.integrations.socketio import RoomRouterManager

from .backends import BACKENDS, Backend
from .conftest import TEST_ROUTER_OPTIONS, open_backend, selected_backends, unique_namespace
from .helpers import eventually

pytestmark = pytest.mark.anyio

#: The backends the manager is tested on (sharded Redis is Redis's data plane again).
SIO_BACKENDS = [
    name for name in ("memory", "redis", "rabbitmq", "kafka") if name in selected_backends()
]

#: How long "nothing more arrives" is watched for after the expected events came.
SETTLE = 0.3


@pytest.fixture(params=SIO_BACKENDS)
async def sio_backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    async with open_backend(request.param) as instance:
        yield instance


def broker_url(backend: Backend) -> str:
    if backend.url_for_process:
        return backend.process_url()
    return f"memory://sio-{backend.namespace}"  # one hub for the nodes of this test


def router_options(backend: Backend) -> dict[str, Any]:
    return {**TEST_ROUTER_OPTIONS, **backend.router_options, "namespace": backend.namespace}


@dataclass
class Node:
    sio: socketio.AsyncServer
    manager: RoomRouterManager
    url: str

    @property
    def router(self) -> RoomRouter:
        return self.manager.router

    def name(self, room: str | None) -> str:
        return self.manager.room_name("/", room)


def make_server(manager: RoomRouterManager) -> socketio.AsyncServer:
    """A Socket.IO server with the handlers the tests' clients call."""
    sio = socketio.AsyncServer(async_mode="asgi", client_manager=manager)

    @sio.on("join")
    async def join(sid: str, room: str) -> str:
        await sio.enter_room(sid, room)
        return "joined"

    @sio.on("leave")
    async def leave(sid: str, room: str) -> str:
        await sio.leave_room(sid, room)
        return "left"

    @sio.on("say")
    async def say(sid: str, room: str, data: Any) -> str:
        await sio.emit("said", data, to=room, skip_sid=sid)
        return "said"

    return sio


@asynccontextmanager
async def serve(manager: RoomRouterManager) -> AsyncIterator[Node]:
    """Serve a Socket.IO server on ``manager`` with uvicorn on a free loopback port. Its
    lifespan shutdown calls ``sio.shutdown()``, which closes the manager."""
    sio = make_server(manager)
    async with serve_asgi(socketio.ASGIApp(sio, on_shutdown=sio.shutdown)) as url:
        yield Node(sio, manager, url)


@asynccontextmanager
async def serve_asgi(app: Any) -> AsyncIterator[str]:
    """Serve ``app`` with uvicorn in this event loop on a free loopback port; yield its URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    config = uvicorn.Config(
        app, ws="websockets-sansio", lifespan="on", access_log=False, log_level="warning"
    )
    server = uvicorn.Server(config)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(server.serve, [sock])
            await eventually(lambda: _check(server.started), timeout=10)
            try:
                yield f"http://127.0.0.1:{sock.getsockname()[1]}"
            finally:
                server.should_exit = True
    finally:
        sock.close()


def _check(condition: object) -> None:
    assert condition


@dataclass
class Client:
    """A python-socketio client that records every event it receives."""

    sio: socketio.AsyncClient
    events: list[tuple[str, tuple[Any, ...]]] = field(default_factory=list)

    @property
    def sid(self) -> str:
        sid = self.sio.get_sid("/")
        assert sid is not None
        return str(sid)

    def received(self, event: str) -> list[Any]:
        """The payloads of ``event`` so far (one argument: the argument; several: a tuple)."""
        return [args[0] if len(args) == 1 else args for name, args in self.events if name == event]

    async def join(self, room: str) -> None:
        assert await self.sio.call("join", room, timeout=10) == "joined"

    async def wait_for(self, event: str, count: int, timeout: float = 10) -> list[Any]:
        """Wait for ``count`` payloads of ``event``, then check that no more come."""
        await eventually(lambda: _check(len(self.received(event)) >= count), timeout=timeout)
        await anyio.sleep(SETTLE)
        got = self.received(event)
        assert len(got) == count, got
        return got


class Clients:
    def __init__(self, stack: AsyncExitStack) -> None:
        self._stack = stack

    async def connect(self, node: Node | str) -> Client:
        client = Client(socketio.AsyncClient(reconnection=False))

        @client.sio.on("*")
        async def any_event(event: str, *args: Any) -> None:
            client.events.append((event, args))

        @client.sio.on("ask")
        async def ask(question: Any) -> Any:
            return {"answer": question, "by": client.sid}

        url = node if isinstance(node, str) else node.url
        await client.sio.connect(url, transports=["websocket"], wait_timeout=10)
        self._stack.push_async_callback(client.sio.disconnect)
        return client


@pytest.fixture
async def nodes(sio_backend: Backend) -> AsyncIterator[list[Node]]:
    """Two Socket.IO nodes on one broker and roomrouter namespace."""
    url = broker_url(sio_backend)
    async with AsyncExitStack() as stack:
        started = []
        for _ in range(2):
            manager = RoomRouterManager(url, **router_options(sio_backend))
            started.append(await stack.enter_async_context(serve(manager)))
        yield started


@pytest.fixture
async def clients() -> AsyncIterator[Clients]:
    async with AsyncExitStack() as stack:
        yield Clients(stack)


async def test_a_room_emit_reaches_its_clients_on_every_node_once(
    nodes: list[Node], clients: Clients
) -> None:
    a, b = nodes
    alice, bob, bea = await clients.connect(a), await clients.connect(b), await clients.connect(b)
    outsider = await clients.connect(b)
    for client in (alice, bob, bea):
        await client.join("lobby")
    await a.sio.emit("news", {"n": 1}, to="lobby")
    for client in (alice, bob, bea):
        assert await client.wait_for("news", 1) == [{"n": 1}]
    assert outsider.received("news") == []
    # One envelope crossed the broker, for node b; b served both its clients from it.
    assert a.router.stats()["broker_publishes"] == 1
    assert b.router.stats()["remote_deliveries"] >= 1


async def test_skip_sid_skips_the_sender_across_nodes(nodes: list[Node], clients: Clients) -> None:
    a, b = nodes
    alice, bob, bea = await clients.connect(a), await clients.connect(b), await clients.connect(b)
    for client in (alice, bob, bea):
        await client.join("lobby")
    # A client's message re-emitted by its server with skip_sid=sender (the chat pattern).
    assert await bob.sio.call("say", ("lobby", "hi from bob"), timeout=10) == "said"
    assert await alice.wait_for("said", 1) == ["hi from bob"]
    assert await bea.wait_for("said", 1) == ["hi from bob"]
    assert bob.received("said") == []
    # skip_sid of a client on another node than the emitter, and a list of them.
    await a.sio.emit("x", 1, to="lobby", skip_sid=bea.sid)
    await a.sio.emit("y", 2, to="lobby", skip_sid=[alice.sid, bob.sid])
    assert await alice.wait_for("x", 1) == [1] and await bob.wait_for("x", 1) == [1]
    assert await bea.wait_for("y", 1) == [2]
    assert bea.received("x") == [] and alice.received("y") == [] and bob.received("y") == []


async def test_emit_to_a_sid_the_namespace_and_a_list_of_rooms(
    nodes: list[Node], clients: Clients
) -> None:
    a, b = nodes
    alice, bob, bea = await clients.connect(a), await clients.connect(b), await clients.connect(b)
    await a.sio.emit("direct", "for bob", to=bob.sid)
    assert await bob.wait_for("direct", 1) == ["for bob"]
    assert alice.received("direct") == [] and bea.received("direct") == []

    await b.sio.emit("everyone", "all")  # no `to`: every client of the namespace
    for client in (alice, bob, bea):
        assert await client.wait_for("everyone", 1) == ["all"]

    # A client in several rooms of the list gets the event once, on either node.
    await bob.join("r1")
    await bob.join("r2")
    await bea.join("r2")
    await alice.join("r1")
    await alice.join("r2")
    await a.sio.emit("multi", "once", to=["r1", "r2"])
    await b.sio.emit("multi2", "once", to=["r2", "r1"])
    for client in (alice, bob, bea):
        assert await client.wait_for("multi", 1) == ["once"]
        assert await client.wait_for("multi2", 1) == ["once"]


async def test_enter_and_leave_room_of_a_client_on_another_node(
    nodes: list[Node], clients: Clients
) -> None:
    a, b = nodes
    bob = await clients.connect(b)
    await a.sio.enter_room(bob.sid, "stage")  # bob is on b: the request travels to b
    name = a.name("stage")
    # Wait for b's join to have *returned* (the room is in its local rooms): only then is every
    # later emit delivered (join => deliver). a lists b as a host as soon as it applies b's
    # announcement, while b's join still waits for a's acknowledgement; an emit made then can
    # reach b before its member is in the room and be dropped there (seen on Kafka, where the
    # acknowledgement takes two trips through the control partition under load).
    await eventually(lambda: _check(name in b.router.local_rooms))
    assert b.router.node_id in a.router.remote_hosts(name)
    assert a.sio.rooms(bob.sid) == []  # python-socketio semantics: rooms are local knowledge
    assert set(b.sio.rooms(bob.sid)) == {bob.sid, "stage"}
    await a.sio.emit("show", "on", to="stage")
    assert await bob.wait_for("show", 1) == ["on"]

    await a.sio.leave_room(bob.sid, "stage")
    await eventually(lambda: _check(name not in b.router.local_rooms))
    await a.sio.emit("show", "off", to="stage")
    await anyio.sleep(SETTLE)
    assert bob.received("show") == ["on"]


async def test_disconnect_and_close_room_of_clients_on_another_node(
    nodes: list[Node], clients: Clients
) -> None:
    a, b = nodes
    alice, bob, bea = await clients.connect(a), await clients.connect(b), await clients.connect(b)
    disconnected: list[str] = []

    @b.sio.on("disconnect")
    async def gone(sid: str, reason: str) -> None:
        disconnected.append(sid)

    for client in (alice, bob, bea):
        await client.join("room")
    await a.sio.close_room("room")
    name = a.name("room")
    await eventually(lambda: _check(name not in b.router.local_rooms))
    assert name not in a.router.local_rooms
    assert "room" not in a.sio.rooms(alice.sid) and "room" not in b.sio.rooms(bob.sid)
    await a.sio.emit("after", "closed", to="room")
    await b.sio.emit("after", "closed", to="room")
    await anyio.sleep(SETTLE)
    assert [c.received("after") for c in (alice, bob, bea)] == [[], [], []]

    bob_sid = bob.sid
    await a.sio.disconnect(bob_sid)  # bob is on b
    await eventually(lambda: _check(not bob.sio.connected))
    assert disconnected == [bob_sid]
    assert b.name(bob_sid) not in b.router.local_rooms
    assert bea.sio.connected and alice.sio.connected


async def test_acks_come_back_across_nodes(nodes: list[Node], clients: Clients) -> None:
    a, b = nodes
    bob = await clients.connect(b)
    alice = await clients.connect(a)
    # call() is emit(callback=...) and a wait: the ack returns through a's node room.
    assert await a.sio.call("ask", "remote?", to=bob.sid, timeout=10) == {
        "answer": "remote?",
        "by": bob.sid,
    }
    got: list[Any] = []
    await b.sio.emit("ask", [1, b"\x01"], to=alice.sid, callback=lambda *args: got.append(args))
    await eventually(lambda: _check(got))
    assert got == [({"answer": [1, b"\x01"], "by": alice.sid},)]
    # A local client's ack never involves the broker.
    publishes = a.router.stats()["broker_publishes"]
    assert await a.sio.call("ask", "local?", to=alice.sid, timeout=10) == {
        "answer": "local?",
        "by": alice.sid,
    }
    assert a.router.stats()["broker_publishes"] == publishes
    assert a.router.local_rooms >= {f"sio-node:{a.router.node_id}"}
    assert f"sio-node:{b.router.node_id}" in b.router.local_rooms


async def test_binary_payloads_cross_nodes_intact(nodes: list[Node], clients: Clients) -> None:
    a, b = nodes
    alice, bob = await clients.connect(a), await clients.connect(b)
    await alice.join("bin")
    await bob.join("bin")
    blob = bytes(range(256)) * 4
    payload = {"blob": blob, "nested": [b"", b"\x00\xff", {"deep": blob[:3]}], "text": "t"}
    await a.sio.emit("data", payload, to="bin")
    await a.sio.emit("args", (b"one", {"two": b"2"}, None), to="bin")
    assert await bob.wait_for("data", 1) == [payload]
    assert await bob.wait_for("args", 1) == [(b"one", {"two": b"2"}, None)]
    # From a client through its server's handler, to a client on the other node.
    assert await alice.sio.call("say", ("bin", {"img": blob}), timeout=10) == "said"
    assert await bob.wait_for("said", 1) == [{"img": blob}]


async def test_a_node_receives_no_envelope_of_rooms_it_has_no_client_in(
    sio_backend: Backend, clients: Clients
) -> None:
    """Three nodes, one room per node; every node emits to every room. Each node receives
    exactly the envelopes of its own room from the two others: nothing of the other rooms (a
    python-socketio pub/sub manager would hand each node all of them)."""
    url = broker_url(sio_backend)
    per_room = 10
    async with AsyncExitStack() as stack:
        cluster = [
            await stack.enter_async_context(
                serve(RoomRouterManager(url, **router_options(sio_backend)))
            )
            for _ in range(3)
        ]
        rooms = [f"room-{i}" for i in range(3)]
        members = []
        for node, room in zip(cluster, rooms, strict=True):
            client = await clients.connect(node)
            await client.join(room)
            members.append(client)
        for node, room in zip(cluster, rooms, strict=True):
            names = {node.name(room), node.name(None), node.name(members[rooms.index(room)].sid)}
            assert node.router.local_rooms == names
        await sio_backend.check_subscriptions([n.router for n in cluster])

        before = [n.router.stats() for n in cluster]
        for node in cluster:
            for room in rooms:
                for k in range(per_room):
                    await node.sio.emit("m", k, to=room)
        for client in members:
            got = await client.wait_for("m", 3 * per_room, timeout=20)
            assert sorted(got) == sorted(list(range(per_room)) * 3)
        for node, start in zip(cluster, before, strict=True):
            stats = node.router.stats()
            assert stats["broker_received"] - start["broker_received"] == 2 * per_room
            assert stats["dropped_not_hosted"] == start["dropped_not_hosted"]
            # Its own room's clients were served in process; no envelope went out twice.
            assert stats["broker_publishes"] - start["broker_publishes"] == 2 * per_room
            assert stats["bypassed_publishes"] - start["bypassed_publishes"] == per_room


async def test_a_room_on_one_node_never_reaches_the_broker(
    nodes: list[Node], clients: Clients
) -> None:
    a, b = nodes
    alice, anna = await clients.connect(a), await clients.connect(a)
    bob = await clients.connect(b)
    await alice.join("local")
    await anna.join("local")
    start = a.router.stats()
    received = b.router.stats()["broker_received"]
    await alice.sio.call("say", ("local", "hi"), timeout=10)
    await a.sio.emit("m", 1, to="local")
    assert await anna.wait_for("said", 1) == ["hi"] and await anna.wait_for("m", 1) == [1]
    stats = a.router.stats()
    assert stats["broker_publishes"] == start["broker_publishes"]
    assert stats["bypassed_publishes"] - start["bypassed_publishes"] == 2
    assert b.router.stats()["broker_received"] == received and bob.received("m") == []


async def test_leaving_the_last_client_unsubscribes_the_node(
    nodes: list[Node], clients: Clients, sio_backend: Backend
) -> None:
    a, b = nodes
    await a.manager.start()
    bob, bea = await clients.connect(b), await clients.connect(b)
    await bob.join("r")
    await bea.join("r")
    name = b.name("r")
    assert name in b.router.local_rooms
    assert await bob.sio.call("leave", "r", timeout=10) == "left"
    assert name in b.router.local_rooms  # bea is still there
    await bea.sio.disconnect()
    await eventually(lambda: _check(name not in b.router.local_rooms))
    await eventually(lambda: _check(name not in b.router.subscribed_rooms))
    await sio_backend.check_subscriptions([a.router, b.router])


async def test_lifecycle_owned_and_injected_routers(sio_backend: Backend, clients: Clients) -> None:
    url = broker_url(sio_backend)
    owned = RoomRouterManager(url, **router_options(sio_backend))
    async with serve(owned) as node:
        await owned.start()  # an explicit early start (a startup hook) is the same start
        assert node.router.member("probe") is not None
        await clients.connect(node)
    # The server's shutdown closed the manager and the router it built.
    with pytest.raises(RouterNotRunning):
        owned.router.member()
    with pytest.raises(RouterNotRunning):
        await owned.emit("m", 1, "/")

    options = router_options(sio_backend)
    async with RoomRouter.from_url(url, **options) as router:
        injected = RoomRouterManager(router=router)
        async with serve(injected) as node:
            client = await clients.connect(node)
            await client.join("r")
            assert injected.room_name("/", "r") in router.local_rooms
            await client.sio.disconnect()
        # The application's router outlives the server; the manager left its rooms.
        assert router.member("still-running") is not None
        assert not any(room.startswith("sio") for room in router.local_rooms)


async def test_bad_rooms_data_and_options_raise_roomrouter_errors(
    nodes: list[Node], clients: Clients
) -> None:
    a, _ = nodes
    alice = await clients.connect(a)
    await alice.join("r")
    with pytest.raises(PayloadTooLarge):
        await a.sio.emit("m", b"x" * (a.router.max_payload + 1), to="r")
    with pytest.raises(InvalidRoomName):
        await a.sio.emit("m", 1, to="r" * 2000)
    with pytest.raises(InvalidRoomName):
        await a.sio.emit("m", 1, to=[("not", "a", "room")])
    with pytest.raises(TypeError, match="cannot be sent"):
        await a.sio.emit("m", object(), to="r")
    with pytest.raises(ValueError, match="callback"):
        await a.sio.emit("m", 1, callback=print)
    with pytest.raises(ConfigurationError):
        RoomRouterManager()
    with pytest.raises(ConfigurationError):
        RoomRouterManager("memory://", router=a.router)
    with pytest.raises(ConfigurationError):
        RoomRouterManager(router=a.router, linger=1)
    with pytest.raises(ConfigurationError):
        RoomRouterManager("nosuch://x")
    await anyio.sleep(SETTLE)
    assert alice.events == []  # refused before anything was sent, here too
    # Names stay distinct across namespaces, None, ints, and odd characters.
    names = {
        RoomRouterManager.room_name(ns, room)
        for ns in ("/", "/chat")
        for room in (None, "a", 1, "1", "a\x07b", '"]')
    }
    assert len(names) == 12


async def test_undecodable_messages_are_dropped_and_counted(
    nodes: list[Node], clients: Clients
) -> None:
    a, b = nodes
    await a.manager.start()  # a has no client: started by hand, as from a startup hook
    bob = await clients.connect(b)
    await bob.join("r")
    name = a.name("r")
    await a.router.publish(name, b"\xc1 not msgpack")  # garbage in the room's channel
    await a.sio.emit("m", "still fine", to="r")
    assert await bob.wait_for("m", 1) == ["still fine"]
    assert b.manager.undecodable == 1


async def test_a_delivery_gap_is_counted_and_the_room_keeps_working(
    nodes: list[Node], clients: Clients
) -> None:
    """Emits are live-only: after the broker's data connection came back (the broker calls
    on_reconnect) the room's member raises DeliveryGap; the manager counts it, logs it and
    goes on reading the room."""
    a, b = nodes
    alice, bob = await clients.connect(a), await clients.connect(b)
    await alice.join("r")
    await bob.join("r")
    await a.sio.emit("m", "before", to="r")
    assert await bob.wait_for("m", 1) == ["before"]
    b.router._on_reconnect()  # what the broker calls once its data connection is restored
    await eventually(lambda: _check(b.manager.delivery_gaps >= 1))
    await a.sio.emit("m", "after", to="r")
    assert await bob.wait_for("m", 2) == ["before", "after"]


def load_example() -> Any:
    """examples/socketio/server.py as a module (examples are not a package)."""
    path = Path(__file__).parents[1] / "examples" / "socketio" / "server.py"
    spec = importlib.util.spec_from_file_location("roomrouter_socketio_example", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_the_example_chat_on_two_nodes(sio_backend: Backend, clients: Clients) -> None:
    """examples/socketio/server.py as two nodes on one broker: python-socketio clients on
    different nodes chat in one room; a client in another room hears nothing."""
    example = load_example()
    options = router_options(sio_backend)
    namespace = options.pop("namespace")
    url = broker_url(sio_backend)
    async with AsyncExitStack() as stack:
        urls = []
        for _ in range(2):
            app, _sio = example.create_app(url, namespace, **options)
            urls.append(await stack.enter_async_context(serve_asgi(app)))
        status, body = await http_get(urls[0] + "/")
        assert status == 200 and "/static/socket.io.min.js" in body
        status, script = await http_get(urls[1] + "/static/socket.io.min.js")
        assert status == 200 and "Socket.IO v4.8" in script

        alice, bob, carol = [await clients.connect(u) for u in (urls[0], urls[1], urls[0])]
        replies = {}
        for client, room, name in ((alice, "x", "alice"), (bob, "x", "bob"), (carol, "y", "c")):
            replies[name] = await client.sio.call("join", {"room": room, "name": name}, timeout=10)
            assert replies[name]["room"] == room
        assert replies["alice"]["node"] != replies["bob"]["node"]
        assert await alice.wait_for("system", 1) == [f"bob joined (node {replies['bob']['node']})"]
        assert (await alice.sio.call("say", "hi bob", timeout=10)) == {"ok": True}
        assert (await bob.sio.call("say", "hi alice", timeout=10)) == {"ok": True}
        for client in (alice, bob):
            got = await client.wait_for("message", 2)
            assert sorted((m["name"], m["text"], m["node"]) for m in got) == [
                ("alice", "hi bob", replies["alice"]["node"]),
                ("bob", "hi alice", replies["bob"]["node"]),
            ]
        assert carol.received("message") == [] and carol.received("system") == []


async def http_get(url: str) -> tuple[int, str]:
    def fetch() -> tuple[int, str]:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()

    return await anyio.to_thread.run_sync(fetch)


def test_importing_roomrouter_does_not_import_socketio() -> None:
    code = "import sys, roomrouter; assert 'socketio' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_the_missing_extra_names_it() -> None:
    code = (
        "import sys; sys.modules['socketio'] = None\n"
        "from roomrouter import MissingDependency\n"
        "try:\n    import roomrouter.integrations.socketio\n"
        "except MissingDependency as exc:\n    print(exc)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], check=True, timeout=60, capture_output=True, text=True
    )
    assert 'pip install "roomrouter[socketio]"' in result.stdout


async def test_a_room_member_closed_by_overflow_is_replaced(clients: Clients) -> None:
    """With the router option overflow="disconnect", a burst that fills a room's inbox closes
    the node's member of it; the room still has clients there, so the node joins it again."""
    url = f"memory://sio-{unique_namespace()}"
    options = {**TEST_ROUTER_OPTIONS, "inbox_size": 2, "overflow": "disconnect"}
    async with (
        serve(RoomRouterManager(url, namespace="t", **options)) as a,
        serve(RoomRouterManager(url, namespace="t", **options)) as b,
    ):
        await a.manager.start()
        bob = await clients.connect(b)
        await bob.join("r")
        for k in range(50):  # the memory hub delivers in the publisher's call: no reader runs
            await a.sio.emit("burst", k, to="r")
        assert b.router.stats()["members_disconnected"] == 1
        await eventually(lambda: _check(b.router.node_id in a.router.remote_hosts(b.name("r"))))
        await eventually(lambda: _check(b.manager._links[b.name("r")].member.closed is False))
        await a.sio.emit("after", "heard again", to="r")
        assert await bob.wait_for("after", 1) == ["heard again"]
        assert len(bob.received("burst")) <= 2


CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def require_chromium() -> None:
    """Skip (locally) or fail (CI) without Debian's chromium and Playwright for Python."""
    missing = []
    if not os.path.exists(CHROMIUM):
        missing.append(f"{CHROMIUM} (apt-get install chromium)")
    if importlib.util.find_spec("playwright") is None:
        missing.append("playwright (pip install playwright)")
    if not missing:
        return
    message = "the browser test needs " + " and ".join(missing)
    if os.environ.get("CI"):
        pytest.fail(message + "; CI requires it", pytrace=False)
    pytest.skip(message)


@pytest.mark.slow
async def test_the_example_page_chats_across_nodes_in_chromium(
    tmp_path: Path, clients: Clients
) -> None:
    """The example's page and its vendored Socket.IO client in headless Chromium: two pages on
    two nodes (Redis) chat in one room; a page in another room sees none of it."""
    require_chromium()
    backend = BACKENDS["redis"](unique_namespace())
    backend.available()
    from playwright.async_api import async_playwright

    example = load_example()
    options = router_options(backend)
    namespace = options.pop("namespace")
    try:
        async with AsyncExitStack() as stack:
            urls = []
            for _ in range(2):
                app, _sio = example.create_app(backend.process_url(), namespace, **options)
                urls.append(await stack.enter_async_context(serve_asgi(app)))
            playwright = await stack.enter_async_context(async_playwright())
            browser = await playwright.chromium.launch_persistent_context(
                str(tmp_path / "profile"),
                executable_path=CHROMIUM,
                args=CHROMIUM_ARGS,
                headless=True,
            )
            stack.push_async_callback(browser.close)

            async def open_page(url: str, name: str, room: str) -> Any:
                page = await browser.new_page()
                await page.goto(url + "/")
                await page.wait_for_function(
                    "document.getElementById('status').textContent.startsWith('connected')"
                )
                await page.fill("#name", name)
                await page.fill("#room", room)
                await page.click("#join button")
                await page.wait_for_selector(f"body[data-joined='{room}']", state="attached")
                return page

            alice = await open_page(urls[0], "alice", "lecture")
            bob = await open_page(urls[1], "bob", "lecture")
            carol = await open_page(urls[0], "carol", "elsewhere")
            status_a = await alice.inner_text("#status")
            status_b = await bob.inner_text("#status")
            assert status_a.split()[-1] != status_b.split()[-1]  # two different nodes

            async def say(page: Any, text: str) -> None:
                await page.fill("#text", text)
                await page.press("#text", "Enter")

            async def messages(page: Any, count: int) -> list[str]:
                await page.wait_for_function(
                    f"document.querySelectorAll('#log .message').length >= {count}",
                    timeout=10_000,
                )
                await anyio.sleep(SETTLE)
                lines: list[str] = await page.locator("#log .message").all_inner_texts()
                assert len(lines) == count, lines
                return lines

            await say(alice, "hello from node a")
            await messages(bob, 1)
            await say(bob, "hello from node b")
            for page in (alice, bob):
                lines = await messages(page, 2)
                assert lines[0].startswith("alice: hello from node a")
                assert lines[1].startswith("bob: hello from node b")
            assert await carol.locator("#log .message").count() == 0
            assert "bob joined" in await alice.inner_text("#log")
    finally:
        await backend.cleanup()


async def test_a_failed_start_is_retried_by_the_next_connection(clients: Clients) -> None:
    """The broker is down when the first client comes: that client is refused; once the broker
    is back, the next client's connection starts a new router and is served."""
    redis = BACKENDS["redis"](unique_namespace())
    redis.available()
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there until the forwarder below starts
    options = {**router_options(redis), "namespace": redis.namespace}
    manager = RoomRouterManager(f"redis://127.0.0.1:{port}/0", **options)
    first_router = manager.router

    async def forward(client: anyio.abc.SocketStream) -> None:
        async with client, await anyio.connect_tcp("127.0.0.1", 6379) as upstream:

            async def pipe(source: anyio.abc.SocketStream, sink: anyio.abc.SocketStream) -> None:
                try:
                    async for chunk in source:
                        await sink.send(chunk)
                except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                    pass
                finally:
                    await sink.send_eof()

            async with anyio.create_task_group() as tg:
                tg.start_soon(pipe, client, upstream)
                tg.start_soon(pipe, upstream, client)

    try:
        async with serve(manager) as node:
            with pytest.raises(socketio.exceptions.ConnectionError):
                await clients.connect(node)
            assert manager.router is not first_router  # renewed, not started yet
            async with (
                await anyio.create_tcp_listener(
                    local_host="127.0.0.1", local_port=port
                ) as listener,
                anyio.create_task_group() as tg,
            ):
                tg.start_soon(listener.serve, forward)
                bob = await clients.connect(node)
                await bob.join("r")
                await node.sio.emit("m", "back", to="r")
                assert await bob.wait_for("m", 1) == ["back"]
                await bob.sio.disconnect()
                await manager.aclose()  # its connections through the forwarder end first
                tg.cancel_scope.cancel()
    finally:
        await redis.cleanup()


@pytest.mark.parametrize("backend_name", ["memory", "redis"])
async def test_cluster_participants_through_presence(backend_name: str, clients: Clients) -> None:
    """python-socketio's get_participants is node-local; the manager's cluster_participants
    lists a room's clients on every node, from presence, and follows leaves and
    disconnects."""
    backend = BACKENDS[backend_name](unique_namespace())
    backend.available()
    try:
        async with AsyncExitStack() as stack:
            a, b = [
                await stack.enter_async_context(
                    serve(
                        RoomRouterManager(
                            broker_url(backend), presence=True, **router_options(backend)
                        )
                    )
                )
                for _ in range(2)
            ]
            alice, bob, bea = (await clients.connect(a), await clients.connect(b),
                               await clients.connect(b))  # fmt: skip
            for client in (alice, bob, bea):
                await client.join("lecture")
            await clients.connect(a)  # in no room: not a participant

            async def participants(node: Node, want: set[tuple[str, str]]) -> None:
                assert set(await node.manager.cluster_participants("/", "lecture")) == want

            everyone = {
                (alice.sid, a.router.node_id),
                (bob.sid, b.router.node_id),
                (bea.sid, b.router.node_id),
            }
            await eventually(lambda: participants(a, everyone))
            await eventually(lambda: participants(b, everyone))
            assert sorted(sid for sid, _ in a.sio.manager.get_participants("/", "lecture")) == [
                alice.sid
            ]  # still node-local, as in python-socketio
            assert await bob.sio.call("leave", "lecture", timeout=10) == "left"
            bea_sid = bea.sid
            await bea.sio.disconnect()
            await eventually(lambda: participants(a, {(alice.sid, a.router.node_id)}))
            assert (bea_sid, b.router.node_id) not in set(
                await b.manager.cluster_participants("/", "lecture")
            )
    finally:
        await backend.cleanup()
