"""Big-room fan-out: deliveries/s per node when one room's members are split over two nodes,
against all of them on one node (issue 12).

    python benchmarks/fanout.py                             # 10k + 10k vs 20k, Redis
    python benchmarks/fanout.py --members 10000 --runs 3 --duration 3 --publishers 1,16

Each node is its own process (started here, by this coordinator) with one RoomRouter on Redis
and ``--members`` members in one room, each drained by a task of its own calling
``receive()``, as an app's per-connection send loop would. The publishers run inside node A,
as an app server's would: ``--publishers`` concurrent tasks publishing 100-byte payloads for
``--duration`` seconds (at most ``--max-messages``).

* **split**: node A (members + publishers) and node B (members only); B's figure is the
  cross-node fan-out (every envelope came through Redis), A's the local bypass beside it.
* **single**: node A alone with ``2 * --members`` members.

A delivery is one envelope handed to the member's task (``async for`` over the member, i.e.
``receive()``; with ``--api batch``, each envelope of a ``receive_batch()``). A node's rate is
its deliveries over the time from the first publish to its last delivery. Beside it, its
deliveries per second of its own CPU (``time.process_time`` over the run): on a machine shared
with other work that moves far less than the wall-clock rate. Latency (publish to receive) is
sampled on each node's last member (the fan-out's whole length) and first member (the path
and the batch's wait alone: ``first p99``, where what a delay adds shows). Runs are
interleaved (split and single alternate) and the median of ``--runs`` is reported. Each node
stops counting ``--drain`` seconds after the publishers stop, so a run is bounded even if a
node falls far behind; drops (inbox overflow) are reported, never hidden. Figures are
reported, not asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import multiprocessing as mp
import os
import statistics
import sys
import time
import uuid
from multiprocessing.connection import Connection
from typing import Any

ROOM = "big"


def _node(conn: Connection, opts: dict[str, Any]) -> None:
    """A node process: one router, ``opts['members']`` members; publishes if told to."""
    import anyio

    anyio.run(_node_main, conn, opts)


async def _node_main(conn: Connection, opts: dict[str, Any]) -> None:
    import anyio
    import anyio.to_thread

    from roomrouter import MemberClosed, RoomRouter
    from roomrouter.brokers.redis import RedisBroker

    members_n: int = opts["members"]
    batching = {} if opts["delay"] is None else {"delivery_batch_delay": opts["delay"]}
    rss_before = _rss()
    router = RoomRouter(
        RedisBroker.from_url(opts["redis"]),
        namespace=opts["namespace"],
        node_id=opts["name"],
        linger=0,
        inbox_size=opts["inbox_size"],
        heartbeat_interval=0.2,
        node_ttl=5.0,
        **batching,
    )
    delivered = 0
    # Publish-to-receive latency (time.time() - envelope.ts, one clock for every process)
    # of the node's last member: the last one its fan-out wakes, so the worst of the node;
    # and of its first member, the first one woken: the path and the batch's wait without
    # the fan-out's length, which is where the latency a delay adds shows.
    latencies: list[float] = []
    first_latencies: list[float] = []
    batches = 0  # receive_batch() calls: envelopes per wake-up = delivered / batches
    last = 0.0

    async def drain(member: Any) -> None:
        nonlocal delivered, batches
        if opts["api"] == "batch":
            with contextlib.suppress(MemberClosed):
                while True:
                    batch = await member.receive_batch()  # before the +=: it reads first
                    delivered += len(batch)
                    batches += 1
        elif member is sampled or member is sampled_first:
            into = latencies if member is sampled else first_latencies
            async for envelope in member:
                delivered += 1
                into.append(time.time() - envelope.ts)
        else:
            async for _ in member:
                delivered += 1

    async def clock() -> None:
        # Times the last delivery from outside the members' loops (a clock read per delivery
        # would be a share of what is measured): an upper bound, late by one loop iteration.
        nonlocal last
        seen = 0
        while True:
            await anyio.sleep(0.002)
            if delivered != seen:
                seen, last = delivered, time.perf_counter()

    async with router, anyio.create_task_group() as tg:
        members = [router.member(f"m{i}") for i in range(members_n)]
        sampled, sampled_first = members[-1], members[0]
        for member in members:
            await member.join(ROOM)
            tg.start_soon(drain, member)
        await anyio.sleep(0.1)
        rss_per_member = (_rss() - rss_before) / members_n
        tg.start_soon(clock)
        # Ready once the peers this node publishes to are known as hosts of the room.
        with anyio.fail_after(30):
            while len(router.remote_hosts(ROOM)) < len(opts["peers"]):
                await anyio.sleep(0.05)
        if opts["gc_freeze"]:
            # App-level tuning, not the library's: moves the set-up objects (members, their
            # tasks) out of the collector's sight, so full collections stop walking them.
            gc.freeze()
        conn.send(("ready", None))
        command = await anyio.to_thread.run_sync(conn.recv)
        cpu_start = time.process_time()
        published = 0
        if command == "publish":
            payload = b"x" * 100
            started = time.perf_counter()
            stop_at = started + opts["duration"]
            budget = opts["max_messages"]

            # --rate: publishes per second over all publishers (paced from the start, so a
            # late one is followed by the next at once); 0: as fast as each publish returns.
            interval = opts["publishers"] / opts["rate"] if opts["rate"] else 0.0

            async def publisher(index: int) -> None:
                nonlocal published, budget
                due = started + index * interval / opts["publishers"]
                while budget > 0 and time.perf_counter() < stop_at:
                    if interval:
                        wait = due - time.perf_counter()
                        if wait > 0:
                            await anyio.sleep(wait)
                        due += interval
                    budget -= 1
                    await router.publish(ROOM, payload)
                    published += 1

            async with anyio.create_task_group() as pubs:
                for index in range(opts["publishers"]):
                    pubs.start_soon(publisher, index)
            conn.send(("published", (published, started)))
        # perf_counter is CLOCK_MONOTONIC, one clock for every process of the machine.
        expected, started = await anyio.to_thread.run_sync(conn.recv)
        deadline = time.perf_counter() + opts["drain"]
        while delivered < expected * members_n and time.perf_counter() < deadline:
            await anyio.sleep(0.01)
        cpu = time.process_time() - cpu_start
        stats = router.stats()
        window = last - started
        conn.send(
            (
                "result",
                {
                    "node": opts["name"],
                    "delivered": delivered,
                    "expected": expected * members_n,
                    "rate": delivered / window if window > 0 else 0.0,
                    "dropped": stats["dropped_overflow"],
                    "per_wake": delivered / batches if batches else None,
                    "cpu_s": cpu,
                    # What the node does per second of its own CPU: less sensitive than the
                    # wall-clock rate to other processes taking the cores.
                    "per_cpu_s": delivered / cpu if cpu > 0 else 0.0,
                    "latency": _percentiles(latencies),
                    "first_latency": _percentiles(first_latencies),
                    "rss_per_member": rss_per_member,
                },
            )
        )
        tg.cancel_scope.cancel()


def _rss() -> int:
    """Resident bytes of this process (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _percentiles(values: list[float]) -> tuple[float, float, float]:
    """p50, p99 and max of ``values`` in ms (zeros if none)."""
    if not values:
        return (0.0, 0.0, 0.0)
    ordered = sorted(values)
    pick = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return (statistics.median(ordered) * 1e3, pick * 1e3, ordered[-1] * 1e3)


def _run(layout: str, publishers: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    ctx = mp.get_context("spawn")
    namespace = f"bench-fanout-{uuid.uuid4().hex[:8]}"
    names = ["A", "B"] if layout == "split" else ["A"]
    per_node = args.members if layout == "split" else 2 * args.members
    base = {
        "redis": args.redis,
        "namespace": namespace,
        "members": per_node,
        "inbox_size": args.inbox_size,
        "duration": args.duration,
        "max_messages": args.max_messages,
        "publishers": publishers,
        "drain": args.drain,
        "api": args.api,
        "gc_freeze": args.gc_freeze,
        "delay": args.delay,
        "rate": args.rate,
    }
    procs, conns = [], []
    for name in names:
        parent, child = ctx.Pipe()
        peers = [n for n in names if n != name] if name == "A" else []
        opts = {**base, "name": name, "peers": peers}
        proc = ctx.Process(target=_node, args=(child, opts), daemon=True)
        proc.start()
        procs.append(proc)
        conns.append(parent)
    try:
        for conn in conns:
            if not conn.poll(120):
                raise TimeoutError("a node did not get ready")
            assert conn.recv()[0] == "ready"
        for name, conn in zip(names, conns, strict=True):
            conn.send("publish" if name == "A" else "wait")
        if not conns[0].poll(args.duration + 120):
            raise TimeoutError("the publishers did not finish")
        _, (published, started) = conns[0].recv()
        for conn in conns:
            conn.send((published, started))
        results = []
        for conn in conns:
            if not conn.poll(args.drain + 60):
                raise TimeoutError("a node did not report")
            results.append(conn.recv()[1] | {"published": published})
        return results
    finally:
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", type=int, default=10_000, help="per node when split")
    parser.add_argument("--publishers", default="1,16", help="comma-separated task counts")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--duration", type=float, default=3.0, help="seconds of publishing")
    parser.add_argument("--max-messages", type=int, default=2_000)
    parser.add_argument("--drain", type=float, default=15.0, help="seconds to catch up after")
    parser.add_argument("--inbox-size", type=int, default=4_096)
    parser.add_argument(
        "--api",
        choices=("receive", "batch"),
        default="receive",
        help="members drain with `async for` (receive) or receive_batch()",
    )
    parser.add_argument(
        "--gc-freeze", action="store_true", help="gc.freeze() in each node after set-up"
    )
    parser.add_argument(
        "--delay",
        type=float,
        default=None,
        help="RoomRouter(delivery_batch_delay=) in seconds (default: the router's own)",
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="publishes per second over all publishers (default 0: flat out); a paced run "
        "measures the latency batching adds at a load the nodes keep up with",
    )
    parser.add_argument("--layouts", default="split,single", help="comma-separated: split, single")
    parser.add_argument("--redis", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    args = parser.parse_args()
    counts = [int(p) for p in args.publishers.split(",") if p.strip()]
    # (layout, publishers, node) -> rates of each run
    rates: dict[tuple[str, int, str], list[float]] = {}
    per_cpu: dict[tuple[str, int, str], list[float]] = {}
    p99s: dict[tuple[str, int, str], list[float]] = {}
    first_p99s: dict[tuple[str, int, str], list[float]] = {}
    drops: dict[tuple[str, int, str], int] = {}
    for run in range(args.runs):
        for publishers in counts:
            for layout in args.layouts.split(","):
                results = _run(layout, publishers, args)
                for r in results:
                    key = (layout, publishers, r["node"])
                    rates.setdefault(key, []).append(r["rate"])
                    per_cpu.setdefault(key, []).append(r["per_cpu_s"])
                    p99s.setdefault(key, []).append(r["latency"][1])
                    first_p99s.setdefault(key, []).append(r["first_latency"][1])
                    drops[key] = drops.get(key, 0) + r["dropped"]
                    short = "" if r["delivered"] == r["expected"] else " (short)"
                    if r["per_wake"] is not None:
                        short += f", {r['per_wake']:.1f} envelopes per receive_batch()"
                    print(
                        f"run {run + 1} {layout:<6} pubs={publishers:<3} node {r['node']}: "
                        f"{r['rate']:>12,.0f} deliveries/s, {r['published']} msgs, "
                        f"{r['delivered']}/{r['expected']} delivered{short}, "
                        f"{r['dropped']} dropped, cpu {r['cpu_s']:.1f}s "
                        f"({r['per_cpu_s']:,.0f} deliveries per cpu s), latency of the last "
                        "member p50/p99/max {:.1f}/{:.1f}/{:.1f} ms".format(*r["latency"])
                        + ", of the first {:.1f}/{:.1f}/{:.1f} ms".format(*r["first_latency"])
                        + f", {r['rss_per_member']:,.0f} B RSS per member",
                        flush=True,
                    )
    print(
        f"\nmedians of {args.runs}; split = {args.members:,} + {args.members:,} members, "
        f"single = {2 * args.members:,}; members drain with {args.api}; "
        f"delivery_batch_delay={'default' if args.delay is None else args.delay}; "
        f"rate {f'{args.rate:g}/s' if args.rate else 'flat out'}"
        f"{'; gc.freeze() after set-up' if args.gc_freeze else ''}; "
        f"Python {sys.version.split()[0]}"
    )
    print(
        f"{'layout':<8} {'pubs':>5} {'node':>5} {'deliveries/s':>14} "
        f"{'per cpu s':>12} {'p99 ms':>8} {'first p99':>10} {'dropped':>8}"
    )
    for (layout, publishers, node), values in sorted(rates.items()):
        median = statistics.median(values)
        key = (layout, publishers, node)
        print(
            f"{layout:<8} {publishers:>5} {node:>5} {median:>14,.0f} "
            f"{statistics.median(per_cpu[key]):>12,.0f} "
            f"{statistics.median(p99s[key]):>8.1f} "
            f"{statistics.median(first_p99s[key]):>10.1f} {drops[key]:>8}"
        )


if __name__ == "__main__":
    main()
