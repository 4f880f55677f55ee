"""Faults: a node killed without a clean close (SIGKILL), and lost broker connections."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from .backends import BACKENDS, Backend
from .conftest import selected_backends, unique_namespace
from .helpers import eventually

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent

#: Backends whose cluster can span processes (the memory hub is one process).
CROSS_PROCESS = [name for name in selected_backends() if BACKENDS[name].url_for_process]


@pytest.fixture(params=CROSS_PROCESS)
async def process_backend(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    backend = BACKENDS[request.param](unique_namespace())
    backend.available()
    try:
        yield backend
    finally:
        await backend.cleanup()


@pytest.mark.serial  # times the expiry against the TTL with 0.5 s of slack: an idle host
async def test_killed_node_leaves_the_cluster_view_within_its_ttl(
    process_backend: Backend,
) -> None:
    from roomrouter import RoomRouter

    backend = process_backend
    opts = {"linger": 0, "heartbeat_interval": 0.2, "node_ttl": 1.5, **backend.router_options}
    async with RoomRouter(backend.broker(), namespace=backend.namespace, **opts) as watcher:
        child = subprocess.Popen(
            [sys.executable, "-m", "tests.node_process", backend.process_url(),
             backend.namespace, "doomed-room", "other-room", "--lifetime", "60"],
            cwd=ROOT, stdout=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        )  # fmt: skip
        try:
            assert child.stdout is not None
            with anyio.fail_after(20):
                node_id = (await anyio.to_thread.run_sync(child.stdout.readline)).strip()
            assert node_id, "child node did not start"
            await eventually(lambda: _assert(node_id in watcher.live_nodes()))
            assert {"doomed-room", "other-room"} <= await watcher.rooms()
            assert watcher.remote_hosts("doomed-room") == {node_id}

            child.send_signal(signal.SIGKILL)
            killed_at = anyio.current_time()
            await eventually(lambda: _assert(node_id not in watcher.live_nodes()), timeout=5)
            gone_after = anyio.current_time() - killed_at
            # Within the TTL, plus one expiry tick of the watcher.
            assert gone_after <= 1.5 + 0.2 + 0.5, gone_after  # TTL + expiry tick + load slack
            assert "doomed-room" not in await watcher.rooms()
            assert watcher.remote_hosts("doomed-room") == frozenset()
            # And the watcher publishes to that room locally again (no host left).
            publishes = watcher.stats()["broker_publishes"]
            await watcher.publish("doomed-room", b"nobody there")
            assert watcher.stats()["broker_publishes"] == publishes
        finally:
            child.kill()
            child.wait(timeout=10)
            if child.stdout is not None:
                child.stdout.close()


def _assert(condition: bool) -> None:
    assert condition


async def test_node_stalled_past_its_ttl_is_known_again_after_it_resumes(
    process_backend: Backend,
) -> None:
    """A node blocks its event loop (a synchronous sleep) for longer than its TTL right after
    leaving one of its rooms. The others drop it; once it resumes, the first frame they hear
    from it is that leave's Unhost, not a heartbeat. They must ask it for its whole state: its
    other rooms are still hosted there, and publishes to them must reach it again."""
    import threading

    from roomrouter import RoomRouter

    backend = process_backend
    opts = {"linger": 0, "heartbeat_interval": 0.2, "node_ttl": 1.5, **backend.router_options}
    async with RoomRouter(backend.broker(), namespace=backend.namespace, **opts) as watcher:
        child = subprocess.Popen(
            [sys.executable, "-m", "tests.node_process", backend.process_url(),
             backend.namespace, "left-room", "kept-room", "--lifetime", "60",
             "--print-received", "--stall", "left-room:3.5"],
            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        )  # fmt: skip
        lines: list[str] = []

        def read() -> None:
            assert child.stdout is not None
            for line in child.stdout:
                lines.append(line.strip())

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            await eventually(lambda: _assert(bool(lines)), timeout=20)
            node_id = lines[0]
            await eventually(lambda: _assert(watcher.remote_hosts("kept-room") == {node_id}))
            assert child.stdin is not None
            child.stdin.write("stall\n")
            child.stdin.flush()
            await eventually(lambda: _assert(node_id not in watcher.live_nodes()), timeout=5)
            await eventually(lambda: _assert("resumed" in lines), timeout=10)
            await eventually(lambda: _assert(node_id in watcher.live_nodes()), timeout=5)
            await eventually(
                lambda: _assert(watcher.remote_hosts("kept-room") == {node_id}), timeout=5
            )
            assert watcher.remote_hosts("left-room") == frozenset()
            await watcher.publish("kept-room", b"after-the-stall")
            await eventually(lambda: _assert("got kept-room after-the-stall" in lines), timeout=5)
        finally:
            child.kill()
            child.wait(timeout=10)
            reader.join(timeout=5)
            for stream in (child.stdin, child.stdout):
                if stream is not None:
                    stream.close()


class _Child:
    """A node process (tests/node_process.py) whose output lines are collected by a thread."""

    def __init__(self, backend: Backend, *args: str) -> None:
        import threading

        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.node_process", backend.process_url(),
             backend.namespace, *args],
            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        )  # fmt: skip
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.strip())

    async def node_id(self) -> str:
        await eventually(lambda: _assert(bool(self.lines)), timeout=20)
        return self.lines[0]

    def say(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def close(self) -> None:
        self.process.kill()
        self.process.wait(timeout=10)
        self._reader.join(timeout=5)
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                stream.close()


@pytest.mark.serial
async def test_joins_on_survivors_complete_within_a_second_of_a_peer_sigkill(
    process_backend: Backend,
) -> None:
    """Issue 19, case 6: every Socket.IO connect joins a room; after a peer's SIGKILL each of
    those joins waited for the dead node's Ack until its TTL (4 s here), so every connection
    of the crashed node's reconnecting clients failed. A join must not wait for a node
    silent for the suspect interval (3 heartbeats: 0.6 s here)."""
    from roomrouter import RoomRouter

    backend = process_backend
    opts = {"linger": 0, "heartbeat_interval": 0.2, "node_ttl": 4.0, **backend.router_options}
    async with RoomRouter(backend.broker(), namespace=backend.namespace, **opts) as survivor:
        child = _Child(backend, "doomed-room", "--lifetime", "60")
        try:
            node_id = await child.node_id()
            await eventually(lambda: _assert(node_id in survivor.live_nodes()), timeout=10)
            child.process.send_signal(signal.SIGKILL)
            killed_at = anyio.current_time()
            took: dict[str, float] = {}

            async def connect(i: int) -> None:
                await survivor.member(f"client-{i}").join(f"sid-{i}")
                took[f"sid-{i}"] = anyio.current_time() - killed_at

            with anyio.fail_after(10):
                async with anyio.create_task_group() as tg:
                    for i in range(20):
                        tg.start_soon(connect, i)
            slowest = max(took.values())
            assert slowest < 1.0, f"joins waited {slowest:.2f}s for a SIGKILLed peer"
            assert survivor.stats()["barrier_suspects"] >= 1
            assert node_id in survivor.live_nodes()  # suspect, not expired: that is the TTL's
            # A join that starts while the dead node is suspect does not wait for it at all.
            started = anyio.current_time()
            await survivor.member("late").join("late-room")
            assert anyio.current_time() - started < 0.3
        finally:
            child.close()


@pytest.mark.serial
async def test_node_stalled_past_the_suspect_interval_loses_nothing(
    process_backend: Backend,
) -> None:
    """A node's loop blocks for longer than the suspect interval (0.6 s) but less than the
    other node's TTL (3 s here: load on the test machine must not make it an expiry).
    Meanwhile the other node joins rooms without waiting for it and publishes. When the
    stalled node resumes it publishes at once, before it read the Host frames sent during its
    stall: it must not bypass the broker (it resynchronises first), and what was published to
    its own room during the stall reaches its member."""
    from roomrouter import RoomRouter

    backend = process_backend
    opts = {"linger": 0, "heartbeat_interval": 0.2, "node_ttl": 3.0, **backend.router_options}
    async with RoomRouter(backend.broker(), namespace=backend.namespace, **opts) as other:
        child = _Child(
            backend, "hall", "--lifetime", "60", "--print-received",
            "--stall-publish", "1.5:fresh-room,hall",
        )  # fmt: skip
        try:
            node_id = await child.node_id()
            await eventually(lambda: _assert(other.remote_hosts("hall") == {node_id}), timeout=10)
            child.say("stall")
            await eventually(lambda: _assert("stalling" in child.lines), timeout=10)
            await anyio.sleep(0.8)  # past the suspect interval (0.6 s), within the stall
            members = [other.member("in-fresh"), other.member("in-hall")]
            started = anyio.current_time()
            with anyio.fail_after(5):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(members[0].join, "fresh-room")
                    tg.start_soon(members[1].join, "hall")
            took = anyio.current_time() - started
            assert "resumed" not in child.lines, f"the joins waited for the stall ({took:.2f}s)"
            sent = await other.publish("hall", b"during-the-stall")
            await eventually(lambda: _assert("resumed" in child.lines), timeout=10)
            # The stalled node's publishes, made before it read anything: both arrive.
            for member in members:
                with anyio.fail_after(5):
                    got = await member.receive()
                while got.id == sent.id:  # the hall member gets the other node's own too
                    with anyio.fail_after(5):
                        got = await member.receive()
                assert got.payload == b"from-stalled", member.id
            # And its member got what was published to its room while it stalled.
            await eventually(lambda: _assert("got hall during-the-stall" in child.lines), 5)
            assert node_id in other.live_nodes()
            assert other.stats()["nodes_expired"] == 0
        finally:
            child.close()


@pytest.mark.serial
async def test_an_observer_whose_loop_was_blocked_expires_no_peer(
    process_backend: Backend,
) -> None:
    """The observing node's own loop is blocked for longer than the TTL while its peer keeps
    heartbeating. The peer's frames wait unread in the socket: an expiry (or suspicion) that
    runs before the reader caught up must not count the observer's own lateness against the
    peer."""
    import time

    from roomrouter import RoomRouter

    backend = process_backend
    opts = {"linger": 0, "heartbeat_interval": 0.2, "node_ttl": 1.5, **backend.router_options}
    async with RoomRouter(backend.broker(), namespace=backend.namespace, **opts) as watcher:
        child = _Child(backend, "room", "--lifetime", "60")
        try:
            node_id = await child.node_id()
            await eventually(lambda: _assert(node_id in watcher.live_nodes()), timeout=10)
            time.sleep(2.0)  # noqa: ASYNC251 - the point: the observer's loop stops
            # The heartbeat task may run before the reader after such a block: it expires.
            watcher._cluster.expire()
            assert node_id in watcher.live_nodes()
            assert node_id not in watcher._cluster.suspects()  # nor would a join skip it
            await anyio.sleep(1.0)  # the reader catches up; heartbeats go on
            assert node_id in watcher.live_nodes()
            assert watcher.stats()["nodes_expired"] == 0
        finally:
            child.close()


async def test_a_reconnected_node_bypasses_nothing_until_resynchronised(backend: Backend) -> None:
    """After a lost broker connection a node may have missed Host frames (a join elsewhere
    that went on without its Ack): until every live node answered its Sync, every publish goes
    through the broker, then the bypass comes back."""
    from roomrouter import RoomRouter
    from roomrouter._cluster import State

    from .conftest import TEST_ROUTER_OPTIONS
    from .faulty import ControlFault

    opts = {**TEST_ROUTER_OPTIONS, **backend.router_options}
    faulty = ControlFault(backend.broker())
    async with (
        RoomRouter(faulty, namespace=backend.namespace, **opts) as a,
        RoomRouter(backend.broker(), namespace=backend.namespace, **opts) as b,
    ):
        await eventually(lambda: _assert(b.node_id in a.live_nodes()), timeout=5)
        await a.member("m").join("only-here")
        before = a.stats()
        await a.publish("only-here", b"bypassed")
        assert a.stats()["bypassed_publishes"] == before["bypassed_publishes"] + 1
        faulty.drop_all = {State}  # the answers are lost for now
        faulty.fake_reconnect()
        published = a.stats()["broker_publishes"]
        await a.publish("only-here", b"through the broker")
        assert a.stats()["broker_publishes"] == published + 1
        assert not a._cluster.synced
        faulty.drop_all = set()  # the Sync is asked again, and answered
        await eventually(lambda: _assert(a._cluster.synced), timeout=5)
        bypassed = a.stats()["bypassed_publishes"]
        await a.publish("only-here", b"bypassed again")
        assert a.stats()["bypassed_publishes"] == bypassed + 1
        # The reconnect's resync; under load a loop that runs late starts another (correctly).
        assert a.stats()["resyncs"] >= 1
