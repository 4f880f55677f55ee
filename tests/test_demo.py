"""The demo chat server (``roomrouter demo``), end to end: a real uvicorn server on a loopback
port, real WebSocket clients, the memory broker, a storage worker and a SQLite file.

Most tests serve the app in the test's event loop (on asyncio, the conftest's anyio backend:
uvicorn needs it), so several nodes can share one in-process memory hub; the two-node test runs
on every selected backend; one test runs the ``roomrouter demo`` command as a subprocess, as the
README does.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import sqlite3
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from roomrouter import ConfigurationError
from roomrouter._demo import DemoSettings, bind, server_for
from roomrouter._demo.app import MAX_BATCH_FRAME, _batch_frames
from roomrouter._urls import broker_from_url

from .backends import Backend
from .helpers import eventually

pytestmark = pytest.mark.anyio

Frame = dict[str, Any]


@dataclass
class Node:
    """One running demo server."""

    host: str  # "127.0.0.1:port"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}/ws"

    async def get(self, path: str) -> tuple[int, str, str]:
        """Status, content type and body of ``GET path``."""

        def fetch() -> tuple[int, str, str]:
            try:
                with urllib.request.urlopen(f"http://{self.host}{path}", timeout=5) as response:
                    return (
                        response.status,
                        response.headers["content-type"],
                        response.read().decode(),
                    )
            except urllib.error.HTTPError as exc:
                with exc:
                    return exc.code, exc.headers["content-type"], exc.read().decode()

        return await anyio.to_thread.run_sync(fetch)

    async def stats(self) -> Frame:
        status, _, body = await self.get("/stats")
        assert status == 200, body
        result: Frame = json.loads(body)
        return result


class Client:
    """A WebSocket client of the demo that speaks its JSON frames."""

    def __init__(self, connection: ClientConnection) -> None:
        self.connection = connection
        #: Presence frames received and not read yet: they interleave with the rest at the
        #: store's pace, so ``recv`` sets them aside and ``presence_frame`` reads them.
        self.presence: list[Frame] = []
        #: Message frames of a ``messages`` frame not read yet, and how many messages each
        #: ``messages`` frame carried.
        self.unpacked: list[Frame] = []
        self.batches: list[int] = []

    async def _recv_any(self, timeout: float) -> Frame:
        """The next frame; a ``messages`` frame is read as the message frames it carries."""
        if self.unpacked:
            return self.unpacked.pop(0)
        with anyio.fail_after(timeout):
            frame: Frame = json.loads(await self.connection.recv())
        if frame["type"] == "messages":
            messages = frame["messages"]
            assert len(messages) >= 2, frame  # a batch of one is a plain message frame
            self.batches.append(len(messages))
            self.unpacked.extend(messages[1:])
            frame = messages[0]
        return frame

    async def recv(self, timeout: float = 5.0) -> Frame:
        """The next frame that is not about presence."""
        with anyio.fail_after(timeout):
            while True:
                frame = await self._recv_any(timeout)
                if frame["type"] not in ("presence", "presence_event"):
                    return frame
                self.presence.append(frame)

    async def presence_frame(self, timeout: float = 5.0) -> Frame:
        """The next presence frame (set aside by ``recv`` or still to come); other frames
        arriving meanwhile must not be there."""
        with anyio.fail_after(timeout):
            while not self.presence:
                frame = await self._recv_any(timeout)
                assert frame["type"] in ("presence", "presence_event"), frame
                self.presence.append(frame)
        return self.presence.pop(0)

    async def send(self, frame: Frame | str | bytes) -> None:
        await self.connection.send(frame if isinstance(frame, str | bytes) else json.dumps(frame))

    async def join(self, room: str, name: str, since: str | None = None) -> Frame:
        await self.send({"type": "join", "room": room, "name": name, "since": since})
        frame = await self.recv()
        assert frame["type"] == "joined", frame
        return frame

    async def say(self, text: str) -> None:
        await self.send({"type": "send", "text": text})

    async def messages(self, count: int) -> list[Frame]:
        """The next ``count`` frames, which must all be chat messages."""
        frames = [await self.recv() for _ in range(count)]
        assert [f["type"] for f in frames] == ["message"] * count, frames
        return frames


@asynccontextmanager
async def client(node: Node) -> AsyncIterator[Client]:
    async with connect(node.ws_url, open_timeout=5, close_timeout=2) as connection:
        c = Client(connection)
        hello = await c.recv()
        assert hello["type"] == "hello", hello
        yield c


@asynccontextmanager
async def serve(settings: DemoSettings) -> AsyncIterator[Node]:
    """Serve the demo in this event loop on a free loopback port, until the block ends."""
    sock = bind("127.0.0.1", 0)
    server = server_for(settings, log_level="warning")
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(server.serve, [sock])
            await eventually(lambda: _check(server.started), timeout=10)
            try:
                yield Node(f"127.0.0.1:{sock.getsockname()[1]}")
            finally:
                server.should_exit = True
    finally:
        sock.close()


def _check(condition: object) -> None:
    assert condition


@pytest.fixture
def settings(tmp_path: Path) -> DemoSettings:
    # A hub of its own per test: the memory broker's hubs are process-wide.
    return DemoSettings(
        broker=f"memory://demo-{uuid.uuid4().hex[:8]}",
        sink=f"sqlite:///{tmp_path / 'chat.db'}",
        history=20,
    )


def texts(frames: list[Frame]) -> list[str]:
    return [f["text"] for f in frames]


async def test_page_and_stats_are_served(settings: DemoSettings) -> None:
    async with serve(settings) as node:
        status, content_type, body = await node.get("/")
        assert status == 200 and content_type.startswith("text/html")
        assert "<title>roomrouter demo chat</title>" in body and "new WebSocket(" in body
        # An icon, so no tab logs a 404 for /favicon.ico (in the page, and for a direct ask).
        assert '<link rel="icon" href="data:image/svg+xml,' in body
        status, content_type, body = await node.get("/favicon.ico")
        assert status == 200 and content_type == "image/svg+xml" and body.startswith("<svg")
        stats = await node.stats()
        assert stats["running"] and stats["broker"] == "memory" and stats["worker"] is not None


async def test_a_batch_of_messages_goes_out_in_one_frame(settings: DemoSettings) -> None:
    """With a delivery batch delay, messages sent within it reach a connection in one
    ``messages`` frame (or a few), complete and in order."""
    settings = dataclasses.replace(settings, delivery_batch_delay=0.1)
    async with serve(settings) as node, client(node) as alice, client(node) as bob:
        await alice.join("lobby", "alice")
        await bob.join("lobby", "bob")
        for i in range(30):
            await alice.say(f"m{i}")
        got = await bob.messages(30)
        assert texts(got) == [f"m{i}" for i in range(30)]
        assert sum(bob.batches) >= 20 and len(bob.batches) <= 3, bob.batches
        assert texts(await alice.messages(30)) == [f"m{i}" for i in range(30)]


def test_a_long_batch_is_split_over_frames_of_at_most_the_limit() -> None:
    frames: list[dict[str, object]] = [
        {"type": "message", "id": str(i), "room": "r", "text": "x" * 100_000} for i in range(12)
    ]
    texts_ = _batch_frames(frames)
    assert len(texts_) > 1 and all(len(t) <= MAX_BATCH_FRAME + 200 for t in texts_)
    carried = []
    for text in texts_:
        frame = json.loads(text)
        carried += frame["messages"] if frame["type"] == "messages" else [frame]
    assert [f["id"] for f in carried] == [str(i) for i in range(12)]
    assert json.loads(_batch_frames(frames[:1])[0]) == frames[0]  # one: a message frame


async def test_two_clients_chat_with_history_and_recovery(settings: DemoSettings) -> None:
    async with serve(settings) as node, client(node) as alice:
        joined = await alice.join("lobby", "alice")
        assert joined.pop("member")
        assert joined == {
            "type": "joined", "room": "lobby", "mode": "history", "recovered": 0, "complete": True
        }  # fmt: skip
        await alice.say("one")
        await alice.say("two")
        own = await alice.messages(2)  # the sender gets its own messages, with their ids
        assert texts(own) == ["one", "two"] and own[0]["name"] == "alice"

        async with client(node) as bob:
            joined = await bob.join("lobby", "bob")
            assert joined["mode"] == "history" and joined["recovered"] == 2
            assert (await bob.messages(2)) == own  # history on join, in order
            await bob.say("hi")
            (hi,) = await alice.messages(1)
            assert (await bob.messages(1)) == [hi] and hi["name"] == "bob"

        # Bob's connection is gone; what Alice says now is missed by him, and stored.
        await alice.say("m1")
        await alice.say("m2")
        await alice.say("m3")
        missed = await alice.messages(3)

        async with client(node) as bob:
            joined = await bob.join("lobby", "bob", since=hi["id"])
            assert joined["mode"] == "since"
            assert (joined["recovered"], joined["complete"]) == (3, True)
            assert (await bob.messages(3)) == missed  # exactly the missed ones, in order
            await alice.say("live")
            # The next frame Bob gets is the live one: nothing was recovered twice.
            assert texts(await bob.messages(1)) == ["live"]
            assert texts(await alice.messages(1)) == ["live"]


async def test_bad_input_gets_an_error_frame_and_loses_nothing(settings: DemoSettings) -> None:
    async with serve(settings) as node, client(node) as alice, client(node) as bob:
        await bob.say("too early")
        error = await bob.recv()
        assert (error["type"], error["error"]) == ("error", "NotJoined")
        await alice.join("lobby", "alice")
        await bob.join("lobby", "bob")

        await bob.say("x" * (settings.max_payload + 1))
        error = await bob.recv()
        assert (error["request"], error["error"]) == ("send", "PayloadTooLarge"), error

        for room in ("bad\x07room", "", "r" * (settings.max_room_length + 1)):
            await bob.send({"type": "join", "room": room, "name": "bob"})
            error = await bob.recv()
            assert (error["request"], error["error"]) == ("join", "InvalidRoomName"), error

        for garbage in ("not json", '{"type": "dance"}', '{"type": "send"}', b"\x00binary"):
            await bob.send(garbage)
            error = await bob.recv()
            assert (error["type"], error["error"]) == ("error", "BadRequest"), error
        await bob.send({"type": "join", "room": "lobby", "name": " "})
        assert (await bob.recv())["error"] == "BadRequest"

        # Bob is still connected and still in the lobby; Alice saw none of it.
        await bob.say("still here")
        assert texts(await bob.messages(1)) == ["still here"]
        assert texts(await alice.messages(1)) == ["still here"]
        stats = await node.stats()
        assert stats["router"]["published"] == 1 and stats["connections"] == 2


async def test_switching_rooms_shows_only_the_new_room(settings: DemoSettings) -> None:
    async with serve(settings) as node, client(node) as alice, client(node) as bob:
        await alice.join("a", "alice")
        await alice.say("in a")
        await alice.messages(1)
        await bob.join("b", "bob")
        await bob.say("in b")
        await bob.messages(1)

        joined = await alice.join("b", "alice")
        assert (joined["room"], joined["recovered"]) == ("b", 1)
        assert texts(await alice.messages(1)) == ["in b"]
        await bob.join("a", "bob")  # Bob left b: Alice alone there now
        assert texts(await bob.messages(1)) == ["in a"]
        await alice.say("only alice in b")
        await bob.say("bob in a")
        assert texts(await alice.messages(1)) == ["only alice in b"]
        assert texts(await bob.messages(1)) == ["bob in a"]


async def test_history_is_stored_in_sqlite_and_survives_a_restart(
    settings: DemoSettings, tmp_path: Path
) -> None:
    async with serve(settings) as node, client(node) as alice:
        await alice.join("lobby", "alice")
        for i in range(5):
            await alice.say(f"kept {i}")
        sent = await alice.messages(5)
    # The worker stored everything before the server finished shutting down.
    with sqlite3.connect(tmp_path / "chat.db") as db:
        rows = db.execute("SELECT id FROM roomrouter_messages ORDER BY id").fetchall()
    db.close()
    assert [r[0] for r in rows] == [f["id"] for f in sent]

    # A new process would have a new memory hub: only the SQLite file connects the two runs.
    restarted = replace(settings, broker=f"memory://demo-{uuid.uuid4().hex[:8]}", history=3)
    async with serve(restarted) as node, client(node) as bob:
        joined = await bob.join("lobby", "bob")
        assert joined["recovered"] == 3
        assert (await bob.messages(3)) == sent[-3:]
        joined = await bob.join("lobby", "bob", since=sent[1]["id"])
        assert (joined["mode"], joined["recovered"]) == ("since", 3)
        assert (await bob.messages(3)) == sent[2:]


async def test_two_nodes_share_rooms_and_history(backend: Backend, tmp_path: Path) -> None:
    """Two demo servers on one broker and one SQLite file, as `roomrouter demo --broker URL
    --port N` twice: clients on different nodes talk, each node runs a storage worker, and
    history reads the shared file. Runs on every selected backend."""
    # Memory: the two servers share a named hub of this process. The storage group's session
    # (redelivery_after) is the backend's test value, as in the other storage tests.
    memory = f"memory://demo-{backend.namespace}"
    redelivery = backend.redelivery_after
    url = backend.process_url(redelivery_after=redelivery) if backend.url_for_process else memory
    persistent = broker_from_url(url).supports_storage
    settings = DemoSettings(
        broker=url, namespace=backend.namespace, sink=f"sqlite:///{tmp_path / 'chat.db'}"
    )
    async with serve(settings) as node_a, serve(settings) as node_b:
        async with client(node_a) as alice, client(node_b) as bob:
            await alice.join("lobby", "alice")
            await bob.join("lobby", "bob")
            await alice.say("from a")
            await bob.say("from b")
            got_alice = await alice.messages(2)
            got_bob = await bob.messages(2)
            assert sorted(texts(got_alice)) == sorted(texts(got_bob)) == ["from a", "from b"]
            stats_a, stats_b = await node_a.stats(), await node_b.stats()
            assert stats_a["node"] != stats_b["node"]
            assert {m["node"] for m in got_alice} == {stats_a["node"], stats_b["node"]}
            assert stats_a["router"]["broker_publishes"] >= 1  # a remote host: not bypassed

            async def stored() -> None:
                a, b = (await node_a.stats())["worker"], (await node_b.stats())["worker"]
                assert a["acked"] + b["acked"] >= 2

            if persistent:
                # The two workers form one storage group, and a group stores nothing while it
                # forms: on Kafka the coordinator answers the first JoinGroup only after a delay
                # (Tansu: half the session timeout) and the second worker's join makes a
                # rebalance of up to one more session. Both workers joined just now, so the
                # frames can wait up to about two sessions for a worker to own their partition.
                await eventually(stored, timeout=5 + 2 * redelivery)
        async with client(node_b) as carol:
            joined = await carol.join("lobby", "carol")
            if persistent:
                assert joined["recovered"] == 2
                assert {m["id"] for m in await carol.messages(2)} == {m["id"] for m in got_alice}
            else:  # a broker without a storage queue: live only
                assert joined["recovered"] == 0


async def test_a_slow_client_is_disconnected_and_recovers_everything(
    settings: DemoSettings,
) -> None:
    """A client that stops reading fills its socket, then its bounded inbox; the server closes
    it (policy "disconnect") instead of dropping messages, and a reconnect with ``since``
    recovers exactly what it did not get."""
    settings = replace(settings, inbox_size=8, history=0)
    text = "x" * 8000
    async with serve(settings) as node, client(node) as alice:
        await alice.join("lobby", "alice")
        # The slow client: a small receive buffer, a client library that stops reading the
        # socket after one unread frame, and no compression (which would shrink the repetitive
        # text a thousandfold and let the socket hold thousands of messages).
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", int(node.host.rsplit(":", 1)[1])))
        async with connect(
            node.ws_url, sock=sock, max_queue=1, open_timeout=5, compression=None
        ) as raw:
            slow = Client(raw)
            assert (await slow.recv())["type"] == "hello"
            await slow.join("lobby", "slow")
            sent: list[str] = []
            with anyio.fail_after(60):
                while (await node.stats())["router"]["members_disconnected"] == 0:
                    for _ in range(20):
                        await alice.say(text)
                        sent.append((await alice.messages(1))[0]["id"])
            got: list[str] = []
            close_code = None
            with anyio.fail_after(20):
                try:
                    while True:
                        got.append((await slow.recv())["id"])
                except ConnectionClosed as exc:
                    close_code = exc.rcvd.code if exc.rcvd else None
        assert close_code in (4000, None)  # None: the close frame itself could not be sent
        assert got == sent[: len(got)] and len(got) < len(sent)

        async with client(node) as slow_again:
            joined = await slow_again.join("lobby", "slow", since=got[-1])
            assert (joined["recovered"], joined["complete"]) == (len(sent) - len(got), True)
            recovered = await slow_again.messages(joined["recovered"])
            assert got + [m["id"] for m in recovered] == sent  # everything, once, in order


async def test_roomrouter_demo_command(tmp_path: Path) -> None:
    """The README's command, as a subprocess: it prints its URL, serves the chat, stores the
    history in the SQLite file named by --sink, and shuts down gracefully on Ctrl-C (exit
    status 130, as for any interrupted command: uvicorn re-raises the signal it handled)."""
    command = Path(sys.executable).with_name("roomrouter")
    db = tmp_path / "cmd.db"
    async with await anyio.open_process(
        [str(command), "demo", "--port", "0", "--sink", f"sqlite:///{db}"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    ) as process:
        assert process.stdout is not None
        try:
            first_line = b""
            with anyio.fail_after(20):
                while b"\n" not in first_line:
                    first_line += await process.stdout.receive()
            line = first_line.decode().splitlines()[0]
            assert line.startswith("roomrouter demo on http://127.0.0.1:"), line
            assert str(db) in line
            url = line.split()[3]
            node = Node(url.removeprefix("http://"))
            async with client(node) as alice, client(node) as bob:
                await alice.join("lobby", "alice")
                await bob.join("lobby", "bob")
                await alice.say("hello from the command")
                assert texts(await bob.messages(1)) == ["hello from the command"]
        finally:
            if process.returncode is None:
                process.send_signal(signal.SIGINT)
        with anyio.fail_after(20):
            assert await process.wait() == 130
        assert process.stderr is not None
        errors = b""
        with anyio.fail_after(5):
            async for chunk in process.stderr:
                errors += chunk
        assert b"Application shutdown complete" in errors
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM roomrouter_messages").fetchone() == (1,)
    conn.close()


@pytest.mark.parametrize("module", ["starlette", "prometheus_client"])
async def test_demo_command_without_the_extra_names_it(module: str) -> None:
    # A package of the extra hidden from the import system: the command says which extra to
    # install (the demo's, not the prometheus one it pulls in).
    code = (
        f"import sys; sys.modules[{module!r}] = None; "
        "from roomrouter.cli import main; sys.exit(main(['demo']))"
    )
    result = await anyio.run_process([sys.executable, "-c", code], check=False)
    assert result.returncode == 1
    assert b'pip install "roomrouter[demo]"' in result.stderr


def who(frame: Frame) -> list[str]:
    return [m["name"] for m in frame["members"]]


async def test_presence_list_and_join_leave_events(settings: DemoSettings) -> None:
    """The who-is-here list: the whole list after `joined`, then join and leave events; a
    join under another name replaces the member (the old name leaves); another room's
    comings and goings are not shown."""
    async with serve(settings) as node, client(node) as alice:
        await alice.join("lobby", "alice")
        state = await alice.presence_frame()
        assert (state["type"], state["room"], who(state)) == ("presence", "lobby", ["alice"])
        # Alice's own join may also come as an event (the watch began before it was written).
        async with client(node) as bob:
            await bob.join("lobby", "bob")
            assert who(await bob.presence_frame()) == ["alice", "bob"]
            while (event := await alice.presence_frame())["member"]["name"] != "bob":
                assert event["member"]["name"] == "alice", event
            assert event["kind"] == "join"
            assert event["member"]["node"] == (await node.stats())["node"]

            async with client(node) as carol:
                await carol.join("elsewhere", "carol")  # not Alice's room: she sees nothing
                await carol.presence_frame()
                await bob.join("lobby", "robert")  # a new name: a new member, the old one leaves
                events = [await alice.presence_frame() for _ in range(2)]
                assert sorted((e["kind"], e["member"]["name"]) for e in events) == [
                    ("join", "robert"),
                    ("leave", "bob"),
                ]
        # Robert's connection closed: he left.
        event = await alice.presence_frame()
        assert (event["kind"], event["member"]["name"]) == ("leave", "robert")
        assert alice.presence == []


async def test_presence_can_be_turned_off_and_set_apart(
    settings: DemoSettings, tmp_path: Path
) -> None:
    off = replace(settings, presence=False)
    async with serve(off) as node, client(node) as alice:
        await alice.join("lobby", "alice")
        await alice.say("hi")
        assert texts(await alice.messages(1)) == ["hi"]  # no presence frame came first
    with pytest.raises(ConfigurationError, match="keeps no presence"):
        server_for(replace(settings, broker="amqp://guest:guest@127.0.0.1/", presence=True))
    # A store of its own beside the broker (as redis beside amqp): here a separate memory one.
    apart = replace(settings, presence=f"memory://presence-{uuid.uuid4().hex[:8]}")
    async with serve(apart) as node, client(node) as alice:
        await alice.join("other", "alice")  # (the lobby's history is in the shared file)
        assert who(await alice.presence_frame()) == ["alice"]


async def test_oversize_and_empty_messages_get_error_frames(settings: DemoSettings) -> None:
    """A message well over the limit (that the old frame limit closed with 1009) and an empty
    one are answered with error frames; the connection stays, nothing is published."""
    async with serve(settings) as node, client(node) as alice:
        await alice.join("lobby", "alice")
        await alice.say("x" * (10 * settings.max_payload))
        error = await alice.recv()
        assert (error["request"], error["error"]) == ("send", "PayloadTooLarge"), error
        for empty in ("", "   ", "\n\t"):
            await alice.say(empty)
            error = await alice.recv()
            assert (error["request"], error["error"]) == ("send", "EmptyMessage"), error
        await alice.say("fine")
        assert texts(await alice.messages(1)) == ["fine"]
        assert (await node.stats())["router"]["published"] == 1


async def test_metrics_are_served_for_prometheus(settings: DemoSettings) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    async with serve(settings) as node, client(node) as alice:
        await alice.join("lobby", "alice")
        await alice.say("counted")
        await alice.messages(1)
        node_id = (await node.stats())["node"]

        families: dict[str, Any] = {}

        async def scrape() -> None:
            status, content_type, body = await node.get("/metrics")
            assert status == 200 and content_type.startswith("text/plain"), content_type
            families.clear()
            families.update((f.name, f) for f in text_string_to_metric_families(body))
            assert families["roomrouter_worker_acked"].samples[0].value >= 1  # stored

        await eventually(scrape)
        published = families["roomrouter_published"]
        assert published.type == "counter"
        (sample,) = published.samples
        assert (sample.name, sample.labels, sample.value) == (
            "roomrouter_published_total",
            {"node": node_id},
            1.0,
        )
        for gauge, value in (("members", 1), ("local_rooms", 1), ("live_nodes", 0)):
            family = families[f"roomrouter_{gauge}"]
            assert family.type == "gauge" and family.samples[0].value == value, family
        worker = families["roomrouter_worker_acked"]
        assert worker.type == "counter" and worker.samples[0].labels == {"node": node_id}


async def test_the_library_never_imports_the_demo() -> None:
    """The demo ships in the wheel (examples/chat/README.md says why) on one condition: the
    library does not load it, nor what it needs, unless `roomrouter demo` runs."""
    code = (
        "import sys, roomrouter, roomrouter.presence, roomrouter.storage, roomrouter.cli\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('starlette', 'uvicorn', 'websockets', 'prometheus_client') or "
        "m.startswith('roomrouter._demo') or m.startswith('roomrouter.integrations')))"
    )
    result = await anyio.run_process([sys.executable, "-c", code])
    assert result.stdout.decode().strip() == "[]"


async def test_presence_beside_a_broker_that_keeps_none(tmp_path: Path) -> None:
    """RabbitMQ between the nodes, Redis for the who-is-here list (``presence=URL``): a tab on
    one node sees who is on the other, and sees them leave."""
    from .backends import BACKENDS

    rabbit, redis = BACKENDS["rabbitmq"](f"demo-{uuid.uuid4().hex[:8]}"), BACKENDS["redis"]("")
    rabbit.available()
    redis.available()
    redis.namespace = rabbit.namespace  # its cleanup removes this test's presence keys
    settings = DemoSettings(
        broker=rabbit.process_url(),
        namespace=rabbit.namespace,
        sink=f"sqlite:///{tmp_path / 'chat.db'}",
        presence="redis://127.0.0.1:6379/0",
    )
    try:
        async with serve(settings) as node_a, serve(settings) as node_b, client(node_a) as alice:
            await alice.join("lobby", "alice")
            assert who(await alice.presence_frame()) == ["alice"]
            async with client(node_b) as bob:
                await bob.join("lobby", "bob")
                assert who(await bob.presence_frame()) == ["alice", "bob"]
                while (event := await alice.presence_frame())["member"]["name"] != "bob":
                    assert event["member"]["name"] == "alice", event  # her own join, again
                assert event["kind"] == "join"
                assert event["member"]["node"] == (await node_b.stats())["node"]
            event = await alice.presence_frame()
            assert (event["kind"], event["member"]["name"]) == ("leave", "bob")
    finally:
        await rabbit.cleanup()
        await redis.cleanup()
