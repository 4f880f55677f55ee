"""RabbitMQ-specific behaviour: literal room names over a topic exchange, bindings as RabbitMQ
reports them, publisher confirms, and recovery from connections closed or cut under the node.

Faults are injected two ways, both on 127.0.0.1 only: the server closes a node's connections
(``rabbitmqctl close_connection`` / ``close_all_connections``), and a small TCP proxy between
node and broker cuts or black-holes the traffic.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

import aiormq
import anyio
import anyio.abc
import pytest

from roomrouter import (
    BrokerUnavailable,
    ConfigurationError,
    Envelope,
    PublishOutcomeUnknown,
    RoomRouter,
)
from roomrouter._envelope import encode_envelope
from roomrouter.brokers.rabbitmq import RabbitMQBroker, routing_key
from roomrouter.brokers.rabbitmq._names import room_of_key
from roomrouter.brokers.rabbitmq._wire import persistent_properties, publish_frames

from .backends import RabbitMQBackend
from .conftest import TEST_ROUTER_OPTIONS, unique_namespace
from .helpers import drain, eventually, receive_n
from .ports import free_port

pytestmark = pytest.mark.anyio

AMQP = "amqp://guest:guest@127.0.0.1:5672/"
NodeFactory = Callable[..., Awaitable[list[RoomRouter]]]


@pytest.fixture
async def rabbit() -> AsyncIterator[RabbitMQBackend]:
    backend = RabbitMQBackend(unique_namespace())
    backend.available()
    try:
        yield backend
    finally:
        await backend.cleanup()


@pytest.fixture
async def nodes(rabbit: RabbitMQBackend) -> AsyncIterator[NodeFactory]:
    """``await nodes(3, url=..., **router_options)``: routers of the test's namespace."""
    async with AsyncExitStack() as stack:

        async def start(count: int = 3, url: str = AMQP, **options: Any) -> list[RoomRouter]:
            opts = {**TEST_ROUTER_OPTIONS, **rabbit.router_options, **options}
            return [
                await stack.enter_async_context(
                    RoomRouter(RabbitMQBroker.from_url(url), namespace=rabbit.namespace, **opts)
                )
                for _ in range(count)
            ]

        yield start


def _broker(router: RoomRouter) -> RabbitMQBroker:
    assert isinstance(router.broker, RabbitMQBroker)
    return router.broker


def _publisher_channel(router: RoomRouter) -> object:
    publisher = _broker(router)._publisher
    assert publisher is not None
    return publisher.channel


async def _queue_bindings(router: RoomRouter) -> list[dict[str, Any]]:
    broker = _broker(router)
    bindings: list[dict[str, Any]] = await broker.management_request(
        f"/api/queues/%2F/{broker.queue_name}/bindings"
    )
    return bindings


async def _data_keys(router: RoomRouter) -> list[str]:
    broker = _broker(router)
    return [
        b["routing_key"]
        for b in await _queue_bindings(router)
        if b["source"] == broker.data_exchange
    ]


async def _bindings_match(routers: list[RoomRouter]) -> None:
    for router in routers:
        assert await router.broker.broker_subscriptions() == router.local_rooms, router


# -- fault injection ------------------------------------------------------------------------------


def _rabbitmqctl() -> str:
    path = shutil.which("rabbitmqctl")
    if path is None or os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("CI needs rabbitmqctl (as root) for the server-side fault tests")
        pytest.skip("rabbitmqctl (as root) is needed to close connections from the server")
    return path


async def _server_close(ctl: str, connection_names: set[str] | None) -> int:
    """Close, from the server, the connections whose client-given name is in the set (all of
    them if ``None``); return how many were closed."""
    if connection_names is None:
        await anyio.run_process([ctl, "close_all_connections", "roomrouter test"])
        return -1
    listing = await anyio.run_process(
        [ctl, "list_connections", "-q", "--no-table-headers", "pid", "client_properties"]
    )
    closed = 0
    for line in listing.stdout.decode().splitlines():
        pid, _, properties = line.partition("\t")
        match = re.search(r'\{"connection_name","(.*?)"\}', properties)
        if match and match.group(1) in connection_names:
            await anyio.run_process([ctl, "close_connection", pid, "roomrouter test"])
            closed += 1
    return closed


class TcpProxy:
    """Forwards a loopback port to RabbitMQ. ``cut()`` closes every connection and refuses new
    ones; ``blackhole()`` keeps connections open but silently drops all bytes; ``restore()``
    lets traffic through again (after dropping the connections a black hole corrupted)."""

    def __init__(self, upstream: tuple[str, int] = ("127.0.0.1", 5672)) -> None:
        self.upstream = upstream
        self.state = "up"
        self._scopes: set[anyio.CancelScope] = set()
        self.port = 0

    async def start(self, tg: anyio.abc.TaskGroup) -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        self.port = listener.extra(anyio.abc.SocketAttribute.local_port)
        tg.start_soon(self._serve, listener)

    async def _serve(self, listener: anyio.abc.SocketListener) -> None:
        async with listener:
            await listener.serve(self._handle)

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def cut(self) -> None:
        self.state = "down"
        self._drop_all()

    def blackhole(self) -> None:
        self.state = "blackhole"

    def restore(self) -> None:
        was = self.state
        self.state = "up"
        if was == "blackhole":
            self._drop_all()

    def _drop_all(self) -> None:
        for scope in list(self._scopes):
            scope.cancel()

    async def _handle(self, client: anyio.abc.SocketStream) -> None:
        try:
            async with client:
                if self.state != "up":
                    return
                upstream = await anyio.connect_tcp(*self.upstream)
                with anyio.CancelScope() as scope:
                    self._scopes.add(scope)
                    try:
                        async with upstream, anyio.create_task_group() as tg:
                            tg.start_soon(self._pipe, client, upstream, tg.cancel_scope)
                            tg.start_soon(self._pipe, upstream, client, tg.cancel_scope)
                    finally:
                        self._scopes.discard(scope)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass

    async def _pipe(
        self,
        source: anyio.abc.SocketStream,
        sink: anyio.abc.SocketStream,
        both: anyio.CancelScope,
    ) -> None:
        try:
            async for chunk in source:
                if self.state == "up":
                    await sink.send(chunk)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass
        both.cancel()


@pytest.fixture
async def proxy() -> AsyncIterator[TcpProxy]:
    async with anyio.create_task_group() as tg:
        instance = TcpProxy()
        await instance.start(tg)
        yield instance
        tg.cancel_scope.cancel()


# -- the aiormq adapter ---------------------------------------------------------------------------


def test_the_aiormq_adapter_refuses_an_unchecked_aiormq_version() -> None:
    """The backend writes on aiormq internals read in 7.x: importing it next to another aiormq
    is a clear configuration error naming the supported range, not a corrupted publish path."""
    from roomrouter.brokers.rabbitmq import _aiormq

    _aiormq.check_version("7.2.4")
    _aiormq.check_version("7.9")
    for version in ("8.0.0", "7.1.9", "6.8.1", "nonsense"):
        with pytest.raises(ConfigurationError, match=re.escape(f"aiormq {_aiormq.SUPPORTED}")):
            _aiormq.check_version(version)
    # And at import: a fresh interpreter whose aiormq says 8.0.0.
    code = (
        "import importlib.metadata as m\n"
        "real = m.version\n"
        "m.version = lambda name: '8.0.0' if name == 'aiormq' else real(name)\n"
        "from roomrouter import ConfigurationError\n"
        "try:\n"
        "    import roomrouter.brokers.rabbitmq\n"
        "except ConfigurationError as exc:\n"
        "    print('refused:', exc)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.startswith("refused: the RabbitMQ backend supports aiormq >=7.2,<8"), (
        result.stdout + result.stderr
    )


# -- routing keys ---------------------------------------------------------------------------------

SPECIAL = [
    "a.b",
    "*",
    "#",
    "a.*.c",
    "a.x.c",  # what a.*.c would match as a pattern
    "a",
    "b",  # what a.b would split into
    "x" * 1000,
    "x" * 999 + "y",  # same 200-byte prefix: only the hash tells them apart
    "ü-räum 日本 🎉",
    "日" * 600,  # 1800 UTF-8 bytes
]


def test_routing_keys_are_single_literal_words() -> None:
    keys = [routing_key(name) for name in SPECIAL]
    assert len(set(keys)) == len(keys)
    for name, key in zip(SPECIAL, keys, strict=True):
        assert not set(key) & {".", "*", "#"}, key
        assert len(key.encode()) <= 255
        if key.startswith("~"):
            assert len(name.encode()) > 150 and room_of_key(key) is None
        else:
            assert room_of_key(key) == name


def test_from_url_options() -> None:
    broker = RabbitMQBroker.from_url(
        "amqp://u%40x:p%3Aw@h:5673/v%2Fh?prefetch=256&operation_timeout=2.5&heartbeat=3"
    )
    assert (broker.prefetch, broker.operation_timeout, broker.vhost) == (256, 2.5, "v/h")
    assert broker.management_url == "http://h:15672"
    assert "heartbeat=3" in broker._url and "prefetch" not in broker._url
    assert isinstance(RoomRouter.from_url(AMQP).broker, RabbitMQBroker)
    with pytest.raises(ConfigurationError):
        RabbitMQBroker.from_url(AMQP + "?prefetch=lots")
    with pytest.raises(ConfigurationError):
        RabbitMQBroker.from_url(AMQP + "?prefetch=0")


async def test_management_api_answers_and_failures_are_one_clear_line(
    rabbit: RabbitMQBackend,
) -> None:
    """The management HTTP client (aiohttp): a JSON answer decoded; a refused login, an
    unknown path and a closed port each one BrokerUnavailable that names the API, without the
    password or a client library's repr."""
    overview = await RabbitMQBroker(AMQP).management_request("/api/overview")
    assert "rabbitmq_version" in overview
    wrong = RabbitMQBroker("amqp://guest:s3cret-pw@127.0.0.1:5672/")
    with pytest.raises(BrokerUnavailable, match="HTTP 401") as refused:
        await wrong.management_request("/api/overview")
    with pytest.raises(BrokerUnavailable, match="HTTP 404"):
        await RabbitMQBroker(AMQP).management_request("/api/queues/%2F/rr.no-such-queue")
    port = free_port()
    closed = RabbitMQBroker(AMQP, management_url=f"http://127.0.0.1:{port}")
    with pytest.raises(BrokerUnavailable) as unreachable:
        await closed.management_request("/api/overview")
    assert str(unreachable.value) == (
        f"RabbitMQ management API at http://127.0.0.1:{port}/api/overview failed: "
        "connection refused"
    )
    for error in (refused.value, unreachable.value):
        text = str(error)
        assert "s3cret" not in text and "<" not in text and "\n" not in text


@pytest.mark.parametrize("size", [0, 1, 100, 4088, 4089, 10_000])
def test_publish_framing_matches_pamqp(size: int) -> None:
    import pamqp.frame
    from pamqp import commands
    from pamqp.body import ContentBody
    from pamqp.header import ContentHeader

    body = bytes(range(256)) * (size // 256) + bytes(size % 256)
    exchange, key, max_body = "rr.ns.data", routing_key("room.*"), 4088
    expected = [
        commands.Basic.Publish(exchange=exchange, routing_key=key),
        ContentHeader(0, len(body), commands.Basic.Properties()),
    ] + [ContentBody(body[i : i + max_body]) for i in range(0, len(body), max_body)]
    wire = b"".join(pamqp.frame.marshal(frame, 7) for frame in expected)
    assert publish_frames(7, exchange.encode(), key.encode(), body, max_body) == wire


async def test_broker_syntax_names_reach_only_their_members(nodes: NodeFactory) -> None:
    a, b, c = await nodes(3)
    members = {}
    for i, name in enumerate(SPECIAL):
        members[name] = (a, b)[i % 2].member(f"m{i}")
        await members[name].join(name)
    for name in SPECIAL:
        await c.publish(name, name.encode())
    for name, member in members.items():
        [got] = await receive_n(member, 1)
        assert got.payload == name.encode() and got.room == name
    for name, member in members.items():
        assert await drain(member, settle=0.2) == [], name[:20]
    await _bindings_match([a, b, c])
    for router in (a, b):
        for key in await _data_keys(router):
            # A room key (one word) or an addressed key (room word, node word): no wildcard.
            words = key.split(".")
            assert len(words) <= 2 and len(key.encode()) <= 255
            assert all(w and not set(w) & {"*", "#"} for w in words)
    assert a.broker.filtered == b.broker.filtered == 0


async def test_bindings_follow_local_rooms_after_linger(nodes: NodeFactory) -> None:
    a, b, c = await nodes(3, linger=0.3)
    ma, mb = a.member("ma"), b.member("mb")
    rooms = [f"room.{i}" for i in range(20)]
    for room in rooms:
        await ma.join(room)
    await mb.join("room.0")
    await _bindings_match([a, b, c])
    assert await _data_keys(c) == []
    # Control plane: one fanout binding and one direct binding per node queue.
    sources = sorted(b["source"] for b in await _queue_bindings(c) if b["source"])
    ns = c.namespace
    assert sources == [f"rr.{ns}.control", f"rr.{ns}.direct"]

    for room in rooms[10:]:
        await ma.leave(room)
    # Lingering rooms stay bound (two bindings a room: its key and the one addressed to a).
    assert len(await _data_keys(a)) == 2 * 20
    await eventually(lambda: _bindings_match([a, b, c]), timeout=5)
    assert a.local_rooms == set(rooms[:10])
    assert len(await _data_keys(a)) == 2 * 10


async def test_hashed_key_is_checked_against_envelope_room(nodes: NodeFactory) -> None:
    a, b = await nodes(2)
    long_room = "long-" + "z" * 500
    in_long, in_other = b.member("long"), b.member("other")
    await in_long.join(long_room)
    await in_other.join("other")
    # A frame under the long room's key whose envelope names another room b hosts: without the
    # check it would reach the member of "other". The broker maps the hashed key back to the
    # long room; the router drops the mismatch.
    forged = Envelope(id="forged", room="other", origin=a.node_id, ts=0.0, payload=b"forged")
    await a.broker.publish(long_room, encode_envelope(forged))
    sent = await a.publish(long_room, b"real")
    [got] = await receive_n(in_long, 1)
    assert got.id == sent.id
    assert await drain(in_other) == []
    assert b.stats()["dropped_room_mismatch"] == 1 and b.broker.filtered == 0


async def test_join_1000_rooms(nodes: NodeFactory) -> None:
    a, b = await nodes(2)
    member = b.member("busy")
    rooms = [f"r{i}" for i in range(1000)]
    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for room in rooms:
            tg.start_soon(member.join, room)
    joined = time.perf_counter() - started
    assert len(await _data_keys(b)) == 2 * 1000
    sent = await a.publish("r999", b"last")
    assert (await receive_n(member, 1))[0].id == sent.id
    await member.close()
    await eventually(lambda: _bindings_match([b]), timeout=10)
    print(f"1000 joins: {joined:.3f}s ({b.stats()['subscribe_batches']} batches)")
    assert joined < 10  # no pathological per-room round trips


# -- publisher confirms ---------------------------------------------------------------------------


async def test_publish_to_deleted_exchange_is_an_error(nodes: NodeFactory) -> None:
    [a] = await nodes(1, url=AMQP + "?operation_timeout=2")
    connection = await aiormq.connect(AMQP)
    try:
        channel = await connection.channel()
        await channel.exchange_delete(_broker(a).data_exchange)
    finally:
        await connection.close()
    started = anyio.current_time()
    with anyio.fail_after(4), pytest.raises(BrokerUnavailable, match="NOT_FOUND"):
        await a.broker.publish("R", b"nobody routes this")
    assert anyio.current_time() - started < 2.5
    # The publisher channel died with the error; the node comes back on its own.
    await eventually(_publish_control_ok(a), timeout=5)
    assert a.stats()["task_restarts"] == 0


def _publish_control_ok(router: RoomRouter) -> Callable[[], Awaitable[None]]:
    async def check() -> None:
        try:
            await router.broker.publish_control(b"\xc1")
        except BrokerUnavailable as exc:
            raise AssertionError(str(exc)) from exc

    return check


async def test_unreachable_broker_fails_publishes_within_the_timeout(
    proxy: TcpProxy, nodes: NodeFactory
) -> None:
    [b] = await nodes(1)  # direct connection: receives
    [a] = await nodes(1, url=proxy.url + "?operation_timeout=1")
    member = b.member("m")
    await member.join("R")
    await eventually(lambda: _assert(a.remote_hosts("R") == {b.node_id}))

    # Black hole: the publish is written, no confirmation ever comes: it may have been
    # published (the settle rule's "outcome unknown").
    proxy.blackhole()
    started = anyio.current_time()
    with anyio.fail_after(3), pytest.raises(PublishOutcomeUnknown):
        await a.publish("R", b"into the void")
    assert anyio.current_time() - started < 2

    # Connections cut and refused: an error at once, not a hang, and "not sent".
    proxy.cut()
    await eventually(lambda: _assert(_publisher_channel(a) is None))
    with anyio.fail_after(1), pytest.raises(BrokerUnavailable) as refused:
        await a.publish("R", b"no connection")
    assert not isinstance(refused.value, PublishOutcomeUnknown), refused.value

    proxy.restore()
    await _delivery_resumes(a, member, "R")  # the publisher connection is back
    await eventually(lambda: _assert(a.stats()["reconnects"] == 1))  # and the subscriber one
    await eventually(lambda: _bindings_match([a, b]))
    assert a.stats()["task_restarts"] == 0


async def test_a_publish_failed_as_not_sent_is_never_delivered(
    proxy: TcpProxy, nodes: NodeFactory
) -> None:
    """The settle rule on the wire: concurrent publishers run while the publisher connection
    is cut and comes back. A publish told "not sent" (BrokerUnavailable, not
    PublishOutcomeUnknown) must never reach a member, not even later on the new connection;
    every confirmed one must."""
    [b] = await nodes(1)  # direct connection: receives
    [a] = await nodes(1, url=proxy.url + "?operation_timeout=0.5")
    member = b.member("m")
    await member.join("R")
    await eventually(lambda: _assert(a.remote_hosts("R") == {b.node_id}))
    confirmed: set[bytes] = set()
    not_sent: set[bytes] = set()
    unknown: set[bytes] = set()
    received: set[bytes] = set()
    phase = "before"

    async def publisher(task: int) -> None:
        for i in range(100_000):
            payload = b"%d-%d" % (task, i)
            try:
                await a.publish("R", payload)
            except PublishOutcomeUnknown:
                unknown.add(payload)
            except BrokerUnavailable:
                not_sent.add(payload)
            else:
                confirmed.add(payload)
                if phase == "restored" and len(confirmed) > 50:
                    return
            await anyio.sleep(0.002)

    async def receiver() -> None:
        while True:
            received.add((await member.receive()).payload)

    async with anyio.create_task_group() as tg:
        tg.start_soon(receiver)
        async with anyio.create_task_group() as publishers:
            for task in range(4):
                publishers.start_soon(publisher, task)
            await eventually(lambda: _assert(len(confirmed) >= 20))
            proxy.cut()
            await eventually(lambda: _assert(len(not_sent) >= 20))
            confirmed.clear()
            proxy.restore()
            phase = "restored"
        await eventually(lambda: _assert(confirmed <= received), timeout=5)
        await anyio.sleep(0.5)  # anything still on its way arrives by now
        tg.cancel_scope.cancel()
    assert not_sent and not (not_sent & received), sorted(not_sent & received)[:5]


# -- reconnect ------------------------------------------------------------------------------------


async def test_server_closes_a_nodes_connections(nodes: NodeFactory) -> None:
    ctl = _rabbitmqctl()
    a, b, c = await nodes(3)
    rooms = ["plain", "a.*.c", "#", "q" * 400]
    members = [b.member(f"m{i}") for i in range(len(rooms))]
    for member, room in zip(members, rooms, strict=True):
        await member.join(room)
    old_queue = _broker(b).queue_name
    closed = await _server_close(ctl, {_broker(b).connection_name(r) for r in ("sub", "pub")})
    assert closed == 2
    await eventually(lambda: _assert(_broker(b).queue_name != old_queue), timeout=5)
    await eventually(lambda: _bindings_match([a, b, c]), timeout=5)
    for member, room in zip(members, rooms, strict=True):
        await _delivery_resumes(a, member, room)
    assert b.stats()["reconnects"] == 1
    for router in (a, b, c):
        assert router.stats()["task_restarts"] == 0


async def test_queue_deleted_under_the_node_is_rebuilt(nodes: NodeFactory) -> None:
    ctl = _rabbitmqctl()  # the HTTP API refuses to delete another connection's exclusive queue
    a, b = await nodes(2)
    member = b.member("m")
    await member.join("R")
    old_queue = _broker(b).queue_name
    await anyio.run_process([ctl, "delete_queue", old_queue])
    await eventually(lambda: _assert(_broker(b).queue_name != old_queue), timeout=5)
    await eventually(lambda: _bindings_match([a, b]), timeout=5)
    await _delivery_resumes(a, member, "R")
    assert b.stats()["reconnects"] == 1 and b.stats()["task_restarts"] == 0


@pytest.mark.serial  # closes every connection on the server, other tests' too
async def test_server_closes_every_connection(nodes: NodeFactory) -> None:
    ctl = _rabbitmqctl()
    a, b, c = await nodes(3)
    ma, mb, mc = a.member("ma"), b.member("mb"), c.member("mc")
    for m in (ma, mb, mc):
        await m.join("shared")
    await mb.join("only-b")
    await _server_close(ctl, None)
    await eventually(lambda: _assert(all(r.stats()["reconnects"] == 1 for r in (a, b, c))), 10)
    await eventually(lambda: _bindings_match([a, b, c]), timeout=5)
    await _delivery_resumes(a, mb, "only-b")
    sent = await c.publish("shared", b"after")
    for m in (ma, mb):
        got = [e for e in await drain(m, settle=0.3) if e.id == sent.id]
        assert len(got) == 1
    for router in (a, b, c):
        assert router.stats()["task_restarts"] == 0


async def _delivery_resumes(publisher: RoomRouter, member: Any, room: str) -> None:
    """Publish every 50 ms until ``member`` receives one (within 5 s)."""
    with anyio.fail_after(5):
        while True:
            try:
                sent = await publisher.publish(room, b"ping")
            except BrokerUnavailable:
                await anyio.sleep(0.05)
                continue
            with anyio.move_on_after(0.05):
                while True:
                    got = await member.receive()
                    if got.id == sent.id:
                        return


def _assert(condition: bool) -> None:
    assert condition


# -- persistence ----------------------------------------------------------------------------------


def test_persistent_properties_match_pamqp() -> None:
    import pamqp.frame
    from pamqp import commands
    from pamqp.header import ContentHeader

    body, key = b"x" * 10, routing_key("room")
    bcc = ["~store", f"~recent.{key}"]
    properties = commands.Basic.Properties(headers={"BCC": bcc}, delivery_mode=2)
    expected = b"".join(
        pamqp.frame.marshal(frame, 3)
        for frame in (
            commands.Basic.Publish(exchange="x", routing_key=key),
            ContentHeader(0, len(body), properties),
        )
    )
    wire = publish_frames(
        3, b"x", key.encode(), body, 4088, persistent_properties([k.encode() for k in bcc])
    )
    assert wire.startswith(expected)


async def _storage_ready(rabbit: RabbitMQBackend) -> int:
    """Frames ready in the namespace's storage queue, read with a passive declare."""
    connection = await aiormq.connect(AMQP)
    try:
        channel = await connection.channel()
        ok = await channel.queue_declare(f"rr.{rabbit.namespace}.store", passive=True)
        return int(ok.message_count or 0)
    finally:
        await connection.close()


async def test_only_persisted_frames_reach_the_storage_queue(
    rabbit: RabbitMQBackend, nodes: NodeFactory
) -> None:
    a, b = await nodes(2)
    member = b.member("m")
    await member.join("R")
    await a.publish("R", b"live only")
    await a.publish("R", b"live and kept", persist=True)
    await a.publish("nobody-hosts-this", b"kept only", persist=True)
    assert [e.payload for e in await receive_n(member, 2)] == [b"live only", b"live and kept"]
    assert await _storage_ready(rabbit) == 2
    assert a.stats()["broker_publishes"] == 2 and a.stats()["bypassed_publishes"] == 1
    # The frame for a room nobody hosts went to no node queue at all.
    assert b.stats()["broker_received"] == 2
    assert await drain(member) == []
    recent = await _broker(a).recent("nobody-hosts-this")
    assert len(recent.frames) == 1 and not recent.truncated


async def test_recent_is_not_consumed_by_reading_and_keeps_its_order(nodes: NodeFactory) -> None:
    [a] = await nodes(1)
    sent = [await a.publish("R", f"{i}".encode(), persist=True) for i in range(30)]
    broker = _broker(a)
    # Concurrent readers take turns on the exclusive consumer; each sees the whole cache.
    results: list[list[bytes]] = []

    async def read() -> None:
        results.append((await broker.recent("R")).frames)

    async with anyio.create_task_group() as tg:
        for _ in range(8):
            tg.start_soon(read)
    expected = [encode_envelope(e) for e in sent]
    assert results == [expected] * 8
    assert (await broker.recent("never-persisted")).frames == []


async def test_recent_reports_truncation_once_the_cache_is_full(rabbit: RabbitMQBackend) -> None:
    async with AsyncExitStack() as stack:
        opts = {**TEST_ROUTER_OPTIONS, **rabbit.router_options}
        a = await stack.enter_async_context(
            RoomRouter(rabbit.broker(recent_size=5), namespace=rabbit.namespace, **opts)
        )
        broker = _broker(a)
        for i in range(4):
            await a.publish("R", f"{i}".encode(), persist=True)
        assert not (await broker.recent("R")).truncated
        for i in range(4, 9):
            await a.publish("R", f"{i}".encode(), persist=True)
        recent = await broker.recent("R")
        assert recent.truncated and len(recent.frames) == 5
        from roomrouter._envelope import decode_envelope

        assert [decode_envelope(f).payload for f in recent.frames] == [
            f"{i}".encode() for i in range(4, 9)
        ]


async def _fetch_n(consumer: Any, count: int) -> list[Any]:
    """Exactly ``count`` frames: fetch hands out what has arrived once the first one is there."""
    got: list[Any] = []
    with anyio.fail_after(5):
        while len(got) < count:
            got += await consumer.fetch(count - len(got), wait=1)
    assert len(got) == count
    return got


async def test_unacked_frames_are_redelivered_when_a_consumer_connection_closes(
    rabbit: RabbitMQBackend, nodes: NodeFactory
) -> None:
    [a] = await nodes(1)
    sent = [await a.publish("R", f"{i}".encode(), persist=True) for i in range(20)]
    broker = rabbit.broker()
    first = broker.storage_consumer(rabbit.namespace, "first")
    second = broker.storage_consumer(rabbit.namespace, "second")
    async with second:
        async with first:
            held = await _fetch_n(first, 20)
            assert await second.fetch(20, wait=0.2) == []  # held by the first one
        # The first consumer's connection closed without acking: RabbitMQ requeues at once.
        got = await _fetch_n(second, 20)
        assert sorted(f.frame for f in got) == sorted(encode_envelope(e) for e in sent)
        await second.ack(got[:5])  # a contiguous prefix: one cumulative ack
        await second.ack(got[10:])  # not contiguous: one ack each
        await second.ack(got[5:10])
        assert await second.pending() == 0
        assert len(held) == 20  # the first consumer really held them all before closing
