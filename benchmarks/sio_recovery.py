"""Socket.IO connection state recovery at scale: N clients lose their transport at once and
reconnect at once to the other node (issue 20).

    python benchmarks/sio_recovery.py                       # N = 1,000, 20 rooms, 10 missed
    python benchmarks/sio_recovery.py --clients 200 --missed 50

Two roomrouter ``AsyncServer`` nodes with recovery on, in this process, on the local Redis
(uvicorn on loopback ports). N raw engine.io v4 WebSocket clients connect to node A, 50 at a
time, each joins one of ``--rooms`` rooms; node B emits one event per room (each client notes
its offset); every client closes its WebSocket; node B emits ``--missed`` events to every
room; then all N reconnect to node B at once with ``{pid, offset}``. Reported:

* ``recover_s``: from the first reconnect sent to the last client holding all its missed
  events (CONNECT answer included);
* ``recovered``: clients answered with their old sid; ``missed_delivered``: missed events
  received, of ``clients x missed``; ``wrong``: clients whose events were not exactly the
  missed ones in order.

Loopback only; figures vary with the load of the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import time
import uuid
from typing import Any

import socketio
import uvicorn
import websockets

from roomrouter.integrations.socketio import AsyncServer, RoomRouterManager

REDIS = "redis://127.0.0.1:6379/0"


async def serve(namespace: str) -> tuple[AsyncServer, str, uvicorn.Server, asyncio.Task[None]]:
    manager = RoomRouterManager(REDIS, namespace=namespace)
    sio = AsyncServer(
        async_mode="asgi",
        client_manager=manager,
        connection_state_recovery={"max_disconnection_duration": 60},
    )

    @sio.on("join")
    async def join(sid: str, room: str) -> str:
        await sio.enter_room(sid, room)
        return "joined"

    await manager.start()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(2048)
    app = socketio.ASGIApp(sio, on_shutdown=sio.shutdown)
    server = uvicorn.Server(
        uvicorn.Config(app, ws="websockets-sansio", access_log=False, log_level="warning")
    )
    task = asyncio.ensure_future(server.serve([sock]))
    while not server.started:
        await asyncio.sleep(0.02)
    return sio, f"ws://127.0.0.1:{sock.getsockname()[1]}", server, task


class Client:
    def __init__(self, room: str) -> None:
        self.room = room
        self.connected: dict[str, Any] | None = None
        self.events: list[list[Any]] = []
        self.acked = asyncio.Event()
        self.ws: Any = None
        self.reader: asyncio.Task[None] | None = None
        self.done = asyncio.Event()
        self.expect = 0

    async def open(self, url: str, auth: dict[str, Any] | None = None) -> None:
        self.ws = await websockets.connect(url + "/socket.io/?EIO=4&transport=websocket")
        await self.ws.recv()
        self.connected, self.events = None, []
        await self.ws.send("40" + (json.dumps(auth) if auth else ""))
        self.reader = asyncio.ensure_future(self.read())

    async def read(self) -> None:
        try:
            async for message in self.ws:
                if message == "2":
                    await self.ws.send("3")
                elif message.startswith("40"):
                    self.connected = json.loads(message[2:])
                elif message.startswith("431"):
                    self.acked.set()
                elif message.startswith("42"):
                    self.events.append(json.loads(message[2:]))
                    if self.expect and len(self.events) >= self.expect:
                        self.done.set()
        except websockets.ConnectionClosed:
            pass


async def run(clients: int, rooms: int, missed: int) -> dict[str, Any]:
    namespace = f"bench-sio-recovery-{uuid.uuid4().hex[:8]}"
    a, url_a, server_a, task_a = await serve(namespace)
    b, url_b, server_b, task_b = await serve(namespace)
    everyone = [Client(f"room-{i % rooms}") for i in range(clients)]
    try:
        for start in range(0, clients, 50):
            batch = everyone[start : start + 50]
            await asyncio.gather(*(c.open(url_a) for c in batch))
            for c in batch:
                await c.ws.send("421" + json.dumps(["join", c.room]))
            await asyncio.gather(*(c.acked.wait() for c in batch))
        for i in range(rooms):
            await b.emit("said", "before", to=f"room-{i}")
        while any(len(c.events) < 1 for c in everyone):
            await asyncio.sleep(0.05)
        offsets = {id(c): c.events[-1][-1] for c in everyone}
        sids = {id(c): c.connected["sid"] for c in everyone if c.connected}
        pids = {id(c): c.connected["pid"] for c in everyone if c.connected}
        await asyncio.gather(*(c.ws.close() for c in everyone))
        while a.manager.get_namespaces() and any(
            a.manager.is_connected(s, "/") for s in sids.values()
        ):
            await asyncio.sleep(0.05)
        for n in range(missed):
            for i in range(rooms):
                await b.emit("said", n, to=f"room-{i}")
        for c in everyone:
            c.expect, c.done = missed, asyncio.Event()
        began = time.perf_counter()
        await asyncio.gather(
            *(c.open(url_b, {"pid": pids[id(c)], "offset": offsets[id(c)]}) for c in everyone)
        )
        waiting = [asyncio.ensure_future(c.done.wait()) for c in everyone]
        await asyncio.wait(waiting, timeout=60)
        for w in waiting:
            w.cancel()
        took = time.perf_counter() - began
        await asyncio.sleep(0.3)
        recovered = sum(1 for c in everyone if c.connected and c.connected["sid"] == sids[id(c)])
        wrong = sum(1 for c in everyone if [e[1] for e in c.events] != list(range(missed)))
        return {
            "clients": clients,
            "rooms": rooms,
            "missed": missed,
            "recover_s": round(took, 2),
            "recovered": recovered,
            "missed_delivered": sum(len(c.events) for c in everyone),
            "wrong": wrong,
            "answered": sum(1 for c in everyone if c.connected),
        }
    finally:
        await asyncio.gather(*(c.ws.close() for c in everyone if c.ws), return_exceptions=True)
        for server in (server_a, server_b):
            server.should_exit = True
        await asyncio.gather(task_a, task_b, return_exceptions=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--rooms", type=int, default=20)
    parser.add_argument("--missed", type=int, default=10)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args.clients, args.rooms, args.missed))))


if __name__ == "__main__":
    main()
