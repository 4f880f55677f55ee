"""Reconnect storm: how long a node takes to rejoin N members with full recent caches, and what
it costs the servers (issue 19).

    python benchmarks/storm.py                                   # redis, N = 2,000 and 10,000
    python benchmarks/storm.py --backends memory,redis --members 2000 --repeats 3
    python benchmarks/storm.py --sink postgresql://postgres@127.0.0.1:5432/test
    PYTHONPATH=/tmp/storm-base/src python benchmarks/storm.py    # another checkout's code

One node (this process) fills ``--rooms`` rooms with ``--cached`` persisted messages each (a
full cache at the default ``recent_size``), creates N members spread over the rooms and rejoins
them all at once (one task group) with ``join(room, since=...)``: nine in ten last saw an id
among the newest 60, one in ten one far back. A peer node in its own process hosts every room
and watches the storming node's heartbeats. Reported per run, medians of ``--repeats``:

* ``rejoin_s``: from the first join to the last one returning;
* ``errors``, ``incomplete``: joins that raised, and recoveries not reported complete;
* ``lost``: deliveries a member should have had (ids after its ``since``) and did not get;
* ``lag_ms``: the worst delay of a 50 ms timer on the storming node (what heartbeats suffer);
* ``expired``: nodes declared dead, on the storming node plus on the peer;
* ``redis_calls``: Redis commands per rejoin (``INFO commandstats`` diff over the storm, on a
  redis-server of the benchmark's own so nobody else's commands count), ``redis_reads`` the
  history reads among them (``XRANGE``/``XREVRANGE``/``XINFO``) and ``redis_out_kb`` what
  Redis sent per rejoin (``total_net_output_bytes``);
* with ``--sink``: ``sink_reads`` (history calls per rejoin, counted on the sink) and, for
  PostgreSQL, ``pg_xacts`` (``xact_commit`` of the database per rejoin, includes any other
  client of the database).

Loopback only. Figures are reported, not asserted: see ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import anyio

from roomrouter import Envelope, RoomRouter

HERE = Path(__file__).resolve()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class PrivateRedis:
    """A redis-server of the benchmark's own: its command counters are the storm's alone."""

    def __init__(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise SystemExit("redis-server is not installed (or pass --redis-url)")
        self.port = _free_port()
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        for _ in range(100):
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.1):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


class Peer:
    """A node in its own process (this file with ``--peer``) that hosts every room."""

    def __init__(self, url: str, namespace: str, rooms: list[str]) -> None:
        self.child = subprocess.Popen(
            [sys.executable, str(HERE), "--peer", url, namespace, *rooms],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip

    async def line(self) -> str:
        assert self.child.stdout is not None
        with anyio.fail_after(30):
            return (await anyio.to_thread.run_sync(self.child.stdout.readline)).strip()

    async def stats(self) -> dict[str, int]:
        assert self.child.stdin is not None
        self.child.stdin.write("stats\n")
        self.child.stdin.flush()
        stats: dict[str, int] = json.loads(await self.line())
        return stats

    def close(self) -> None:
        self.child.kill()
        self.child.wait()
        for pipe in (self.child.stdin, self.child.stdout):
            if pipe is not None:
                pipe.close()


async def peer_main(url: str, namespace: str, rooms: list[str]) -> None:
    router = RoomRouter.from_url(url, namespace=namespace, linger=0)
    async with router:
        member = router.member("peer", listed=False)
        for room in rooms:
            await member.join(room)
        print(router.node_id, flush=True)

        async def drain() -> None:
            while True:
                await member.receive_batch()

        async with anyio.create_task_group() as tg:
            tg.start_soon(drain)
            while True:
                line = await anyio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
                if not line:
                    break
                print(json.dumps(router.stats()), flush=True)
            tg.cancel_scope.cancel()


async def _redis_info(url: str) -> dict[str, float]:
    from redis.asyncio import Redis

    client = Redis.from_url(url)
    try:
        commands = await client.info("commandstats")
        stats = await client.info("stats")
    finally:
        await client.aclose()
    out = {name.removeprefix("cmdstat_"): float(v["calls"]) for name, v in commands.items()}
    out["@net_output_bytes"] = float(stats["total_net_output_bytes"])
    return out


async def _pg_xacts(dsn: str) -> float:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        value = await conn.fetchval(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
        )
    finally:
        await conn.close()
    return float(value)


def _since_index(i: int, cached: int) -> int:
    if i % 10 == 0:
        return 7 + (i // 10) % max(1, cached - 110)
    return cached - 2 - i % 60


def _sink(args: argparse.Namespace, counter: list[int]) -> Any:
    if not args.sink:
        return None
    from roomrouter.storage import sink_from_url

    sink = sink_from_url(args.sink)
    history = sink.history

    async def counted(room: str, **kwargs: Any) -> list[Envelope]:
        counter[0] += 1
        return await history(room, **kwargs)

    sink.history = counted  # type: ignore[method-assign]
    return sink


async def run(backend: str, members: int, args: argparse.Namespace, url: str) -> dict[str, Any]:
    namespace = "storm" + uuid.uuid4().hex[:8]
    rooms = [f"hall-{r}" for r in range(args.rooms)]
    if backend == "memory":
        url = f"memory://storm{namespace}"
    sink_reads = [0]
    router = RoomRouter.from_url(
        url, namespace=namespace, linger=0, inbox_size=4 * args.cached, sink=_sink(args, sink_reads)
    )
    peer = Peer(url, namespace, rooms) if backend != "memory" else None
    result: dict[str, Any] = {"backend": backend, "members": members, "sink": args.sink or "-"}
    try:
        async with router:
            if peer is not None:
                peer_id = await peer.line()
                deadline = time.monotonic() + 30
                while not all(peer_id in router.remote_hosts(r) for r in rooms):
                    if time.monotonic() > deadline:
                        raise RuntimeError("the peer node did not show up")
                    await anyio.sleep(0.05)
            sent: dict[str, list[Envelope]] = {room: [] for room in rooms}

            async def fill(room: str) -> None:
                for i in range(args.cached):
                    sent[room].append(await router.publish(room, b"%d" % i, persist=True))

            async with anyio.create_task_group() as tg:
                for room in rooms:
                    tg.start_soon(fill, room)
            if args.sink:
                assert router.sink is not None
                # What a storage worker would have written by now: the whole cache.
                await router.sink.write([e for room in rooms for e in sent[room]])
            people = [router.member(f"m{i}") for i in range(members)]
            errors: list[str] = []
            incomplete = 0
            lag = [0.0]
            done = anyio.Event()

            async def measure_lag() -> None:
                while not done.is_set():
                    start = time.perf_counter()
                    await anyio.sleep(0.05)
                    lag[0] = max(lag[0], time.perf_counter() - start - 0.05)

            async def rejoin(i: int) -> None:
                nonlocal incomplete
                room = rooms[i % len(rooms)]
                try:
                    since = sent[room][_since_index(i, args.cached)].id
                    recovery = await people[i].join(room, since=since)
                except Exception as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")
                else:
                    incomplete += not recovery.complete

            redis_before = await _redis_info(url) if backend != "memory" else {}
            pg_before = await _pg_xacts(args.sink) if args.sink.startswith("postgres") else 0.0
            reads_before = sink_reads[0]
            started = time.perf_counter()
            async with anyio.create_task_group() as tg:
                tg.start_soon(measure_lag)
                async with anyio.create_task_group() as storm:
                    for i in range(members):
                        storm.start_soon(rejoin, i)
                result["rejoin_s"] = time.perf_counter() - started
                done.set()
            if backend != "memory":
                after = await _redis_info(url)
                diff = {k: after[k] - redis_before.get(k, 0.0) for k in after}
                net = diff.pop("@net_output_bytes")
                # The two INFO calls themselves are not the storm's.
                calls = sum(diff.values()) - 2
                reads = sum(diff.get(k, 0.0) for k in ("xrange", "xrevrange", "xinfo|stream"))
                result["redis_calls"] = calls / members
                result["redis_reads"] = reads / members
                result["redis_out_kb"] = net / members / 1024
            if args.sink:
                result["sink_reads"] = (sink_reads[0] - reads_before) / members
            if args.sink.startswith("postgres"):
                result["pg_xacts"] = (await _pg_xacts(args.sink) - pg_before) / members
            await anyio.sleep(0.5)  # deliveries of the last joins in flight
            lost = 0
            for i, member in enumerate(people):
                room = rooms[i % len(rooms)]
                want = {e.id for e in sent[room][_since_index(i, args.cached) + 1 :]}
                got = set()
                while (envelope := member.receive_nowait()) is not None:
                    got.add(envelope.id)
                lost += len(want - got)
            stats = router.stats()
            result.update(
                errors=len(errors),
                first_error=errors[0] if errors else "",
                incomplete=incomplete,
                lost=lost,
                lag_ms=lag[0] * 1000,
                expired=stats["nodes_expired"]
                + ((await peer.stats())["nodes_expired"] if peer is not None else 0),
            )
    finally:
        if peer is not None:
            peer.close()
    return result


KEYS = ["rejoin_s", "errors", "incomplete", "lost", "lag_ms", "expired", "redis_calls",
        "redis_reads", "redis_out_kb", "sink_reads", "pg_xacts"]  # fmt: skip


def _table(rows: list[dict[str, Any]]) -> str:
    keys = [k for k in KEYS if any(k in r for r in rows)]
    lines = [
        "| backend | sink | members | " + " | ".join(keys) + " |",
        "|---|---|---:|" + "---:|" * len(keys),
    ]
    for r in rows:
        cells = [f"{r[k]:.3g}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in keys]
        lines.append(
            f"| {r['backend']} | {r['sink']} | {r['members']} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


async def main(args: argparse.Namespace) -> None:
    private = None
    url = args.redis_url
    if "redis" in args.backends and not url:
        private = PrivateRedis()
        url = private.url
    medians = []
    try:
        for backend in args.backends.split(","):
            for members in (int(n) for n in args.members.split(",")):
                runs = []
                for _ in range(args.repeats):
                    with anyio.fail_after(args.timeout):
                        one = await run(backend, members, args, url)
                    print(json.dumps(one), flush=True)
                    runs.append(one)
                median = {k: v for k, v in runs[0].items() if not isinstance(v, (int, float))}
                for key in KEYS:
                    if key in runs[0]:
                        median[key] = float(statistics.median(r[key] for r in runs))
                median["members"] = members
                medians.append(median)
    finally:
        if private is not None:
            private.stop()
    where = os.environ.get("PYTHONPATH", "")
    print(f"\nmedians of {args.repeats} ({sys.executable}, PYTHONPATH={where}):")
    print(_table(medians))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backends", default="redis", help="memory, redis (comma list)")
    p.add_argument("--members", default="2000,10000", help="comma list of N")
    p.add_argument("--rooms", type=int, default=20)
    p.add_argument("--cached", type=int, default=1000, help="persisted messages per room")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sink", default="", help="sink URL (sqlite:///path, postgresql://...)")
    p.add_argument("--redis-url", default="", help="default: a redis-server of its own")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per run")
    return p.parse_args(argv)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--peer":
        anyio.run(peer_main, sys.argv[2], sys.argv[3], sys.argv[4:])
    else:
        anyio.run(main, parse_args())
