"""examples/lecture as it is deployed: node processes (python-socketio on roomrouter's
``AsyncServer``, connection state recovery on) on RabbitMQ, presence and sessions on Redis,
and a ``roomrouter worker`` process writing into MariaDB; python-socketio clients post, the
history endpoint pages, the rows land in MySQL once, and a room's state goes with its last
member. Needs the real services (skipped locally without one, a failure under CI).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any
from urllib.parse import quote

import anyio
import pytest
import socketio

from roomrouter.brokers.rabbitmq import amqp_name, routing_key
from roomrouter.brokers.redis import key_prefix
from roomrouter.integrations.socketio import RoomRouterManager
from roomrouter.storage import MAX_HISTORY_LIMIT

from .backends import BACKENDS, require_tcp
from .conftest import unique_namespace
from .helpers import eventually
from .ports import free_port
from .storage.conftest import mysql_fetch, mysql_prefix, mysql_url  # noqa: F401 - fixtures

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).parents[1]
SERVER = ROOT / "examples" / "lecture" / "server.py"
RABBITMQ = "amqp://guest:guest@127.0.0.1:5672/"
REDIS = "redis://127.0.0.1:6379/0"
#: The recovery window of the nodes in these tests (seconds).
WINDOW = 60


def _check(condition: object, what: str = "") -> None:
    assert condition, what


async def http_get(url: str) -> tuple[int, Any]:
    """GET ``url``: its status and decoded JSON body (errors included)."""

    def get() -> tuple[int, Any]:
        try:
            with urllib.request.urlopen(url, timeout=10) as answer:
                return answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    return await anyio.to_thread.run_sync(get)


class Lecture:
    """One deployment of the example: node processes and worker processes of one namespace,
    their output in ``tmp`` (shown when a start fails), stopped with SIGTERM at the end."""

    def __init__(self, stack: AsyncExitStack, tmp: Path, namespace: str, sink: str) -> None:
        self.stack, self.tmp, self.namespace, self.sink = stack, tmp, namespace, sink
        self.processes: list[subprocess.Popen[bytes]] = []

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.tmp / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        self.processes.append(process)

        async def stop() -> None:
            if process.poll() is None:
                process.terminate()
                try:
                    await anyio.to_thread.run_sync(process.wait, 15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    await anyio.to_thread.run_sync(process.wait)
            log.close()

        self.stack.push_async_callback(stop)
        return process

    def output(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")

    async def node(self, name: str) -> str:
        """Start a node process; return its base URL once it serves (it is in the cluster
        before it listens)."""
        port = free_port()
        process = self._spawn(
            name,
            [
                sys.executable,
                str(SERVER),
                "--port",
                str(port),
                "--broker",
                RABBITMQ,
                "--presence",
                REDIS,
                "--sink",
                self.sink,
                "--namespace",
                self.namespace,
                "--window",
                str(WINDOW),
            ],
        )
        url = f"http://127.0.0.1:{port}"

        async def serving() -> None:
            assert process.poll() is None, f"node {name} exited:\n{self.output(name)}"
            try:
                await anyio.to_thread.run_sync(
                    lambda: urllib.request.urlopen(url + "/", timeout=2).close()
                )
            except OSError as exc:
                raise AssertionError(f"node {name} not serving yet: {exc}") from None

        await eventually(serving, timeout=30, interval=0.1)
        return url

    def worker(self, name: str = "worker") -> subprocess.Popen[bytes]:
        """Start ``roomrouter worker`` on the namespace's storage queue into the sink."""
        return self._spawn(
            name,
            [
                sys.executable,
                "-c",
                "import sys; from roomrouter.cli import main; sys.exit(main())",
                "worker",
                "--broker",
                RABBITMQ,
                "--namespace",
                self.namespace,
                "--sink",
                self.sink,
                "--max-delay",
                "0.05",
            ],
        )


async def cleanup_services(namespace: str) -> None:
    """Remove what the namespace left in RabbitMQ (queues, exchanges) and Redis (keys)."""
    import redis.asyncio

    await BACKENDS["rabbitmq"](namespace).cleanup()
    client = redis.asyncio.Redis.from_url(REDIS)
    try:
        pattern = key_prefix(namespace).replace(b"{", b"\\{").replace(b"}", b"\\}") + b"*"
        keys = [key async for key in client.scan_iter(match=pattern, count=1000)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@pytest.fixture
async def lecture(
    tmp_path: Path,
    mysql_prefix: str,  # noqa: F811 - the fixture
) -> AsyncIterator[Lecture]:
    """A deployment on RabbitMQ, Redis and MariaDB (its own namespace and tables)."""
    require_tcp("127.0.0.1", 5672, "RabbitMQ")
    require_tcp("127.0.0.1", 15672, "RabbitMQ management API (rabbitmq_management plugin)")
    require_tcp("127.0.0.1", 6379, "Redis")
    namespace = unique_namespace()
    sink = f"mysql://root@127.0.0.1:3306/test?table_prefix={mysql_prefix}"
    try:
        async with AsyncExitStack() as stack:
            yield Lecture(stack, tmp_path, namespace, sink)
    finally:
        await cleanup_services(namespace)


class Client:
    """A python-socketio client of one node, recording the ``message`` events it got as
    ``(id, text)``: the id is the offset, the event's last argument."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.sio = socketio.AsyncClient()
        self.got: list[tuple[str, str]] = []

        @self.sio.on("message")
        async def message(data: dict[str, Any], *rest: Any) -> None:
            assert len(rest) == 1 and isinstance(rest[0], str), rest
            self.got.append((rest[0], data["text"]))

    async def __aenter__(self) -> Client:
        await self.sio.connect(self.url, transports=["websocket"], wait_timeout=10)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.sio.disconnect()

    async def join(self, room: str, name: str, after: str | None = None) -> dict[str, Any]:
        reply = await self.sio.call("join", {"room": room, "name": name, "after": after})
        assert "error" not in reply, reply
        return dict(reply)

    async def say(self, text: str) -> None:
        assert await self.sio.call("say", text) == {"ok": True}


async def history(url: str, room: str, **query: object) -> dict[str, Any]:
    status, body = await http_get(
        f"{url}/rooms/{quote(room, safe='')}/messages?{urllib.parse.urlencode(query)}"
    )
    assert status == 200, (status, body)
    return dict(body)


async def stored_ids(prefix: str, room: str) -> list[tuple[str, int]]:
    rows = await mysql_fetch(
        f"SELECT id, COUNT(*) FROM {prefix}_messages WHERE room = %s GROUP BY id ORDER BY id",
        RoomRouterManager.room_name("/", room).encode(),
    )
    return [(bytes(i).decode() if isinstance(i, bytes | bytearray) else i, n) for i, n in rows]


async def test_posts_are_paged_by_the_history_endpoint_and_stored_once_in_mysql(
    lecture: Lecture,
    mysql_prefix: str,  # noqa: F811 - the fixture
) -> None:
    """Two nodes, two workers: 30 posts from clients of both nodes at once reach both clients
    with their ids; the history endpoint of either node pages them exactly (``before``,
    ``limit``, id order, ``more``); MySQL holds each one once."""
    a, b = await lecture.node("a"), await lecture.node("b")
    lecture.worker("worker1")
    lecture.worker("worker2")  # competing consumers
    room = "hall 1/é"  # a slash and a non-ASCII letter in the path
    async with Client(a) as alice, Client(b) as bob:
        assert (await alice.join(room, "alice"))["missed"] == []
        joined = await bob.join(room, "bob")
        assert joined["here"] == 2  # both clients, on two nodes, in Redis presence
        async with anyio.create_task_group() as tg:
            for client, name in ((alice, "a"), (bob, "b")):

                async def post(client: Client = client, name: str = name) -> None:
                    for i in range(15):
                        await client.say(f"{name}{i}")

                tg.start_soon(post)
        await eventually(lambda: _check(len(alice.got) == len(bob.got) == 30), timeout=10)
    sent = sorted(alice.got)
    assert sorted(bob.got) == sent and len({i for i, _ in sent}) == 30
    for name in "ab":  # each node's posts in the order they were made
        assert [t for _, t in sent if t[0] == name] == [f"{name}{i}" for i in range(15)]

    for url in (a, b):
        pages, before = [], None
        for expect_more in (True, True, False):
            query: dict[str, object] = {"limit": 12}
            if before is not None:
                query["before"] = before
            page = await history(url, room, **query)
            assert page["more"] is expect_more
            pages[:0] = page["messages"]
            before = page["messages"][0]["id"]
        assert [(m["id"], m["text"]) for m in pages] == sent
        assert all(m["event"] == "message" and m["name"] in ("alice", "bob") for m in pages)
        page = await history(url, room, limit=5, before=sent[10][0])
        assert [m["id"] for m in page["messages"]] == [i for i, _ in sent[5:10]]
        assert (await history(url, room, limit=1000))["messages"] == pages
        assert (await history(url, "no such room"))["messages"] == []
    for bad in ("limit=0", "limit=1001", "limit=x"):
        status, body = await http_get(f"{a}/rooms/r/messages?{bad}")
        assert status == 400 and "limit" in body["error"]
    assert (await http_get(f"{a}/rooms/r"))[0] == 404
    assert (await http_get(f"{a}/rooms/%ff/messages"))[0] == 400  # not UTF-8
    status, body = await http_get(f"{a}/rooms/{'x' * 2000}/messages")
    assert status == 400 and "limit" in body["error"]  # too long a room name

    async def all_stored() -> None:
        assert await stored_ids(mysql_prefix, room) == [(i, 1) for i, _ in sent]

    await eventually(all_stored, timeout=15, interval=0.2)
    assert await mysql_fetch(f"SELECT COUNT(*) FROM {mysql_prefix}_dead_letters") == [(0,)]


async def test_a_join_after_the_history_read_catches_up_and_duplicates_are_dropped_by_id(
    lecture: Lecture,
) -> None:
    """The page's sequence, while the other node keeps posting: the history read, then the
    join with ``after`` = its newest id (whose ack holds what came in between), then live.
    De-duplicated by id, the three give every message once; in id order, each node's in
    its order; nothing before the history's page is missing."""
    a, b = await lecture.node("a"), await lecture.node("b")
    room = "overlap"
    posted: list[str] = []
    async with Client(b) as bob, Client(a) as alice:
        await bob.join(room, "bob")
        for i in range(20):
            await bob.say(f"early {i}")
            posted.append(f"early {i}")
        stop = anyio.Event()

        async def keep_posting() -> None:
            i = 0
            while not stop.is_set():
                await bob.say(f"during {i}")
                posted.append(f"during {i}")
                i += 1

        async with anyio.create_task_group() as tg:
            tg.start_soon(keep_posting)
            await anyio.sleep(0.2)
            page = await history(a, room, limit=10)
            await anyio.sleep(0.2)  # posts between the history read and the join
            joined = await alice.join(room, "alice", after=page["messages"][-1]["id"])
            await anyio.sleep(0.3)  # and live ones
            stop.set()
        await eventually(lambda: _check(len(bob.got) == len(posted)), timeout=10)
        await eventually(lambda: _check(alice.got and alice.got[-1] == bob.got[-1]), timeout=10)
    seen: dict[str, str] = {}
    for m in [*page["messages"], *joined["missed"]]:
        seen.setdefault(m["id"], m["text"])
    for i, text in alice.got:
        seen.setdefault(i, text)
    shown = [seen[i] for i in sorted(seen)]
    assert joined["missed"], "no post landed between the history read and the join"
    first = posted.index(page["messages"][0]["text"])
    assert shown == posted[first:]  # every message once, in order, none missing
    assert [t for _, t in sorted(bob.got)] == posted


async def presence_of(namespace: str, room: str) -> dict[bytes, bytes]:
    """The Redis presence hash of a Socket.IO room (``p:<room>``, docs/architecture.md)."""
    import redis.asyncio

    client = redis.asyncio.Redis.from_url(REDIS)
    try:
        key = key_prefix(namespace) + b"p:" + RoomRouterManager.room_name("/", room).encode()
        return dict(await client.hgetall(key))
    finally:
        await client.aclose()


async def bound_queues(namespace: str, room: str) -> list[str]:
    """The queues bound to the namespace's data exchange for a Socket.IO room, as RabbitMQ's
    management API lists them."""
    from roomrouter.brokers.rabbitmq import RabbitMQBroker

    exchange = amqp_name(namespace, "data", exchange=True)
    key = routing_key(RoomRouterManager.room_name("/", room))
    bindings = await RabbitMQBroker(RABBITMQ).management_request(
        f"/api/exchanges/%2F/{quote(exchange, safe='')}/bindings/source"
    )
    return sorted(b["destination"] for b in bindings if b.get("routing_key") == key)


async def test_room_state_is_gone_when_the_last_member_leaves(lecture: Lecture) -> None:
    """Presence entries (Redis) and broker subscriptions (RabbitMQ bindings) of a room
    exist while it has members, per node, and are gone once the last one left: one by
    ``leave``, the last by disconnecting."""
    a, b = await lecture.node("a"), await lecture.node("b")
    ns, room = lecture.namespace, "ephemeral"
    async with Client(a) as alice:
        async with Client(b) as bob:
            await alice.join(room, "alice")
            await bob.join(room, "bob")
            entries = await presence_of(ns, room)
            assert sorted(k.decode() for k in entries) == sorted(
                [alice.sio.get_sid(), bob.sio.get_sid()]
            )
            assert len(await bound_queues(ns, room)) == 2  # one queue per node
            assert (await alice.sio.call("leave")) == {"left": room}

            async def alice_left() -> None:
                assert list(await presence_of(ns, room)) == [bob.sio.get_sid().encode()]
                assert len(await bound_queues(ns, room)) == 1

            await eventually(alice_left, timeout=10, interval=0.2)
            bob_sid = bob.sio.get_sid()
        # bob disconnected: the room has no member left anywhere.

        async def gone() -> None:
            assert await presence_of(ns, room) == {}
            assert await bound_queues(ns, room) == []
            assert await bound_queues(ns, bob_sid) == []  # its sid room too

        await eventually(gone, timeout=10, interval=0.2)
        assert len(await bound_queues(ns, alice.sio.get_sid())) == 1  # still connected: a control


async def test_a_node_that_cannot_reach_its_broker_says_so_in_one_line(tmp_path: Path) -> None:
    port = free_port()
    result = await anyio.run_process(
        [
            sys.executable,
            str(SERVER),
            "--port",
            str(port),
            "--broker",
            "amqp://guest:secret-pw@127.0.0.1:1/",
            "--sink",
            f"sqlite:///{tmp_path / 'l.db'}",
            "--presence",
            "memory://",
        ],
        check=False,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    err = result.stderr.decode().strip()
    assert result.returncode == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("lecture: cannot start:"), err
    assert "secret-pw" not in err


async def test_async_server_history_reads_emits_back_by_their_offsets(tmp_path: Path) -> None:
    """``AsyncServer.history`` (what the example's endpoint serves), in one process on the
    memory backend with an SQLite sink nobody writes (so the recent cache answers): each
    emit once under the offset its clients get, an emit to several rooms in each of them,
    ``before``/``after``/``limit`` exact, emits with a callback left out, bad arguments
    refused; without connection state recovery nothing is persisted, so it refuses."""
    from roomrouter import ConfigurationError
    from roomrouter.integrations.socketio import AsyncServer

    manager = RoomRouterManager(
        f"memory://lecture-{unique_namespace()}",
        namespace="history",
        sink=f"sqlite:///{tmp_path / 'h.db'}",
    )
    sio = AsyncServer(client_manager=manager, connection_state_recovery={})
    try:
        for i in range(6):
            await sio.emit("m", {"i": i}, to="r1")
            await sio.emit("both", i, to=["r1", "r2"])
        stored = await sio.history("r1", limit=100)
        assert [(e.event, e.args) for e in stored] == [
            (event, [arg]) for i in range(6) for event, arg in (("m", {"i": i}), ("both", i))
        ]
        ids = [e.id for e in stored]
        assert ids == sorted(ids) and len(set(ids)) == 12
        in_r2 = await sio.history("r2", limit=100)
        assert [(e.id, e.args) for e in in_r2] == [(e.id, e.args) for e in stored[1::2]]
        # Pages: ``before`` an offset of a multi-room emit (whose r1 envelope id is below it)
        # does not give that emit again.
        assert await sio.history("r1", before=ids[5], limit=3) == stored[2:5]
        assert await sio.history("r1", before=ids[1], limit=3) == stored[:1]
        assert await sio.history("r1", after=ids[5], limit=4) == stored[6:10]
        assert await sio.history("r1", after=ids[-1]) == []
        assert (await sio.history("r1", limit=2)) == stored[-2:]
        assert (await sio.history("r1", limit=MAX_HISTORY_LIMIT)) == stored
        too_many = {"limit": MAX_HISTORY_LIMIT + 1}
        for bad in ({"limit": 0}, too_many, {"before": ids[0], "after": ids[0]}):
            with pytest.raises(ConfigurationError):
                await sio.history("r1", **bad)  # type: ignore[arg-type]
    finally:
        await sio.shutdown()
    plain = AsyncServer(client_manager=RoomRouterManager("memory://", namespace="plain"))
    with pytest.raises(ConfigurationError, match="connection_state_recovery"):
        await plain.history("r1")
