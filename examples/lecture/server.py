"""A lecture hall on python-socketio and roomrouter: one node of the deployment most users copy.

    pip install "roomrouter[socketio,demo,rabbitmq,redis]"   # + mysql for a MySQL sink
    python examples/lecture/server.py --port 8001 &
    python examples/lecture/server.py --port 8002 &
    roomrouter worker --broker amqp://guest:guest@127.0.0.1:5672/ --namespace lecture \\
        --sink sqlite:///lecture.db

Each node is a python-socketio server (roomrouter's ``AsyncServer``: connection state recovery
on) whose nodes talk through RabbitMQ; presence and recovery sessions live in Redis; every
message is persisted and a ``roomrouter worker`` writes it into the sink (SQLite by default,
MySQL with ``--sink mysql://root@127.0.0.1:3306/test``). The node also serves the page and the
history endpoint ``GET /rooms/{room}/messages?before=<id>&limit=<n>``. See README.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote

import anyio
import socketio
import uvicorn

from roomrouter import ConfigurationError, RoomRouter, RoomRouterError
from roomrouter.integrations.socketio import AsyncServer, RoomRouterManager, StoredEmit

HERE = Path(__file__).parent
STATIC = HERE / "static"
#: The official socket.io client, vendored once for the examples (examples/socketio/README.md).
CLIENT = HERE.parent / "socketio" / "static" / "socket.io.min.js"

#: Most messages one history page answers; the page asks for 50.
MAX_PAGE = 1000
#: Most messages a join catches up (those sent between the page's history read and its join).
MAX_CATCH_UP = 1000

DEFAULTS = {
    "broker": "amqp://guest:guest@127.0.0.1:5672/",
    "presence": "redis://127.0.0.1:6379/0",
    "sink": "sqlite:///lecture.db",
    "namespace": "lecture",
    "host": "127.0.0.1",
    "port": "8000",
    "window": "120",
}


def message_json(item: StoredEmit) -> dict[str, Any]:
    """A stored ``message`` emit as the page gets it from the history endpoint and in a join's
    catch-up: the same fields as a live one, plus its ``id`` (the live event's offset)."""
    data = item.args[0] if item.args and isinstance(item.args[0], dict) else {}
    return {**data, "id": item.id, "event": item.event, "ts": item.ts}


def create_app(
    broker: str = DEFAULTS["broker"],
    *,
    presence: str = DEFAULTS["presence"],
    sink: str | None = DEFAULTS["sink"],
    namespace: str = DEFAULTS["namespace"],
    window: float = float(DEFAULTS["window"]),
    **router_options: Any,
) -> tuple[socketio.ASGIApp, AsyncServer]:
    """The node's ASGI app (Socket.IO, the page, the history endpoint) and its server. Its
    router (``sio.manager.router``) is the caller's to start before serving and to close
    after ``sio.shutdown()``."""
    # The router is built here and started by the caller (serve()): so a node that cannot
    # reach a service fails before it listens, in one line.
    router = RoomRouter.from_url(
        broker, namespace=namespace, presence=presence, sink=sink, **router_options
    )
    manager = RoomRouterManager(router=router)
    recovery: dict[str, Any] = {"max_disconnection_duration": window}
    if presence.startswith(("redis://", "rediss://")):
        recovery["store"] = presence  # sessions where every node finds them
    sio = AsyncServer(async_mode="asgi", client_manager=manager, connection_state_recovery=recovery)
    node = manager.router.node_id

    @sio.on("join")
    async def join(sid: str, data: Any) -> dict[str, Any]:
        """``{"room", "name", "after"}`` → leave the previous room, enter this one. The ack
        holds what was sent to the room after ``after`` (the newest id of the history the page
        loaded): the messages between that read and the join, and some the page will also get
        live, which it drops by id."""
        data = data if isinstance(data, dict) else {}
        room, name = str(data.get("room", "")).strip(), str(data.get("name", "")).strip()
        after = data.get("after") if isinstance(data.get("after"), str) else None
        if not room or not name:
            return {"error": "a room and a name are needed"}
        async with sio.session(sid) as session:
            previous = session.get("room")
            session.update(room=room, name=name)
        if previous and previous != room:
            await sio.leave_room(sid, previous)
        try:
            await sio.enter_room(sid, room)  # returns once every node can reach this client
            # Read after entering: whatever is sent from now on comes live, the rest is here.
            missed = await sio.history(room, after=after, limit=MAX_CATCH_UP)
            here = len(await manager.cluster_participants("/", room))
        except RoomRouterError as exc:  # a service down, a bad room name: said to the page
            return {"error": str(exc)}
        return {
            "room": room,
            "node": node,
            "here": here,
            "missed": [message_json(m) for m in missed if m.event == "message"],
        }

    @sio.on("say")
    async def say(sid: str, text: Any) -> dict[str, Any]:
        """Send ``text`` to the sender's room on every node (the sender included): persisted,
        with its id (offset) as the event's last argument."""
        session = await sio.get_session(sid)
        if "room" not in session:
            return {"error": "join a room first"}
        message = {"name": session["name"], "text": str(text)[:2000], "node": node}
        await sio.emit("message", message, to=session["room"])
        return {"ok": True}

    @sio.on("leave")
    async def leave(sid: str, _data: Any = None) -> dict[str, Any]:
        """Leave the room: with the room's last member on the node, the node leaves it."""
        async with sio.session(sid) as session:
            room = session.pop("room", None)
        if room is not None:
            await sio.leave_room(sid, room)
        return {"left": room}

    async def http(scope: dict[str, Any], receive: Any, send: Any) -> None:
        """``GET /rooms/{room}/messages?before=<id>&limit=<n>``; everything else is a 404."""
        if scope["type"] != "http":
            return
        # The raw path: a room name may hold a slash (percent-encoded by the page).
        parts = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1").split("/")
        if len(parts) != 4 or parts[1] != "rooms" or parts[3] != "messages" or not parts[2]:
            await _answer(send, 404, {"error": "not found"})
            return
        if scope["method"] != "GET":
            await _answer(send, 405, {"error": "GET only"})
            return
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        try:
            room = unquote(parts[2], errors="strict")
        except UnicodeDecodeError:
            await _answer(send, 400, {"error": "the room name is not UTF-8"})
            return
        before = query.get("before", [None])[0] or None
        try:
            limit = int(query.get("limit", ["50"])[0])
            if not 1 <= limit <= MAX_PAGE:
                raise ValueError
        except ValueError:
            await _answer(send, 400, {"error": f"limit must be an integer from 1 to {MAX_PAGE}"})
            return
        try:
            # One more than asked: says whether there are older ones.
            page = await sio.history(room, before=before, limit=limit + 1)
        except (ConfigurationError, ValueError) as exc:
            await _answer(send, 400, {"error": str(exc)})
            return
        except RoomRouterError as exc:
            await _answer(send, 503, {"error": str(exc)})
            return
        more = len(page) > limit
        await _answer(
            send,
            200,
            {"room": room, "more": more, "messages": [message_json(m) for m in page[-limit:]]},
        )

    app = socketio.ASGIApp(
        sio,
        other_asgi_app=http,
        static_files={
            "/": {"filename": str(STATIC / "index.html"), "content_type": "text/html"},
            "/static/socket.io.min.js": str(CLIENT),
            "/static/favicon.svg": {
                "filename": str(STATIC / "favicon.svg"),
                "content_type": "image/svg+xml",
            },
            "/static": str(STATIC),
        },
    )
    return app, sio


async def _answer(send: Any, status: int, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"cache-control", b"no-store")]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    def option(name: str) -> str:
        return os.environ.get("LECTURE_" + name.upper(), DEFAULTS[name])

    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="Every option also reads LECTURE_<NAME> from the environment (LECTURE_BROKER...).",
    )
    parser.add_argument("--broker", default=option("broker"), help="roomrouter broker URL")
    parser.add_argument("--presence", default=option("presence"), help="presence/sessions URL")
    parser.add_argument("--sink", default=option("sink"), help="history sink URL ('' for none)")
    parser.add_argument("--namespace", default=option("namespace"), help="shared by all nodes")
    parser.add_argument("--host", default=option("host"))
    parser.add_argument("--port", type=int, default=int(option("port")))
    parser.add_argument(
        "--window",
        type=float,
        default=float(option("window")),
        help="seconds a lost connection can be recovered in",
    )
    return parser.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    app, sio = create_app(
        args.broker,
        presence=args.presence,
        sink=args.sink or None,
        namespace=args.namespace,
        window=args.window,
    )
    router = sio.manager.router
    # In the cluster before the port opens; a failure is one line, not a traceback.
    try:
        await router.start()
    except RoomRouterError as exc:
        print(f"lecture: cannot start: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        ws="websockets-sansio",
        lifespan="off",
        log_level="warning",
    )
    server = uvicorn.Server(config)
    try:
        print(
            f"lecture node {sio.manager.router.node_id} on http://{args.host}:{args.port}",
            flush=True,
        )
        await server.serve()
    finally:
        await sio.shutdown()
        await router.aclose()


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # aiormq logs each failed connect in its own words; the start's error says it once.
    logging.getLogger("aiormq").setLevel(logging.CRITICAL)
    try:
        args = parse_args(argv)
        anyio.run(serve, args)
    except ConfigurationError as exc:  # a bad URL or option
        raise SystemExit(f"lecture: {exc}") from None


if __name__ == "__main__":
    main()
