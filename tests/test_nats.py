"""NATS backend specifics: literal room names, no echo, exact node counts, the storage stream
deleted, garbage on every subject, a NATS server restart, URLs. The shared suites (contract,
persistence, worker faults, direct publishing, state machine) run on NATS through
tests/backends.py; these tests cover what only NATS has."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import anyio
import pytest

from roomrouter import (
    BrokerUnavailable,
    ConfigurationError,
    PublishOutcomeUnknown,
    RoomRouter,
    StorageQueueLost,
)
from roomrouter.brokers import BrokerContext

from .backends import BACKENDS, require_tcp
from .conftest import TEST_ROUTER_OPTIONS, selected_backends, unique_namespace
from .helpers import drain, eventually, forged_envelope, receive_n
from .ports import free_port

nats = pytest.importorskip("nats")

from roomrouter.brokers.nats import Names, NatsBroker  # noqa: E402
from roomrouter.brokers.nats._common import token  # noqa: E402

pytestmark = pytest.mark.anyio

URL = "nats://127.0.0.1:4222"
ROOT = Path(__file__).resolve().parent.parent


def _assert_eq(actual: object, expected: object) -> None:
    assert actual == expected, (actual, expected)


@pytest.fixture
async def ns() -> AsyncIterator[str]:
    if "nats" not in selected_backends():
        pytest.skip("nats not selected")
    backend = BACKENDS["nats"](unique_namespace())
    backend.available()
    try:
        yield backend.namespace
    finally:
        await backend.cleanup()


async def _router(stack: AsyncExitStack, ns: str, url: str = URL, **options: Any) -> RoomRouter:
    broker = NatsBroker(url, **{k: options.pop(k) for k in ("recent_size",) if k in options})
    router = RoomRouter(broker, namespace=ns, **{**TEST_ROUTER_OPTIONS, **options})
    return await stack.enter_async_context(router)


async def _raw(subject: str, frame: bytes, url: str = URL, **kwargs: Any) -> None:
    client = await nats.connect(url)
    try:
        await client.publish(subject, frame, **kwargs)
        await client.flush()
    finally:
        await client.close()


# -- names ---------------------------------------------------------------------------------------

TRICKY = ["a.b", "a.*", "a.>", "*", ">", "a b", "a\tb", "%2E", ".", "a%b", "ü.ñ", "a..b", "-_~"]


def test_every_name_is_one_literal_token_and_no_two_share_one() -> None:
    tokens = [token(name) for name in TRICKY]
    assert len(set(tokens)) == len(TRICKY)
    for name, tok in zip(TRICKY, tokens, strict=True):
        assert tok and not set(tok) & set(".*> \t\r\n"), (name, tok)
    names = Names.of("ns.with.dots")
    assert names.room("a.b").count(".") == names.room("x").count(".") == 3
    assert {names.room_of(names.room(n)) for n in TRICKY} == set(TRICKY)
    assert names.room_of(names.node("a")) is None
    assert "." not in names.stream("STORE") and "*" not in Names.of("a*>b").stream("STORE")


async def test_wildcard_and_dotted_room_names_reach_only_their_own_room(ns: str) -> None:
    rooms = ["a.b", "a.*", "a.>", "a", "a b", "*", ">"]
    async with AsyncExitStack() as stack:
        a = await _router(stack, ns)
        b = await _router(stack, ns)
        members = {room: b.member(f"m{i}") for i, room in enumerate(rooms)}
        for room, member in members.items():
            await member.join(room)
        await a.member("pub").join("other")
        assert await b.broker.broker_subscriptions() == frozenset(rooms)
        for room in rooms:
            await a.publish(room, room.encode())
        for room, member in members.items():
            assert [e.payload for e in await receive_n(member, 1)] == [room.encode()]
            assert await drain(member) == []
        assert b.stats()["dropped_room_mismatch"] == 0


async def test_the_room_subject_never_echoes_a_publish_to_its_node(ns: str) -> None:
    async with AsyncExitStack() as stack:
        a = await _router(stack, ns, direct_max=0)
        b = await _router(stack, ns, direct_max=0)
        await a.member("ma").join("R")
        mb = b.member("mb")
        await mb.join("R")
        await eventually(lambda: _assert_eq(a.remote_hosts("R"), {b.node_id}))
        before = a.stats()["broker_received"]
        for i in range(20):
            await a.publish("R", b"%d" % i)
        assert [e.payload for e in await receive_n(mb, 20)] == [b"%d" % i for i in range(20)]
        await anyio.sleep(0.2)
        assert a.stats()["broker_received"] == before  # no echo reached the node at all
        assert a.stats()["dropped_echo"] == 0 and a.stats()["broker_publishes"] >= 20


# -- the cluster view ----------------------------------------------------------------------------


async def _bare(ns: str, tg: Any, node: str = "counter") -> NatsBroker:
    broker = NatsBroker(URL)
    await broker.start(BrokerContext(node, ns, lambda r, f: None, lambda f: None, lambda: None, tg))
    return broker


async def test_count_nodes_is_exact_at_once_and_forgets_a_closed_node(ns: str) -> None:
    async with AsyncExitStack() as stack, anyio.create_task_group() as tg:
        routers = [await _router(stack, ns) for _ in range(3)]
        counter = await _bare(ns, tg)
        try:
            assert await counter.count_nodes() == 3
            await routers[0].__aexit__(None, None, None)
            assert await counter.count_nodes() == 2  # deleted on close, not after the linger
        finally:
            await counter.aclose()
            tg.cancel_scope.cancel()


async def test_a_node_joining_live_peers_starts_without_a_window(ns: str) -> None:
    async with AsyncExitStack() as stack:
        peers = [await _router(stack, ns, heartbeat_interval=1.0) for _ in range(3)]
        for peer in peers:
            await peer.member().join(f"room-{peer.node_id}")
        took = []
        for _ in range(3):
            started = time.perf_counter()
            router = await _router(stack, ns, heartbeat_interval=1.0)
            took.append(time.perf_counter() - started)
            for peer in peers:
                assert router.remote_hosts(f"room-{peer.node_id}") == {peer.node_id}
            assert router.stats()["discovery_timeouts"] == 0
        print(f"start with 3+ live peers on NATS: {[round(t, 3) for t in took]} s")
        assert statistics.median(took) < 0.3, took  # an exact count: no discovery window


# -- the storage stream ----------------------------------------------------------------------------


async def _js_api(subject: str, body: dict[str, Any] | None = None) -> Any:
    client = await nats.connect(URL)
    try:
        reply = await client.request("$JS.API." + subject, json.dumps(body or {}).encode())
        return json.loads(reply.data)
    finally:
        await client.close()


async def _fetch_all(consumer: Any, want: int) -> list[Any]:
    got: list[Any] = []
    with anyio.fail_after(20):
        while len(got) < want:
            got += await consumer.fetch(100, 0.2)
    return got


async def test_a_deleted_storage_stream_is_recreated_and_reported_once(ns: str) -> None:
    async with AsyncExitStack() as stack:
        router = await _router(stack, ns)
        await router.member("m").join("R")
        broker = router.broker
        workers = [
            await stack.enter_async_context(broker.storage_consumer(ns, f"w{i}")) for i in range(2)
        ]
        for i in range(3):
            await router.publish("R", b"before %d" % i, persist=True)
        got = await _fetch_all(workers[0], 3)
        await workers[0].ack(got)
        assert await workers[0].pending() == 0

        answer = await _js_api(f"STREAM.DELETE.{Names.of(ns).stream('STORE')}")
        assert answer.get("success") is True, answer
        # The node sees "no stream", recreates it and sends the write again: not an error.
        for i in range(4):
            await router.publish("R", b"after %d" % i, persist=True)
        lost = 0
        frames: list[Any] = []
        for worker in workers:
            try:
                frames += await worker.fetch(100, 0.2)
            except StorageQueueLost:
                lost += 1
        assert lost == 1  # one report per loss, whichever worker noticed first
        for worker in workers:
            frames += await worker.fetch(100, 0.2)
        frames += await _fetch_all(workers[0], 4 - len(frames)) if len(frames) < 4 else []
        assert sorted(i for f in frames for i in range(4) if b"after %d" % i in f.frame) == [
            0, 1, 2, 3,
        ]  # fmt: skip
        await workers[0].ack(frames)
        await eventually(lambda: _pending_is(workers[1], 0))


async def _pending_is(consumer: Any, count: int) -> None:
    assert await consumer.pending() == count


# -- garbage ---------------------------------------------------------------------------------------


async def test_garbage_on_every_subject_is_dropped_and_nothing_else_is_lost(ns: str) -> None:
    names = Names.of(ns)
    async with AsyncExitStack() as stack:
        a = await _router(stack, ns)
        b = await _router(stack, ns)
        mb, ma = b.member("mb"), a.member("ma")
        await mb.join("R")
        await ma.join("R")
        await eventually(lambda: _assert_eq(a.remote_hosts("R"), {b.node_id}))
        broker = b.broker
        assert isinstance(broker, NatsBroker)
        junk = [b"", b"\xff" * 10, b"not msgpack", forged_envelope("OTHER", b"wrong room")]
        subjects = [
            names.room("R"), names.node(b.node_id), names.control, names.direct(b.node_id),
            broker._ack_prefix + "0", broker._ack_prefix + "999999", broker._ack_prefix + "x",
            names.nodes, names.lost,
        ]  # fmt: skip
        for subject in subjects:
            for frame in junk:
                await _raw(subject, frame)
                await _raw(subject, frame, headers={"Status": "503", "Nats-Msg-Id": "x"})
        client = await nats.connect(URL)
        try:  # garbage in the room's recent cache (a JetStream publish of its own)
            await client.jetstream().publish(names.recent("R"), b"garbage in the cache")
        finally:
            await client.close()
        for i in range(10):
            await a.publish("R", b"%d" % i, persist=i % 2 == 0)
        got = await receive_n(mb, 10)
        assert [e.payload for e in got] == [b"%d" % i for i in range(10)]
        assert await drain(mb) == []
        stats = b.stats()
        assert stats["dropped_decode"] + stats["dropped_room_mismatch"] >= len(junk) - 1
        assert stats["dropped_control_decode"] >= 1
        recent = await broker.recent("R")
        assert recent.skipped == 1 and len(recent.frames) == 5
        # Both routers still work both ways.
        assert len(await drain(ma)) == 10  # a's own publishes, delivered locally
        await b.publish("R", b"back")
        assert [e.payload for e in await receive_n(ma, 1)] == [b"back"]


# -- a NATS server of the test's own ------------------------------------------------------------


class PrivateNats:
    """``nats-server -js`` on a free loopback port with its store in ``directory``."""

    def __init__(self, directory: Path, jetstream: bool = True) -> None:
        self.directory = directory
        self.jetstream = jetstream
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        binary = shutil.which("nats-server") or "/usr/sbin/nats-server"
        self.process = subprocess.Popen(
            [binary, *(["-js"] if self.jetstream else []), "-a", "127.0.0.1",
             "-p", str(self.port), "-sd", str(self.directory)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"nats-server did not start on port {self.port}")

    def kill(self) -> None:
        if self.process is not None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()
            self.process = None


@pytest.fixture(params=[True], ids=["js"])
def private_nats(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[PrivateNats]:
    if shutil.which("nats-server") is None and not Path("/usr/sbin/nats-server").exists():
        require_tcp("127.0.0.1", 1, "nats-server binary")
    server = PrivateNats(tmp_path / "jetstream", jetstream=request.param)
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.mark.parametrize("private_nats", [False], ids=["no-js"], indirect=True)
async def test_a_server_without_jetstream_is_a_one_line_start_error(
    private_nats: PrivateNats,
) -> None:
    started = time.perf_counter()
    with pytest.raises(BrokerUnavailable) as failed:
        async with RoomRouter(NatsBroker(private_nats.url, operation_timeout=2), namespace="x"):
            pass
    assert time.perf_counter() - started < 5
    message = str(failed.value)
    assert "JetStream" in message and "\n" not in message, message


@pytest.mark.slow
async def test_a_server_restart_is_survived(private_nats: PrivateNats) -> None:
    ns = unique_namespace()
    async with AsyncExitStack() as stack:
        a = await _router(stack, ns, private_nats.url)
        b = await _router(stack, ns, private_nats.url)
        mb = b.member("mb")
        await mb.join("R")
        await a.member("ma").join("S")
        await eventually(lambda: _assert_eq(a.remote_hosts("R"), {b.node_id}))
        await a.publish("R", b"before", persist=True)
        assert [e.payload for e in await receive_n(mb, 1)] == [b"before"]

        private_nats.kill()
        with anyio.fail_after(10):  # refused at once while down: "not sent"
            with pytest.raises(BrokerUnavailable):
                while True:
                    await a.broker.publish("R", b"down")
                    await anyio.sleep(0.05)
        private_nats.start()

        async def resubscribed() -> None:
            try:
                assert await b.broker.broker_subscriptions() == {"R"}
                assert await a.broker.broker_subscriptions() == {"S"}
            except BrokerUnavailable as exc:  # not reconnected yet
                raise AssertionError(exc) from exc

        await eventually(resubscribed, timeout=20)
        await eventually(lambda: _assert_eq(a.remote_hosts("R"), {b.node_id}), timeout=20)

        async def delivered() -> None:
            try:
                await a.publish("R", b"after", persist=True)
            except BrokerUnavailable as exc:  # JetStream still recovering its store
                raise AssertionError(exc) from exc
            assert b"after" in [e.payload for e in await receive_n(mb, 1, timeout=1)]

        await eventually(delivered, timeout=20)
        # The storage stream (file storage) kept what it held across the restart.
        async with a.broker.storage_consumer(ns, "w") as worker:
            frames = await _fetch_all(worker, 2)
            assert any(b"before" in f.frame for f in frames), frames
            await worker.ack(frames)


# -- URLs ------------------------------------------------------------------------------------------


async def test_urls_options_errors_and_no_password_shown() -> None:
    from roomrouter._urls import broker_from_url

    broker = broker_from_url("nats://u:s3cret@h1:4222,h2:4223?recent_size=5&operation_timeout=2")
    assert isinstance(broker, NatsBroker)
    assert broker.servers == ["nats://u:s3cret@h1:4222", "nats://u:s3cret@h2:4223"]
    assert broker.recent_size == 5 and broker.operation_timeout == 2
    assert "s3cret" not in repr(broker)
    for bad in ("nats://h?nope=1", "nats://h?recent_size=x", "nats://h?operation_timeout=0"):
        with pytest.raises(ConfigurationError) as info:
            NatsBroker.from_url(bad.replace("//h", "//u:s3cret@h"))
        assert "s3cret" not in str(info.value)
    port = free_port()
    unreachable = NatsBroker(f"nats://u:s3cret@127.0.0.1:{port}", operation_timeout=1)
    started = time.perf_counter()
    with pytest.raises(BrokerUnavailable) as failed:
        async with RoomRouter(unreachable, namespace="x"):
            pass
    assert time.perf_counter() - started < 5
    assert "s3cret" not in str(failed.value) and "\n" not in str(failed.value)


# -- the settle rule -------------------------------------------------------------------------------


async def test_a_lost_answer_is_an_unknown_outcome_and_a_retry_is_stored_once(ns: str) -> None:
    """The server acts on what it read, but its answers are lost (a muting proxy): a publish
    must not say it did not happen. A persisted one was stored (both streams) and not sent
    live (the live part waits for the acks); its retry by id completes it, stored once."""
    from .test_wire import MutingProxy

    proxy = MutingProxy(4222)
    async with AsyncExitStack() as stack, anyio.create_task_group() as tg:
        await tg.start(proxy.serve)
        b = await _router(stack, ns)
        a = await stack.enter_async_context(
            RoomRouter(
                NatsBroker(f"nats://127.0.0.1:{proxy.port}", operation_timeout=1.0),
                namespace=ns,
                **TEST_ROUTER_OPTIONS,
            )
        )
        member = b.member("m")
        await member.join("R")
        await eventually(lambda: _assert_eq(a.remote_hosts("R"), {b.node_id}))
        proxy.muted = True
        with pytest.raises(PublishOutcomeUnknown) as live:
            await a.publish("R", b"live")
        assert [e.id for e in await receive_n(member, 1)] == [live.value.envelope_id]
        with pytest.raises(PublishOutcomeUnknown) as info:
            await a.publish("R", b"maybe", persist=True)
        envelope_id = info.value.envelope_id
        assert envelope_id is not None
        async with b.broker.storage_consumer(ns, "probe") as probe:
            await eventually(lambda: _pending_is(probe, 1), timeout=10)
            assert await drain(member) == []  # stored, not sent live
            proxy.muted = False
            with anyio.fail_after(15):
                while True:  # the connection comes back through the proxy
                    try:
                        await a.publish("R", b"maybe", persist=True, id=envelope_id)
                        break
                    except BrokerUnavailable:
                        await anyio.sleep(0.1)
            [again] = await receive_n(member, 1)
            assert again.id == envelope_id
            assert await probe.pending() == 1  # the storage stream dropped the repeated id
            recent = await b.broker.recent("R")
            assert len(recent.frames) == 1
        tg.cancel_scope.cancel()


async def test_a_killed_node_stops_counting_after_the_presence_linger(ns: str) -> None:
    """A node that dies without closing keeps its presence consumer until the server sees its
    interest gone for ``presence_linger`` (2 s): then a starting node no longer waits for it."""
    import sys

    root = ROOT
    async with anyio.create_task_group() as tg:
        counter = await _bare(ns, tg)
        child = subprocess.Popen(
            [sys.executable, "-m", "tests.node_process", URL, ns, "room", "--lifetime", "60"],
            cwd=root, stdout=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": str(root / "src")},
        )  # fmt: skip
        try:
            assert child.stdout is not None
            with anyio.fail_after(20):
                node_id = (await anyio.to_thread.run_sync(child.stdout.readline)).strip()
            assert node_id, "child node did not start"
            assert await counter.count_nodes() == 1
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=10)
            killed_at = anyio.current_time()

            async def gone() -> None:
                assert await counter.count_nodes() == 0

            await eventually(gone, timeout=15, interval=0.1)
            print(f"presence of a killed node gone after {anyio.current_time() - killed_at:.2f}s")
            assert anyio.current_time() - killed_at < 2.0 + 5.0  # the linger + server checks
        finally:
            child.kill()
            child.wait(timeout=10)
            if child.stdout is not None:
                child.stdout.close()
            await counter.aclose()
            tg.cancel_scope.cancel()


class _CuttingProxy:
    """A TCP proxy to the NATS server that can drop the server's answers (``muted``: what the
    client writes still reaches the server) and cut every connection at once (:meth:`cut`),
    as a connection that dies after a write."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.muted = False
        self._scopes: list[anyio.CancelScope] = []

    async def serve(self, *, task_status: Any) -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
        self.port = listener.listeners[0].extra(anyio.abc.SocketAttribute.local_port)
        async with listener:
            task_status.started()
            await listener.serve(self._handle)

    def cut(self) -> None:
        for scope in self._scopes:
            scope.cancel()
        self._scopes.clear()

    async def _handle(self, client: Any) -> None:
        async with (
            client,
            await anyio.connect_tcp("127.0.0.1", self.target_port) as server,
            anyio.create_task_group() as tg,
        ):
            self._scopes.append(tg.cancel_scope)
            tg.start_soon(self._pump, client, server, False, tg.cancel_scope)
            tg.start_soon(self._pump, server, client, True, tg.cancel_scope)

    async def _pump(self, source: Any, sink: Any, answers: bool, scope: anyio.CancelScope) -> None:
        try:
            async for chunk in source:
                if not (answers and self.muted):
                    await sink.send(chunk)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass
        scope.cancel()


async def test_the_settle_rule_when_the_connection_dies(ns: str) -> None:
    """The transport core's settle rule on NATS: a publish whose bytes were handed to the
    connection when it dies is "outcome unknown" at once (not at its deadline), and so is a
    persisted one whose JetStream writes went out; a live publish called after that persisted
    one waits for its acknowledgements, so it was never written: "not sent", and it never
    arrives later (nats-py re-sends its buffer after a reconnect, and it was never in it)."""
    proxy = _CuttingProxy(4222)
    timeout = 8.0
    async with AsyncExitStack() as stack, anyio.create_task_group() as tg:
        await tg.start(proxy.serve)
        b = await _router(stack, ns)
        a = await stack.enter_async_context(
            RoomRouter(
                NatsBroker(f"nats://127.0.0.1:{proxy.port}", operation_timeout=timeout),
                namespace=ns,
                **TEST_ROUTER_OPTIONS,
            )
        )
        member = b.member("m")
        await member.join("R")
        await eventually(lambda: _assert_eq(a.remote_hosts("R"), {b.node_id}))
        outcomes: dict[bytes, BaseException | None] = {}

        async def publish(payload: bytes, persist: bool = False) -> None:
            try:
                await a.publish("R", payload, persist=persist)
                outcomes[payload] = None
            except BrokerUnavailable as exc:
                outcomes[payload] = exc

        proxy.muted = True
        async with anyio.create_task_group() as calls:
            calls.start_soon(publish, b"flushed")
            # The server has it: its bytes were written; its confirmation is lost.
            assert [e.payload for e in await receive_n(member, 1)] == [b"flushed"]
            calls.start_soon(publish, b"stored", True)
            await anyio.sleep(0.05)  # its JetStream writes go out, their acks are lost
            calls.start_soon(publish, b"never")  # waits behind "stored"'s acks
            await anyio.sleep(0.3)
            assert await drain(member) == []
            assert not outcomes  # nothing settled before the connection dies
            proxy.muted = False
            cut_at = anyio.current_time()
            proxy.cut()
        took = anyio.current_time() - cut_at
        assert took < timeout / 2, took  # settled by the loss, not by the deadline
        assert isinstance(outcomes[b"flushed"], PublishOutcomeUnknown), outcomes
        assert isinstance(outcomes[b"stored"], PublishOutcomeUnknown), outcomes
        never = outcomes[b"never"]
        assert isinstance(never, BrokerUnavailable), outcomes
        assert not isinstance(never, PublishOutcomeUnknown), never

        with anyio.fail_after(15):
            while True:  # nats-py reconnects through the proxy
                try:
                    await a.publish("R", b"after")
                    break
                except BrokerUnavailable:
                    await anyio.sleep(0.1)
        got = [e.payload for e in await receive_n(member, 1)]
        await anyio.sleep(0.5)  # room for anything nats-py might still re-send
        got += [e.payload for e in await drain(member)]
        assert b"never" not in got and b"stored" not in got, got
        assert got[-1] == b"after", got
        tg.cancel_scope.cancel()


def test_client_errors_are_named_in_the_shared_words() -> None:
    """The NATS backend names nats-py's errors through the public ``roomrouter.urls.describe``
    (what every built-in backend says), never by their repr."""
    import nats.errors

    from roomrouter.brokers.nats._common import describe
    from roomrouter.urls import describe as shared

    assert shared(ConnectionRefusedError(111, "Connection refused")) == "connection refused"
    assert describe(nats.errors.TimeoutError()) == shared(TimeoutError()) == "timed out"
    assert describe(nats.errors.ConnectionClosedError()) == "connection closed"
    assert describe(nats.errors.NoServersError()) == (
        "NoServersError: nats: no servers available for connection"
    )
