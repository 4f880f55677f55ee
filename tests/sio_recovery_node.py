"""A Socket.IO node with connection state recovery in its own process, for the test that kills
one with SIGKILL: ``python -m tests.sio_recovery_node URL NAMESPACE WINDOW`` serves
``tests.test_sio_recovery``'s handlers on a free loopback port, prints it, and exits after
``--lifetime`` seconds at the latest."""

from __future__ import annotations

import argparse
import socket
import sys

import anyio
import socketio
import uvicorn

from roomrouter.integrations.socketio import RoomRouterManager

from .conftest import TEST_ROUTER_OPTIONS
from .helpers import eventually
from .test_sio_recovery import _check, make_server


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("namespace")
    parser.add_argument("window", type=float)
    parser.add_argument("--lifetime", type=float, default=60.0)
    args = parser.parse_args()
    manager = RoomRouterManager(args.url, namespace=args.namespace, **TEST_ROUTER_OPTIONS)
    sio = make_server(manager, args.window, [])
    await manager.start()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    app = socketio.ASGIApp(sio, on_shutdown=sio.shutdown)
    server = uvicorn.Server(
        uvicorn.Config(app, ws="websockets-sansio", access_log=False, log_level="warning")
    )
    with anyio.move_on_after(args.lifetime):
        async with anyio.create_task_group() as tg:
            tg.start_soon(server.serve, [sock])
            await eventually(lambda: _check(server.started), timeout=10)
            print(sock.getsockname()[1], flush=True)
    sys.exit(0)


if __name__ == "__main__":
    anyio.run(main)
