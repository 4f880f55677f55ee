"""A python-socketio chat scaled out with roomrouter: run it as several nodes on one broker.

    pip install "roomrouter[socketio,demo,redis]"
    python examples/socketio/server.py --broker redis://127.0.0.1:6379/0 --port 8001 &
    python examples/socketio/server.py --broker redis://127.0.0.1:6379/0 --port 8002

Open http://127.0.0.1:8001 and http://127.0.0.1:8002, pick the same room in both: the two pages
are on different nodes and chat. The page is served by this app and uses the official Socket.IO
JavaScript client, vendored in ``static/`` (see README.md).

The only roomrouter-specific line is ``client_manager=RoomRouterManager(...)``; the rest is
plain python-socketio.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import socketio
import uvicorn

from roomrouter.integrations.socketio import RoomRouterManager

STATIC = Path(__file__).parent / "static"


def create_app(
    broker: str, namespace: str = "sio-chat", **router_options: Any
) -> tuple[socketio.ASGIApp, socketio.AsyncServer]:
    """The chat's ASGI app and its Socket.IO server, on a router for ``broker``."""
    manager = RoomRouterManager(broker, namespace=namespace, **router_options)
    sio = socketio.AsyncServer(async_mode="asgi", client_manager=manager)
    node = manager.router.node_id

    @sio.on("join")
    async def join(sid: str, data: dict[str, Any]) -> dict[str, Any]:
        """``{"room", "name"}`` → leave the previous room, enter this one; the ack says which
        node the page is on."""
        room, name = str(data.get("room", "")).strip(), str(data.get("name", "")).strip()
        if not room or not name:
            return {"error": "a room and a name are needed"}
        async with sio.session(sid) as session:
            previous = session.get("room")
            session.update(room=room, name=name)
        if previous and previous != room:
            await sio.leave_room(sid, previous)
            await sio.emit("system", f"{name} left", to=previous)
        await sio.enter_room(sid, room)  # returns once every node can reach this client
        await sio.emit("system", f"{name} joined (node {node})", to=room, skip_sid=sid)
        return {"room": room, "node": node}

    @sio.on("say")
    async def say(sid: str, text: str) -> dict[str, Any]:
        """Send ``text`` to the sender's room, on every node (the sender included)."""
        session = await sio.get_session(sid)
        if "room" not in session:
            return {"error": "join a room first"}
        message = {"name": session["name"], "text": str(text)[:2000], "node": node}
        await sio.emit("message", message, to=session["room"])
        return {"ok": True}

    app = socketio.ASGIApp(
        sio,
        static_files={"/": str(STATIC / "index.html"), "/static": str(STATIC)},
        on_startup=manager.start,  # in the cluster before the first client connects
        on_shutdown=sio.shutdown,  # closes the manager and its router too
    )
    return app, sio


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--broker", default="memory://", help="roomrouter broker URL")
    parser.add_argument("--namespace", default="sio-chat", help="nodes of one chat share it")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    app, _ = create_app(args.broker, args.namespace)
    uvicorn.run(app, host=args.host, port=args.port, ws="websockets-sansio", lifespan="on")


if __name__ == "__main__":
    main()
