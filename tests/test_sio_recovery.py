"""Connection state recovery (roomrouter.integrations.socketio.AsyncServer) pinned on the wire:
engine.io v4 frames over a raw WebSocket, no Socket.IO client library, across two nodes on
Redis (each its own uvicorn server, manager and router). What socket.io 4.6+ clients rely on:
``40{"sid","pid"}``, the offset as the last argument of room emits without ack, and a
``40{"pid","offset"}`` reconnect answered with the same sid and exactly the missed events.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis
import socketio
import websockets
from websockets.asyncio.client import ClientConnection

from roomrouter import ConfigurationError
from roomrouter.integrations.socketio import AsyncServer, RoomRouterManager

from .backends import BACKENDS, Backend
from .conftest import TEST_ROUTER_OPTIONS, unique_namespace
from .helpers import eventually
from .test_socketio import serve_asgi

pytestmark = pytest.mark.anyio

#: How long "nothing more arrives" is watched for.
SETTLE = 0.3


def make_server(
    manager: RoomRouterManager,
    window: float,
    connects: list[tuple[str, bool]],
    skip_middlewares: bool = True,
) -> AsyncServer:
    sio = AsyncServer(
        async_mode="asgi",
        client_manager=manager,
        connection_state_recovery={
            "max_disconnection_duration": window,
            "skip_middlewares": skip_middlewares,
        },
    )

    @sio.event
    async def connect(sid: str, environ: Any, auth: Any) -> None:
        connects.append((sid, sio.recovered(sid)))
        name = auth.get("name") if isinstance(auth, dict) else None
        if name:
            await sio.save_session(sid, {"name": name})

    @sio.on("join")
    async def join(sid: str, room: str) -> str:
        await sio.enter_room(sid, room)
        return "joined"

    @sio.on("whoami")
    async def whoami(sid: str) -> Any:
        return {
            "session": await sio.get_session(sid),
            "rooms": sorted(r for r in sio.rooms(sid) if r != sid),
            "recovered": sio.recovered(sid),
        }

    return sio


@dataclass
class Node:
    sio: AsyncServer
    manager: RoomRouterManager
    url: str
    connects: list[tuple[str, bool]]


class Raw:
    """A Socket.IO client in engine.io v4 frames: answers pings, records every packet."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.packets: list[str] = []
        self.connected: dict[str, Any] | None = None
        self._acks = 0

    @property
    def events(self) -> list[list[Any]]:
        return [json.loads(p[1:]) for p in self.packets if p.startswith("2[")]

    async def read(self) -> None:
        try:
            async for message in self.ws:
                assert isinstance(message, str)
                if message == "2":
                    await self.ws.send("3")
                elif message.startswith("40"):
                    self.connected = json.loads(message[2:])
                elif message.startswith("4"):
                    self.packets.append(message[1:])  # the Socket.IO packet
        except websockets.ConnectionClosed:
            pass

    async def call(self, *args: Any) -> Any:
        self._acks += 1
        ack = self._acks
        await self.ws.send(f"42{ack}" + json.dumps(list(args)))
        prefix = f"3{ack}["
        await eventually(lambda: _check(any(p.startswith(prefix) for p in self.packets)), 10)
        (answer,) = [p for p in self.packets if p.startswith(prefix)]
        return json.loads(answer[len(prefix) - 1 :])[0]

    async def wait_events(self, count: int) -> list[list[Any]]:
        """Wait for ``count`` events, then check that no more come."""
        await eventually(lambda: _check(len(self.events) >= count), timeout=10)
        await anyio.sleep(SETTLE)
        assert len(self.events) == count, self.events
        return self.events


def _check(condition: object) -> None:
    assert condition


class Raws:
    def __init__(self, stack: AsyncExitStack, tg: Any) -> None:
        self._stack, self._tg = stack, tg

    async def open(self, url: str, auth: dict[str, Any] | None = None) -> Raw:
        ws_url = url.replace("http://", "ws://") + "/socket.io/?EIO=4&transport=websocket"
        ws = await websockets.connect(ws_url)
        self._stack.push_async_callback(ws.close)
        opening = await ws.recv()
        assert isinstance(opening, str) and opening.startswith("0")
        assert json.loads(opening[1:])["sid"]
        raw = Raw(ws)
        self._tg.start_soon(raw.read)
        await ws.send("40" + (json.dumps(auth) if auth is not None else ""))
        await eventually(lambda: _check(raw.connected is not None), timeout=10)
        return raw


@pytest.fixture
async def redis() -> AsyncIterator[Backend]:
    instance = BACKENDS["redis"](unique_namespace())
    instance.available()
    try:
        yield instance
    finally:
        await instance.cleanup()


@asynccontextmanager
async def node(
    backend: Backend,
    window: float = 10.0,
    skip_middlewares: bool = True,
    static_files: dict[str, Any] | None = None,
    delay: float = 0.0,
) -> AsyncIterator[Node]:
    manager = RoomRouterManager(
        backend.process_url(),
        namespace=backend.namespace,
        delivery_batch_delay=delay,
        **TEST_ROUTER_OPTIONS,
    )
    connects: list[tuple[str, bool]] = []
    sio = make_server(manager, window, connects, skip_middlewares)
    await manager.start()
    app = socketio.ASGIApp(sio, static_files=static_files, on_shutdown=sio.shutdown)
    async with serve_asgi(app) as url:
        yield Node(sio, manager, url, connects)


@asynccontextmanager
async def cluster(backend: Backend, **options: Any) -> AsyncIterator[tuple[list[Node], Raws]]:
    async with AsyncExitStack() as stack:
        nodes = [await stack.enter_async_context(node(backend, **options)) for _ in range(2)]
        tg = await stack.enter_async_context(anyio.create_task_group())
        stack.callback(tg.cancel_scope.cancel)
        raws = Raws(stack, tg)
        yield nodes, raws


async def drop(raw: Raw, on: Node) -> None:
    """Close the client's transport (no Socket.IO disconnect), as a network loss does, and
    wait until its node noticed."""
    sid = raw.connected["sid"] if raw.connected else None
    await raw.ws.close()
    await eventually(lambda: _check(not on.manager.is_connected(sid, "/")), timeout=10)


async def emit_each(node: Node, values: list[Any], room: str = "r") -> None:
    for value in values:
        await node.sio.emit("said", value, to=room)


async def test_a_client_recovers_on_the_other_node_with_exactly_what_it_missed(
    redis: Backend,
) -> None:
    async with cluster(redis) as (nodes, raws):
        a, b = nodes
        raw = await raws.open(a.url, {"name": "ada"})
        assert raw.connected is not None
        sid, pid = raw.connected["sid"], raw.connected["pid"]
        assert isinstance(pid, str) and pid and pid != sid
        assert await raw.call("join", "r") == "joined"
        # Room emits from both nodes carry an offset as their last argument.
        await emit_each(b, [0, 1])
        await emit_each(a, [2])
        events = await raw.wait_events(3)
        assert [e[:2] for e in events] == [["said", 0], ["said", 1], ["said", 2]]
        offsets = [e[2] for e in events]
        assert offsets == sorted(offsets) and len(set(offsets)) == 3
        # An ack answer carries no offset.
        assert (await raw.call("whoami"))["session"] == {"name": "ada"}

        await drop(raw, a)
        await emit_each(b, [3, 4, 5])  # emitted meanwhile, from both nodes
        await emit_each(a, [6])
        again = await raws.open(b.url, {"pid": pid, "offset": offsets[-1]})
        assert again.connected == {"sid": sid, "pid": pid}
        missed = await again.wait_events(4)
        assert [e[:2] for e in missed] == [["said", 3], ["said", 4], ["said", 5], ["said", 6]]
        assert [e[2] for e in missed] == sorted(e[2] for e in missed)
        assert missed[0][2] > offsets[-1]
        # Then live, and its rooms and data are back; the connect handler was skipped.
        await emit_each(a, [7])
        assert [e[:2] for e in await again.wait_events(5)][-1] == ["said", 7]
        me = await again.call("whoami")
        assert me == {"session": {"name": "ada"}, "rooms": ["r"], "recovered": True}
        assert b.connects == []
        assert b.manager.get_participants("/", "r") and b.sio.recovered(sid)


async def test_an_emit_to_a_sid_is_recovered_and_persisted_like_a_room_emit(
    redis: Backend,
) -> None:
    # socket.io does the same: with recovery on, socket.emit() is a broadcast to the sid room
    # and its session's rooms include the sid. Persisted means in the storage queue too, so
    # with a sink and a worker it is stored (history of the sid's room).
    async with cluster(redis) as (nodes, raws):
        a, b = nodes
        raw = await raws.open(a.url)
        assert raw.connected is not None
        sid, pid = raw.connected["sid"], raw.connected["pid"]
        await a.sio.emit("private", "hello", to=sid)  # from its node
        (first,) = await raw.wait_events(1)
        assert first[:2] == ["private", "hello"]

        await drop(raw, a)
        await b.sio.emit("private", "while away", to=sid)  # from the other node
        again = await raws.open(b.url, {"pid": pid, "offset": first[2]})
        assert again.connected == {"sid": sid, "pid": pid}
        (missed,) = await again.wait_events(1)
        assert missed[:2] == ["private", "while away"] and missed[2] > first[2]
        stored = await b.sio.history(sid)
        assert [(e.id, e.event, e.args) for e in stored] == [
            (first[2], "private", ["hello"]),
            (missed[2], "private", ["while away"]),
        ]
        # Both went into the namespace's storage queue, which a worker empties into the sink.
        client = aioredis.Redis.from_url(redis.process_url())
        try:
            assert await client.xlen(f"rr:{{{redis.namespace}}}:store") == 2
        finally:
            await client.aclose()


@pytest.mark.parametrize("delay", [0.0, 0.01])
async def test_recovery_while_events_are_emitted_loses_and_repeats_nothing(
    redis: Backend, delay: float
) -> None:
    """Events emitted from both nodes while the reconnect is being recovered: each arrives
    once, the missed ones first, each node's in order (held back until the missed ones were
    sent, then merged by offset). With a batch delay too, and live clients of the room on
    both nodes served from the same batches: theirs all arrive once, each node's in order."""
    async with cluster(redis, delay=delay) as (nodes, raws):
        a, b = nodes
        raw = await raws.open(a.url)
        assert raw.connected is not None
        pid = raw.connected["pid"]
        await raw.call("join", "r")
        live = [await raws.open(n.url) for n in (a, b, a, b)]
        for other in live:
            await other.call("join", "r")
        await emit_each(a, [-1])
        (first,) = await raw.wait_events(1)
        await drop(raw, a)
        await emit_each(b, list(range(20)))

        async def reconnect() -> Raw:
            return await raws.open(b.url, {"pid": pid, "offset": first[2]})

        async with anyio.create_task_group() as tg:
            tg.start_soon(emit_each, a, list(range(20, 60)))
            tg.start_soon(emit_each, b, list(range(60, 100)))
            result: list[Raw] = []

            async def go() -> None:
                result.append(await reconnect())

            tg.start_soon(go)
        again = result[0]
        events = await again.wait_events(100)
        assert sorted(e[1] for e in events) == list(range(100))
        # The missed ones came first, in offset order; then each node's in its emit order
        # (live, two nodes' emits interleave as they arrive).
        missed = [e for e in events if e[1] < 20]
        assert [e[1] for e in missed] == list(range(20)) and events[:20] == missed
        for low, high in ((20, 60), (60, 100)):
            assert [e[1] for e in events if low <= e[1] < high] == list(range(low, high))
        for other in live:
            got = await other.wait_events(101)
            assert [e[1] for e in got if e[1] < 20] == list(range(-1, 20))
            for low, high in ((20, 60), (60, 100)):
                assert [e[1] for e in got if low <= e[1] < high] == list(range(low, high))
            assert len({e[2] for e in got}) == 101  # each with its own offset


async def test_a_storm_of_reconnects_all_recover(redis: Backend) -> None:
    """150 clients reconnect to the other node at once (more than redis-py's default pool
    allows at once: the session store queues its reads instead of failing them)."""
    async with cluster(redis) as (nodes, raws):
        a, b = nodes
        everyone = [await raws.open(a.url) for _ in range(150)]
        await asyncio.gather(*(r.call("join", f"r{i % 5}") for i, r in enumerate(everyone)))
        for i in range(5):
            await emit_each(b, ["before"], f"r{i}")
        offsets = [e[0][2] for e in await asyncio.gather(*(r.wait_events(1) for r in everyone))]
        known = [(r.connected["sid"], r.connected["pid"]) for r in everyone if r.connected]
        await asyncio.gather(*(r.ws.close() for r in everyone))
        await eventually(lambda: _check(not any(a.manager.is_connected(s, "/") for s, _ in known)))
        for i in range(5):
            await emit_each(b, [1, 2, 3], f"r{i}")
        again = await asyncio.gather(
            *(
                raws.open(b.url, {"pid": pid, "offset": offset})
                for (_, pid), offset in zip(known, offsets, strict=True)
            )
        )
        assert [r.connected["sid"] if r.connected else None for r in again] == [
            sid for sid, _ in known
        ]
        for events in await asyncio.gather(*(r.wait_events(3) for r in again)):
            assert [e[1] for e in events] == [1, 2, 3]


async def test_a_zero_event_reconnect_recovers_from_its_connection(redis: Backend) -> None:
    """No event received before the drop: socket.io-client sends a pid and no offset."""
    async with cluster(redis) as (nodes, raws):
        a, b = nodes
        raw = await raws.open(a.url)
        assert raw.connected is not None
        sid, pid = raw.connected["sid"], raw.connected["pid"]
        await raw.call("join", "r")
        await drop(raw, a)
        await emit_each(b, ["x", "y"])
        again = await raws.open(b.url, {"pid": pid})
        assert again.connected == {"sid": sid, "pid": pid}
        assert [e[:2] for e in await again.wait_events(2)] == [["said", "x"], ["said", "y"]]


async def test_repeated_recoveries_advance_the_offset(redis: Backend) -> None:
    async with cluster(redis) as (nodes, raws):
        raw = await raws.open(nodes[0].url)
        assert raw.connected is not None
        sid, pid = raw.connected["sid"], raw.connected["pid"]
        await raw.call("join", "r")
        await emit_each(nodes[1], ["start"])
        offset = (await raw.wait_events(1))[0][2]
        on = nodes[0]
        for round_ in range(4):
            await drop(raw, on)
            sent = [f"{round_}-{i}" for i in range(round_ + 1)]
            await emit_each(nodes[round_ % 2], sent)
            on = nodes[(round_ + 1) % 2]
            raw = await raws.open(on.url, {"pid": pid, "offset": offset})
            assert raw.connected == {"sid": sid, "pid": pid}
            events = await raw.wait_events(len(sent))
            assert [e[1] for e in events] == sent
            assert events[0][2] > offset
            offset = events[-1][2]


async def test_unknown_and_expired_pids_are_new_sessions(redis: Backend) -> None:
    async with cluster(redis, window=1.0) as (nodes, raws):
        a, b = nodes
        unknown = await raws.open(a.url, {"pid": "no-such-pid", "offset": "x"})
        assert unknown.connected is not None
        assert unknown.connected["pid"] != "no-such-pid"
        assert a.connects == [(unknown.connected["sid"], False)]

        raw = await raws.open(a.url)
        assert raw.connected is not None
        sid, pid = raw.connected["sid"], raw.connected["pid"]
        await raw.call("join", "r")
        await emit_each(a, [1])
        offset = (await raw.wait_events(1))[0][2]
        await drop(raw, a)
        await emit_each(b, [2])
        await anyio.sleep(1.5)  # past max_disconnection_duration
        late = await raws.open(b.url, {"pid": pid, "offset": offset})
        assert late.connected is not None
        assert late.connected["sid"] != sid and late.connected["pid"] != pid
        assert (await late.call("whoami"))["rooms"] == []
        await anyio.sleep(SETTLE)
        assert late.events == []
        assert b.connects[-1] == (late.connected["sid"], False)


async def test_a_forged_offset_is_a_new_session(redis: Backend) -> None:
    """A known pid with an offset that is no emit offset: nothing provable to replay (ids
    compare as strings, "zzz" is after all of them), so the client starts afresh."""
    async with cluster(redis) as (nodes, raws):
        a, b = nodes
        raw = await raws.open(a.url)
        assert raw.connected is not None
        sid, pid = raw.connected["sid"], raw.connected["pid"]
        await raw.call("join", "r")
        await drop(raw, a)
        await emit_each(a, [1])
        forged = await raws.open(b.url, {"pid": pid, "offset": "zzz"})
        assert forged.connected is not None
        assert forged.connected["sid"] != sid
        assert b.connects[-1] == (forged.connected["sid"], False)


async def test_a_session_is_taken_once(redis: Backend) -> None:
    """Two reconnects with the same pid (a client that retried): one recovers, one is new."""
    async with cluster(redis) as (nodes, raws):
        raw = await raws.open(nodes[0].url)
        assert raw.connected is not None
        sid, pid = raw.connected["sid"], raw.connected["pid"]
        await drop(raw, nodes[0])
        both: list[Raw] = []

        async def go(n: Node) -> None:
            both.append(await raws.open(n.url, {"pid": pid}))

        async with anyio.create_task_group() as tg:
            for n in nodes:
                tg.start_soon(go, n)
        sids = sorted(r.connected["sid"] == sid for r in both if r.connected)
        assert sids == [False, True]


async def test_the_connect_handler_tells_a_recovered_connection(redis: Backend) -> None:
    """skip_middlewares=False: the handler runs, sees recovered() and the restored session."""
    async with cluster(redis, skip_middlewares=False) as (nodes, raws):
        a, b = nodes
        raw = await raws.open(a.url, {"name": "bo"})
        assert raw.connected is not None
        sid, pid = raw.connected["sid"], raw.connected["pid"]
        await drop(raw, a)
        again = await raws.open(b.url, {"pid": pid})
        assert again.connected == {"sid": sid, "pid": pid}
        assert a.connects == [(sid, False)] and b.connects == [(sid, True)]
        assert (await again.call("whoami"))["session"] == {"name": "bo"}


async def test_a_disconnect_the_server_asked_for_is_final(redis: Backend) -> None:
    async with cluster(redis) as (nodes, raws):
        raw = await raws.open(nodes[0].url)
        assert raw.connected is not None
        sid, pid = raw.connected["sid"], raw.connected["pid"]
        await nodes[0].sio.disconnect(sid)
        await eventually(lambda: _check(not nodes[0].manager.is_connected(sid, "/")))
        again = await raws.open(nodes[1].url, {"pid": pid})
        assert again.connected is not None and again.connected["sid"] != sid


async def test_clients_of_a_node_shut_down_recover_on_another(redis: Backend) -> None:
    """A rolling restart: the server's shutdown keeps its clients' sessions."""
    async with AsyncExitStack() as stack:
        b = await stack.enter_async_context(node(redis))
        tg = await stack.enter_async_context(anyio.create_task_group())
        stack.callback(tg.cancel_scope.cancel)
        raws = Raws(stack, tg)
        async with node(redis) as a:
            raw = await raws.open(a.url)
            assert raw.connected is not None
            sid, pid = raw.connected["sid"], raw.connected["pid"]
            await raw.call("join", "r")
            await emit_each(b, ["before"])
            offset = (await raw.wait_events(1))[0][2]
            await a.sio.shutdown()  # python-socketio's, with the client still connected
        await emit_each(b, ["after"])
        again = await raws.open(b.url, {"pid": pid, "offset": offset})
        assert again.connected == {"sid": sid, "pid": pid}
        assert [e[1] for e in await again.wait_events(1)] == ["after"]


async def test_a_recovery_30_seconds_after_connecting(redis: Backend) -> None:
    """Sessions are rewritten while connected (a window of 3 s: ten of them pass)."""
    async with cluster(redis, window=3.0) as (nodes, raws):
        raw = await raws.open(nodes[0].url)
        assert raw.connected is not None
        sid, pid = raw.connected["sid"], raw.connected["pid"]
        await raw.call("join", "r")
        await anyio.sleep(30)
        await drop(raw, nodes[0])
        await emit_each(nodes[1], ["late"])
        again = await raws.open(nodes[1].url, {"pid": pid})
        assert again.connected == {"sid": sid, "pid": pid}
        assert [e[1] for e in await again.wait_events(1)] == ["late"]


async def test_a_client_of_a_sigkilled_node_recovers_on_the_survivor(redis: Backend) -> None:
    """Its session was never saved at a disconnect: the dead node kept rewriting it."""
    async with AsyncExitStack() as stack:
        proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "tests.sio_recovery_node", redis.process_url()),
                *(redis.namespace, "2", "--lifetime", "60"),
            ],
            stdout=subprocess.PIPE,
            cwd=os.path.dirname(os.path.dirname(__file__)),
        )
        assert proc.stdout is not None
        stack.callback(proc.stdout.close)
        stack.callback(proc.wait, 10)
        stack.callback(proc.kill)
        port = int(await anyio.to_thread.run_sync(proc.stdout.readline))
        survivor = await stack.enter_async_context(node(redis, window=2.0))
        tg = await stack.enter_async_context(anyio.create_task_group())
        stack.callback(tg.cancel_scope.cancel)
        raws = Raws(stack, tg)
        raw = await raws.open(f"http://127.0.0.1:{port}", {"name": "cy"})
        assert raw.connected is not None
        sid, pid = raw.connected["sid"], raw.connected["pid"]
        await raw.call("join", "r")
        await emit_each(survivor, [1])
        offset = (await raw.wait_events(1))[0][2]
        # Longer than a session written at connect or join lives (4/3 of the window + 1 s):
        # what is recovered was rewritten by the dead node while it ran.
        await anyio.sleep(5)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        await emit_each(survivor, [2, 3])
        again = await raws.open(survivor.url, {"pid": pid, "offset": offset})
        assert again.connected == {"sid": sid, "pid": pid}
        assert [e[1] for e in await again.wait_events(2)] == [2, 3]
        me = await again.call("whoami")
        assert me == {"session": {"name": "cy"}, "rooms": ["r"], "recovered": True}


async def test_python_socketio_clients_connect_emit_and_receive(redis: Backend) -> None:
    """python-socketio's AsyncClient sends no pid: a new session each time; acked calls are
    unchanged; room events carry the offset as their last argument (socket.io's protocol)."""
    async with cluster(redis) as (nodes, _):
        client = socketio.AsyncClient(reconnection=False)
        got: list[tuple[Any, ...]] = []

        @client.on("said")
        async def said(*args: Any) -> None:
            got.append(args)

        await client.connect(nodes[0].url, transports=["websocket"], wait_timeout=10)
        try:
            assert await client.call("join", "r", timeout=10) == "joined"
            await emit_each(nodes[1], [{"n": 1}])
            await eventually(lambda: _check(len(got) == 1), timeout=10)
            assert got[0][0] == {"n": 1} and isinstance(got[0][1], str)
        finally:
            await client.disconnect()


async def test_recovery_needs_a_roomrouter_manager_with_a_cache() -> None:
    with pytest.raises(ConfigurationError):
        AsyncServer(connection_state_recovery={"max_disconnection_duration": 5})
    with pytest.raises(ConfigurationError):
        AsyncServer(
            client_manager=RoomRouterManager("memory://x"),
            connection_state_recovery={"max_disconnection_duration": 5, "bogus": 1},
        )


async def test_recovery_on_the_memory_backend_with_sessions_in_process() -> None:
    """memory:// nodes of one process: the sessions stay in the process (no Redis needed)."""
    url = f"memory://sio-recovery-{unique_namespace()}"
    async with AsyncExitStack() as stack:
        nodes = []
        for _ in range(2):
            manager = RoomRouterManager(url, **TEST_ROUTER_OPTIONS)
            connects: list[tuple[str, bool]] = []
            sio = make_server(manager, 10.0, connects)
            app = socketio.ASGIApp(sio, on_shutdown=sio.shutdown)
            nodes.append(
                Node(sio, manager, await stack.enter_async_context(serve_asgi(app)), connects)
            )
        tg = await stack.enter_async_context(anyio.create_task_group())
        stack.callback(tg.cancel_scope.cancel)
        raws = Raws(stack, tg)
        a, b = nodes
        raw = await raws.open(a.url, {"name": "di"})
        assert raw.connected is not None
        sid, pid = raw.connected["sid"], raw.connected["pid"]
        await raw.call("join", "r")
        await emit_each(b, [1])
        offset = (await raw.wait_events(1))[0][2]
        await drop(raw, a)
        await emit_each(b, [2])
        await emit_each(a, [3])
        again = await raws.open(b.url, {"pid": pid, "offset": offset})
        assert again.connected == {"sid": sid, "pid": pid}
        assert [e[1] for e in await again.wait_events(2)] == [2, 3]
        assert (await again.call("whoami"))["session"] == {"name": "di"}
