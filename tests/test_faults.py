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
