"""One benchmark node process, driven by ``benchmarks/__main__.py`` (not run by hand).

    python benchmarks/_node.py '<json config>'

Runs as a plain script with nothing but the standard library and the library under test, so
the same file serves roomrouter and every peer (broadcaster runs it from its own venv, where
roomrouter is not installed). The coordinator talks to it in lines: the node prints
``{"phase": ...}`` JSON lines on stdout and waits for one line on stdin after each (a barrier
across all nodes: every node is connected before any joins, every node has joined before any
publishes), then prints ``{"result": ...}`` and exits. Everything it measures is in its
process: deliveries (and their publish->deliver latency, from a ``time.time()`` stamp in the
payload), what it received from the broker and how much of that had no local recipient, CPU
seconds and RSS.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import resource
import sys
import time
import uuid
from typing import Any
from urllib.parse import parse_qsl

PAYLOAD_PAD = b" " * 64
#: The checkout this file is in (churn and storage import benchmarks/churn.py, worker.py).
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # a small chat message


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def barrier(phase: str) -> None:
    print(json.dumps({"phase": phase}), flush=True)
    line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    if not line:
        raise SystemExit("coordinator went away")


class Recorder:
    """Deliveries of one node: counted in the window, latencies of all."""

    def __init__(self) -> None:
        self.t_start = 0.0
        self.t_end = float("inf")
        self.in_window = 0
        self.total = 0
        self.latencies: list[float] = []
        self.last = 0.0

    def hit(self, stamp: float) -> None:
        now = time.time()
        self.total += 1
        self.last = now
        if self.t_start <= now <= self.t_end:
            self.in_window += 1
        self.latencies.append(now - stamp)


def stamp() -> bytes:
    return b"%.6f " % time.time() + PAYLOAD_PAD


def unstamp(data: bytes | str) -> float:
    if isinstance(data, str):
        return float(data.split(" ", 1)[0])
    return float(data.split(b" ", 1)[0])


# -- implementations: one small adapter each ---------------------------------------------------
#
# start() connects; join(room) makes one member of room whose deliveries go to rec.hit;
# publish(room) sends one stamped message; received() -> (from broker, irrelevant); close().


class RoomRouterImpl:
    concurrent_join = True

    def __init__(self, cfg: dict[str, Any], rec: Recorder, index: int) -> None:
        self.cfg, self.rec, self.index = cfg, rec, index
        self.tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        from roomrouter import RoomRouter

        self.router = RoomRouter.from_url(
            self.cfg["url"], namespace=self.cfg["namespace"], linger=0.0
        )
        await self.router.start()

    async def join(self, room: str, member_id: str | None = None, task: bool = True) -> Any:
        member = self.router.member(member_id or f"m-{room}")
        await member.join(room)
        if task:
            self.tasks.append(asyncio.create_task(self._consume(member)))
        return member

    async def _consume(self, member: Any) -> None:
        hit = self.rec.hit
        while True:
            envelope = await member.receive()
            hit(unstamp(envelope.payload))

    async def publish(self, room: str) -> None:
        await self.router.publish(room, stamp())

    def received(self) -> tuple[int, int]:
        s = self.router.stats()
        # A backend that drops records by key before decoding (Kafka: other rooms' records in
        # a partition it reads) received them all the same: they count, as irrelevant.
        filtered = s["broker_filtered"]
        irrelevant = s["dropped_echo"] + s["dropped_not_hosted"] + filtered
        return s["broker_received"] + filtered, irrelevant

    async def close(self) -> None:
        for t in self.tasks:
            t.cancel()
        await self.router.aclose()


class SocketIOImpl:
    """python-socketio's AsyncRedisManager / AsyncAioPikaManager behind a real AsyncServer whose
    engine.io send is replaced by the delivery record (no sockets: the managers' cost alone)."""

    def __init__(self, cfg: dict[str, Any], rec: Recorder, index: int) -> None:
        self.cfg, self.rec, self.index = cfg, rec, index
        self.broker_received = 0
        self.relevant = 0
        self.rooms: set[str] = set()

    async def start(self) -> None:
        import socketio

        impl = self
        base = (
            socketio.AsyncRedisManager
            if self.cfg["impl"] == "socketio-redis"
            else socketio.AsyncAioPikaManager
        )

        class Manager(base):  # type: ignore[misc,valid-type]
            async def _listen(self) -> Any:
                async for message in super()._listen():
                    impl.broker_received += 1
                    yield message

            async def _handle_emit(self, message: dict[str, Any]) -> None:
                if message.get("host_id") != self.host_id and message.get("room") in impl.rooms:
                    impl.relevant += 1
                await super()._handle_emit(message)

        class Server(socketio.AsyncServer):  # type: ignore[misc]
            async def _send_eio_packet(self, eio_sid: str, eio_pkt: Any) -> None:
                data = eio_pkt.data  # '2["m","<stamp> ..."]'
                impl.rec.hit(float(data[7:].split(" ", 1)[0]))

        self.manager = Manager(self.cfg["url"], channel=self.cfg["namespace"])
        self.server = Server(client_manager=self.manager, async_mode="asgi")
        self.manager.initialize()
        await asyncio.sleep(0.5)  # the listener task subscribes

    async def join(self, room: str) -> None:
        sid = await self.manager.connect(f"eio-{room}", "/")
        await self.manager.enter_room(sid, "/", room)
        self.rooms.add(room)

    async def publish(self, room: str) -> None:
        await self.server.emit("m", stamp().decode(), to=room)

    def received(self) -> tuple[int, int]:
        return self.broker_received, self.broker_received - self.relevant

    async def close(self) -> None:
        self.manager.thread.cancel()


class BroadcasterImpl:
    """encode/broadcaster 0.3.1: one subscribe() per room (a channel each), no bypass."""

    concurrent_join = True

    def __init__(self, cfg: dict[str, Any], rec: Recorder, index: int) -> None:
        self.cfg, self.rec, self.index = cfg, rec, index
        self.tag = f"n{index} "
        self.broker_received = 0
        self.echoes = 0
        self.tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        from broadcaster import Broadcast

        self.broadcast = Broadcast(self.cfg["url"])
        await self.broadcast.connect()

    async def join(self, room: str) -> None:
        ready = asyncio.Event()
        self.tasks.append(asyncio.create_task(self._consume(self.cfg["namespace"] + room, ready)))
        await ready.wait()

    async def _consume(self, channel: str, ready: asyncio.Event) -> None:
        async with self.broadcast.subscribe(channel=channel) as subscriber:
            ready.set()
            async for event in subscriber:
                self.broker_received += 1
                stamp_, origin = event.message.split(" ", 2)[:2]
                # Its own publishes come back through the broker: the only way its local
                # subscribers get them, so they are deliveries and also echoes it received.
                if origin + " " == self.tag:
                    self.echoes += 1
                self.rec.hit(float(stamp_))

    async def publish(self, room: str) -> None:
        message = f"{time.time():.6f} {self.tag}" + PAYLOAD_PAD.decode()
        await self.broadcast.publish(channel=self.cfg["namespace"] + room, message=message)

    def received(self) -> tuple[int, int]:
        return self.broker_received, self.echoes

    async def close(self) -> None:
        for t in self.tasks:
            t.cancel()
        await self.broadcast.disconnect()


class RawRedisImpl:
    """The ceiling: redis-py, one channel per room, pipelined PUBLISH, one pub/sub reader."""

    def __init__(self, cfg: dict[str, Any], rec: Recorder, index: int) -> None:
        self.cfg, self.rec, self.index = cfg, rec, index
        self.tag = b"n%d" % index
        self.broker_received = 0
        self.echoes = 0
        self.pending: list[tuple[bytes, bytes, asyncio.Future[None]]] = []
        self.flusher: asyncio.Task[None] | None = None

    async def start(self) -> None:
        import redis.asyncio as redis

        self.client = redis.Redis.from_url(self.cfg["url"])
        self.pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        self.rooms: list[bytes] = []

    async def join(self, room: str) -> None:
        channel = (self.cfg["namespace"] + room).encode()
        await self.pubsub.subscribe(channel)

    async def after_join(self) -> None:
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        tag = self.tag
        while True:
            message = await self.pubsub.get_message(timeout=1.0)
            if message is None:
                continue
            self.broker_received += 1
            parts = message["data"].split(b" ", 2)
            if parts[1] == tag:
                self.echoes += 1
            self.rec.hit(float(parts[0]))

    async def publish(self, room: str) -> None:
        # Many publishers share one pipeline: whoever finds it idle flushes what has queued.
        fut = asyncio.get_running_loop().create_future()
        data = b"%.6f %s " % (time.time(), self.tag) + PAYLOAD_PAD
        self.pending.append(((self.cfg["namespace"] + room).encode(), data, fut))
        if self.flusher is None or self.flusher.done():
            self.flusher = asyncio.create_task(self._flush())
        await fut

    async def _flush(self) -> None:
        while self.pending:
            batch, self.pending = self.pending, []
            pipe = self.client.pipeline(transaction=False)
            for channel, data, _ in batch:
                pipe.publish(channel, data)
            await pipe.execute()
            for *_, fut in batch:
                fut.set_result(None)

    def received(self) -> tuple[int, int]:
        return self.broker_received, self.echoes

    async def close(self) -> None:
        self.reader.cancel()
        await self.pubsub.aclose()
        await self.client.aclose()


class RawAioPikaImpl:
    """The ceiling on RabbitMQ: a topic exchange, one exclusive queue per node bound per room,
    publisher confirms (as roomrouter), no_ack consumer."""

    def __init__(self, cfg: dict[str, Any], rec: Recorder, index: int) -> None:
        self.cfg, self.rec, self.index = cfg, rec, index
        self.tag = b"n%d" % index
        self.broker_received = 0
        self.echoes = 0

    async def start(self) -> None:
        import aio_pika

        self.aio_pika = aio_pika
        self.connection = await aio_pika.connect(self.cfg["url"])
        self.channel = await self.connection.channel(publisher_confirms=True)
        self.exchange = await self.channel.declare_exchange(
            self.cfg["namespace"], aio_pika.ExchangeType.TOPIC, auto_delete=True
        )
        self.queue = await self.channel.declare_queue(exclusive=True)

    async def join(self, room: str) -> None:
        await self.queue.bind(self.exchange, routing_key=room)

    async def after_join(self) -> None:
        await self.queue.consume(self._on_message, no_ack=True)

    async def _on_message(self, message: Any) -> None:
        self.broker_received += 1
        parts = message.body.split(b" ", 2)
        if parts[1] == self.tag:
            self.echoes += 1
        self.rec.hit(float(parts[0]))

    async def publish(self, room: str) -> None:
        body = b"%.6f %s " % (time.time(), self.tag) + PAYLOAD_PAD
        await self.exchange.publish(self.aio_pika.Message(body), routing_key=room)

    def received(self) -> tuple[int, int]:
        return self.broker_received, self.echoes

    async def close(self) -> None:
        await self.connection.close()


class RawAioKafkaImpl:
    """The ceiling on Kafka: one topic, key = room, every node reads every partition and keeps
    its rooms (Kafka has no per-key subscription), batched sends."""

    def __init__(self, cfg: dict[str, Any], rec: Recorder, index: int) -> None:
        self.cfg, self.rec, self.index = cfg, rec, index
        self.tag = b"n%d" % index
        self.broker_received = 0
        self.irrelevant = 0
        self.rooms: set[bytes] = set()

    async def start(self) -> None:
        from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
        from aiokafka.admin import AIOKafkaAdminClient, NewTopic

        bootstrap, _, query = self.cfg["url"].removeprefix("kafka://").partition("?")
        self.topic = self.cfg["namespace"]
        # The topic roomrouter's broker makes: as many partitions (its default 16, or the URL's
        # ?partitions=), so both pay the broker's per-partition cost. Left to auto-creation the
        # topic gets Tansu's default of one partition, and a 16-partition roomrouter measured
        # against that ran at ~0.4x; with ?partitions=1 on both it ran at ~1.0x.
        partitions = int(dict(parse_qsl(query)).get("partitions", 16))
        # Every node asks before its own clients start (one wins, the others hear "exists"),
        # so no consumer auto-creates it first.
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(self.topic, partitions, 1)])
        finally:
            await admin.close()
        self.producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=1)
        await self.producer.start()
        self.consumer = AIOKafkaConsumer(
            self.topic, bootstrap_servers=bootstrap, auto_offset_reset="latest",
            group_id=None,
        )  # fmt: skip
        await self.consumer.start()
        while not self.consumer.assignment():
            await self.consumer.getmany(timeout_ms=100)

    async def join(self, room: str) -> None:
        self.rooms.add(room.encode())

    async def after_join(self) -> None:
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        while True:
            batches = await self.consumer.getmany(timeout_ms=200, max_records=5000)
            for records in batches.values():
                for record in records:
                    self.broker_received += 1
                    parts = record.value.split(b" ", 2)
                    if parts[1] == self.tag or record.key not in self.rooms:
                        self.irrelevant += 1
                    if record.key in self.rooms:
                        self.rec.hit(float(parts[0]))

    async def publish(self, room: str) -> None:
        body = b"%.6f %s " % (time.time(), self.tag) + PAYLOAD_PAD
        await (await self.producer.send(self.topic, body, key=room.encode()))

    def received(self) -> tuple[int, int]:
        return self.broker_received, self.irrelevant

    async def close(self) -> None:
        self.reader.cancel()
        await self.consumer.stop()
        await self.producer.stop()


IMPLS: dict[str, Any] = {
    "roomrouter": RoomRouterImpl,
    "socketio-redis": SocketIOImpl,
    "socketio-aiopika": SocketIOImpl,
    "broadcaster": BroadcasterImpl,
    "raw-redis": RawRedisImpl,
    "raw-aiopika": RawAioPikaImpl,
    "raw-aiokafka": RawAioKafkaImpl,
}


# -- workloads -----------------------------------------------------------------------------------


async def publishers(impls: list[Any], rooms_of: list[list[str]], cfg: dict[str, Any]) -> int:
    """Publish until the window closes or the count bound is hit; return how many were sent."""
    sent = 0
    deadline = time.monotonic() + cfg["seconds"]
    limit = cfg["max_messages"]
    tasks = cfg["concurrency"] if cfg["pacing"] == "concurrent" else 1

    async def loop(impl: Any, rooms: list[str], offset: int) -> None:
        nonlocal sent
        i = offset
        mine = 0
        while time.monotonic() < deadline and sent < limit:
            await impl.publish(rooms[i % len(rooms)])
            sent += 1
            i += tasks
            mine += 1
            if mine % 16 == 0:
                # A publish served without I/O (memory broker, local bypass) never yields on
                # its own: let the members (and the other publishers) run.
                await asyncio.sleep(0)

    async with asyncio.TaskGroup() as tg:
        for impl, rooms in zip(impls, rooms_of, strict=True):
            for t in range(tasks):
                tg.create_task(loop(impl, rooms, t))
    return sent


async def settle(rec: Recorder, quiet: float = 0.5, cap: float = 5.0) -> None:
    """Wait for stragglers: until nothing arrived for ``quiet`` s, at most ``cap`` s."""
    end = time.time() + cap
    while time.time() < end and time.time() - rec.last < quiet:
        await asyncio.sleep(0.05)


async def lecture(cfg: dict[str, Any]) -> dict[str, Any]:
    """R rooms, room i on nodes i, i+1, ... (k of N); each node publishes to its rooms."""
    rec = Recorder()
    n, k = cfg["nodes"], cfg["k"]
    indices = cfg["indices"]
    impls = [IMPLS[cfg["impl"]](cfg, rec, i) for i in indices]
    await barrier("connect")
    for impl in impls:
        await impl.start()
    await barrier("started")
    rooms_of = []
    for impl, i in zip(impls, indices, strict=True):
        mine = [f"r{r}" for r in range(cfg["rooms"]) if (i - r) % n < k]
        rooms_of.append(mine)
        if getattr(impl, "concurrent_join", False):
            # As an app server's clients do: many joins in flight (Kafka's are slow alone).
            sem = asyncio.Semaphore(64)

            async def one(impl: Any, room: str, sem: asyncio.Semaphore = sem) -> None:
                async with sem:
                    await impl.join(room)

            async with asyncio.TaskGroup() as tg:
                for room in mine:
                    tg.create_task(one(impl, room))
        else:
            for room in mine:
                await impl.join(room)
        if hasattr(impl, "after_join"):
            await impl.after_join()
    await barrier("joined")
    before = [impl.received() for impl in impls]
    cpu0 = cpu_seconds()
    rec.t_start = time.time()
    rec.t_end = rec.t_start + cfg["seconds"]
    sent = await publishers(impls, rooms_of, cfg)
    await settle(rec)
    cpu = cpu_seconds() - cpu0
    received = [tuple(a - b for a, b in zip(impl.received(), b0, strict=True))
                for impl, b0 in zip(impls, before, strict=True)]  # fmt: skip
    broker_received = sum(r[0] for r in received)
    irrelevant = sum(r[1] for r in received)
    for impl in impls:
        try:
            await impl.close()
        except Exception as exc:  # measured already: a peer's shutdown bug is not ours
            print(f"close: {exc!r}", file=sys.stderr)
    return {
        "published": sent,
        "delivered": rec.in_window,
        "delivered_total": rec.total,
        "broker_received": broker_received,
        "irrelevant": irrelevant,
        "cpu_s": round(cpu, 3),
        "rss_mb": round(rss_bytes() / 2**20, 1),
        # A uniform sample: the coordinator merges the nodes' into one distribution.
        "latencies": random.sample(rec.latencies, min(len(rec.latencies), 20_000)),
    }


async def bigroom(cfg: dict[str, Any]) -> dict[str, Any]:
    """One room, ``members`` members on this node; node 0 publishes (one loop)."""
    rec = Recorder()
    index = cfg["indices"][0]
    impl = RoomRouterImpl(cfg, rec, index)
    await barrier("connect")
    await impl.start()
    await barrier("started")
    counter = [0]
    last = [0.0]

    async def consume(member: Any) -> None:
        monotonic = time.monotonic
        while True:
            await member.receive()
            counter[0] += 1
            last[0] = monotonic()

    rss0 = rss_bytes()
    t0 = time.perf_counter()
    tasks = []
    first = await impl.join("big", "m0", task=False)
    for m in range(1, cfg["members"]):
        member = impl.router.member(f"m{m}")
        await member.join("big")
        tasks.append(asyncio.create_task(consume(member)))
    tasks.append(asyncio.create_task(consume(first)))
    join_s = time.perf_counter() - t0
    await asyncio.sleep(0.2)
    rss_per_member = (rss_bytes() - rss0) / cfg["members"]
    await barrier("joined")
    cpu0 = cpu_seconds()
    start = time.monotonic()
    end = start + cfg["seconds"]
    base = counter[0]
    sent = 0
    if index == 0:
        # Bursts of 64 concurrent publishes (well inside the 1024-envelope inboxes): a busy
        # room, where a member task woken once drains several envelopes.
        publish = impl.router.publish
        while time.monotonic() < end and sent < cfg["max_messages"]:
            await asyncio.gather(*(publish("big", stamp()) for _ in range(64)))
            sent += 64
            await asyncio.sleep(0)
    else:
        await asyncio.sleep(cfg["seconds"])
    published_s = time.monotonic() - start
    # Everything published in the window, delivered: until nothing arrived for 0.3 s. The
    # rate is over the time that took (a burst is 64 x members deliveries: a fixed window
    # would count whole bursts or none).
    cap = time.monotonic() + 5.0
    while time.monotonic() < cap and time.monotonic() - max(last[0], start) < 0.3:
        await asyncio.sleep(0.05)
    deliveries = counter[0] - base
    elapsed = max(last[0] - start, 1e-9)
    cpu = cpu_seconds() - cpu0
    for t in tasks:
        t.cancel()
    await impl.close()
    return {
        "published": sent,
        "published_s": round(published_s, 3),
        "deliveries": deliveries,
        "elapsed_s": round(elapsed, 3),
        "join_s": round(join_s, 3),
        "rss_per_member_b": round(rss_per_member),
        "cpu_s": round(cpu, 3),
    }


async def churn(cfg: dict[str, Any]) -> dict[str, Any]:
    """benchmarks/churn.py's run(), on the first node, with the others in the cluster."""
    import argparse

    sys.path.insert(0, REPO)
    from benchmarks import churn as churn_mod

    await barrier("connect")
    await barrier("started")
    await barrier("joined")
    args = argparse.Namespace(
        nodes=cfg["nodes"], tasks=cfg["tasks"], seconds=cfg["seconds"], linger=cfg["linger"],
        settle=cfg["settle"], redis_url=cfg["url"],
    )  # fmt: skip
    name = "memory" if cfg["url"].startswith("memory") else "redis"
    return dict(await churn_mod.run(name, args))


async def scale(cfg: dict[str, Any]) -> dict[str, Any]:
    """Join ``rooms`` rooms (one member each) on one node: the time and the RSS it costs."""
    rec = Recorder()
    impl = RoomRouterImpl(cfg, rec, 0)
    await barrier("connect")
    await impl.start()
    await barrier("started")
    await barrier("joined")
    rss0 = rss_bytes()
    t0 = time.perf_counter()
    member = impl.router.member("m")
    sem = asyncio.Semaphore(256)

    async def one(room: str) -> None:
        async with sem:
            await member.join(room)

    async with asyncio.TaskGroup() as tg:
        for r in range(cfg["rooms"]):
            tg.create_task(one(f"s{r}"))
    join_s = time.perf_counter() - t0
    rss = rss_bytes() - rss0
    subscribed = len(impl.router.subscribed_rooms)
    await impl.close()
    return {
        "join_s": round(join_s, 3),
        "joins_per_s": round(cfg["rooms"] / join_s),
        "rss_mb": round(rss / 2**20, 1),
        "rss_per_room_b": round(rss / cfg["rooms"]),
        "subscribed": subscribed,
    }


async def storage(cfg: dict[str, Any]) -> dict[str, Any]:
    """benchmarks/worker.py's run_one() for one backend and sink."""
    import argparse
    import tempfile

    sys.path.insert(0, REPO)
    from benchmarks import worker as worker_mod

    await barrier("connect")
    await barrier("started")
    await barrier("joined")
    with tempfile.TemporaryDirectory() as tmp:
        urls = {"redis": "redis_url", "rabbitmq": "amqp_url", "kafka": "kafka_url"}
        args = argparse.Namespace(
            n=cfg["n"], batch=cfg["batch"], workers=cfg["workers"], tmp=tmp,
            redis_url=cfg["url"], amqp_url=cfg["url"], kafka_url=cfg["url"],
            postgres_url=cfg["postgres_url"],
        )  # fmt: skip
        assert cfg["backend"] in urls
        rate, working = await worker_mod.run_one(cfg["backend"], cfg["sink"], args)
    return {"msg_per_s": round(rate), "workers_busy": working}


WORKLOADS = {
    "lecture": lecture,
    "bigroom": bigroom,
    "churn": churn,
    "scale": scale,
    "storage": storage,
}


def versions(impl: str, uvloop: bool) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    names = {
        "roomrouter": ["roomrouter", "redis", "aio-pika", "aiokafka"],
        "socketio-redis": ["python-socketio", "redis"],
        "socketio-aiopika": ["python-socketio", "aio-pika"],
        "broadcaster": ["broadcaster", "redis"],
        "raw-redis": ["redis", "hiredis"],
        "raw-aiopika": ["aio-pika"],
        "raw-aiokafka": ["aiokafka"],
    }.get(impl, ["roomrouter"])
    if uvloop:
        names = [*names, "uvloop"]
    found = {}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    found["python"] = sys.version.split()[0]
    return found


def main() -> None:
    cfg = json.loads(sys.argv[1])
    cfg.setdefault("namespace", "b" + uuid.uuid4().hex[:10])
    workload = WORKLOADS[cfg["workload"]](cfg)
    if cfg.get("uvloop"):
        import uvloop

        result = uvloop.run(workload)
    else:
        result = asyncio.run(workload)
    result["versions"] = versions(cfg["impl"], bool(cfg.get("uvloop")))
    print(json.dumps({"result": result}), flush=True)


if __name__ == "__main__":
    main()
