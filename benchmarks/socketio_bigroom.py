"""One Socket.IO room with thousands of clients on a node: emits and deliveries per second of
RoomRouterManager's room fan-out (issue 23).

    python benchmarks/socketio_bigroom.py                       # this checkout, one round
    git archive main src | tar -x -C /tmp/before
    python benchmarks/socketio_bigroom.py --against /tmp/before/src --rounds 3

The clients are real Engine.IO sockets (``engineio.AsyncSocket``) registered on a real
``socketio.AsyncServer`` and connected through the manager as the server connects a client;
each is drained by a writer task that calls the socket's own ``poll()``, as Engine.IO's
websocket and polling transports do, and counts what it takes. So everything down to the
socket's queue and the writer's wake-up is the real path; only the network write after it is
left out. Scenarios, each with ``--clients`` clients in one room:

* ``local``: the speaker is on the clients' node and yields after each emit (every emit is
  its own step of the event loop: the worst case for batching);
* ``burst``: the same speaker emits 10 at a time between yields;
* ``remote``: the speaker is on another node (memory broker, or ``--url``), both nodes with
  a 5 ms delivery batch delay: the clients' node takes the emits from the broker in batches.

Reported per scenario: emits per second (``--emits`` emits until the last client has them
all), deliveries per second, deliveries per CPU second of the process, and writer wake-ups
per client. ``--against DIR`` runs the same in subprocesses on the code in ``DIR`` (e.g. the
``src`` of an older checkout) and on this one, alternated, ``--rounds`` times each, and
prints the medians side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

SCENARIOS = ("local", "burst", "remote")


class Writer:
    """The writer side of one client's transport: takes what ``poll()`` returns."""

    __slots__ = ("delivered", "socket", "task", "wakes")

    def __init__(self, socket: Any) -> None:
        self.socket = socket
        self.delivered = 0
        self.wakes = 0
        self.task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            packets = await self.socket.poll()
            if not packets:
                return
            self.wakes += 1
            self.delivered += len(packets)


async def add_clients(server: Any, manager: Any, count: int, room: str) -> list[Writer]:
    from engineio.async_socket import AsyncSocket

    writers = []
    for i in range(count):
        eio_sid = f"eio-{i}"
        socket = AsyncSocket(server.eio, eio_sid)
        socket.last_ping = None  # no ping cycle in the benchmark: never "gone"
        socket.connected = True
        server.eio.sockets[eio_sid] = socket
        sid = await manager.connect(eio_sid, "/")
        await manager.enter_room(sid, "/", room)
        writers.append(Writer(socket))
    return writers


async def measure(scenario: str, clients: int, emits: int, url: str | None) -> dict[str, Any]:
    import socketio

    from roomrouter.integrations.socketio import RoomRouterManager

    broker = url or f"memory://bigroom-{uuid.uuid4().hex[:8]}"
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    count = 2 if scenario == "remote" else 1
    managers = [
        RoomRouterManager(broker, namespace=namespace, linger=0, delivery_batch_delay=0.005)
        for _ in range(count)
    ]
    servers = [socketio.AsyncServer(client_manager=m, async_mode="asgi") for m in managers]
    for manager in managers:
        await manager.start()
    listening, speaking = servers[-1], servers[0]
    writers = await add_clients(listening, managers[-1], clients, "lecture")
    if scenario == "remote":
        # The speaker's node hosts the room too (one client), so it publishes to the broker.
        extra = await add_clients(speaking, managers[0], 1, "lecture")
    else:
        extra = []
    expected = emits
    per_yield = 10 if scenario == "burst" else 1
    await asyncio.sleep(0.2)
    cpu, start = time.process_time(), time.perf_counter()
    for k in range(emits):
        await speaking.emit("m", k, to="lecture")
        if (k + 1) % per_yield == 0:
            await asyncio.sleep(0)
    while any(w.delivered < expected for w in writers):
        await asyncio.sleep(0.001)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    delivered = sum(w.delivered for w in writers)
    assert delivered == expected * clients, (delivered, expected * clients)
    result = {
        "scenario": scenario,
        "emits_per_s": emits / elapsed,
        "deliveries_per_s": delivered / elapsed,
        "deliveries_per_cpu_s": delivered / cpu if cpu else 0.0,
        "wakes_per_client": statistics.mean(w.wakes for w in writers),
    }
    for writer in [*writers, *extra]:
        writer.socket.queue.put_nowait(None)
    await asyncio.gather(*(w.task for w in [*writers, *extra]))
    for server in servers:
        await server.shutdown()
    return result


def run_rounds(args: argparse.Namespace) -> None:
    here = str(Path(__file__).resolve().parents[1] / "src")
    variants = {"before": args.against, "after": here}
    results: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for round_ in range(args.rounds):
        for name, path in variants.items():
            env = {**os.environ, "PYTHONPATH": path}
            cmd = [sys.executable, __file__, "--json", "--clients", str(args.clients)]
            cmd += ["--emits", str(args.emits), "--scenarios", ",".join(args.scenarios)]
            if args.url:
                cmd += ["--url", args.url]
            out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
            for line in out.stdout.splitlines():
                result = json.loads(line)
                results.setdefault((result["scenario"], name), []).append(result)
            print(f"round {round_ + 1} {name} done", file=sys.stderr)
    print(
        f"{args.clients} clients in one room, {args.emits} emits, medians of {args.rounds} "
        "rounds (before / after)"
    )
    print("| scenario | emits/s | deliveries/s | deliveries per CPU s | writer wakes per client |")
    print("|---|---:|---:|---:|---:|")
    for scenario in args.scenarios:
        cells = []
        for key, fmt in (
            ("emits_per_s", "{:,.1f}"),
            ("deliveries_per_s", "{:,.0f}"),
            ("deliveries_per_cpu_s", "{:,.0f}"),
            ("wakes_per_client", "{:,.1f}"),
        ):
            pair = [
                statistics.median(r[key] for r in results[scenario, name])
                for name in ("before", "after")
            ]
            cells.append(f"{fmt.format(pair[0])} / {fmt.format(pair[1])}")
        print(f"| {scenario} | " + " | ".join(cells) + " |")


async def main(args: argparse.Namespace) -> None:
    for scenario in args.scenarios:
        result = await measure(scenario, args.clients, args.emits, args.url)
        if args.json:
            print(json.dumps(result), flush=True)
        else:
            print(
                f"{scenario:<7} {result['emits_per_s']:>9,.0f} emits/s "
                f"{result['deliveries_per_s']:>12,.0f} deliveries/s "
                f"{result['deliveries_per_cpu_s']:>12,.0f} per CPU s "
                f"{result['wakes_per_client']:>7.1f} wakes per client"
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=5000)
    parser.add_argument("--emits", type=int, default=50)
    parser.add_argument("--url", default=None, help="broker URL (default: memory)")
    parser.add_argument("--scenarios", type=lambda s: s.split(","), default=list(SCENARIOS))
    parser.add_argument("--against", help="src directory of the code to compare with")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    parsed = parser.parse_args()
    if parsed.against:
        run_rounds(parsed)
    else:
        asyncio.run(main(parsed))
