"""``roomrouter inspect`` against a running two-node cluster (a subprocess, as a user runs it),
and the cluster view it reads (``router.nodes()``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from contextlib import AsyncExitStack
from pathlib import Path

import anyio
import pytest

from roomrouter import RoomRouter

from .backends import BACKENDS, Backend
from .conftest import TEST_ROUTER_OPTIONS, ClusterFactory, unique_namespace
from .helpers import eventually

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
REDIS = "redis://127.0.0.1:6379/0"


def _assert(condition: object) -> None:
    assert condition


async def test_nodes_report_age_rooms_and_members(cluster: ClusterFactory) -> None:
    a, b = await cluster(2)
    for i in range(3):
        await b.member(f"m{i}").join(f"room-{i % 2}")
    a.member("lonely")

    def check() -> None:
        mine, *others = a.nodes()
        assert (mine.node_id, mine.members, mine.rooms) == (a.node_id, 1, frozenset())
        [seen] = others
        assert seen.node_id == b.node_id
        assert seen.rooms == {"room-0", "room-1"}
        assert seen.members == 3  # carried by heartbeats
        assert 0 < seen.started <= mine.started + 5
        assert seen.last_seen < 2.0

    await eventually(check, timeout=5)


def _inspect_process(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "roomrouter.cli", "inspect", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src"), "COLUMNS": "200"},
    )  # fmt: skip


async def _run_inspect(*args: str) -> subprocess.CompletedProcess[str]:
    return await anyio.to_thread.run_sync(lambda: _inspect_process(*args))


@pytest.mark.parametrize("broker_name", ["redis", "redis-cluster", "rabbitmq"])
async def test_inspect_shows_nodes_rooms_and_presence(broker_name: str) -> None:
    backend: Backend = BACKENDS[broker_name](unique_namespace())
    backend.available()
    opts = {**TEST_ROUTER_OPTIONS, **backend.router_options, "heartbeat_interval": 0.5}
    try:
        async with AsyncExitStack() as stack:
            a, b = [
                await stack.enter_async_context(
                    RoomRouter(
                        backend.broker(), namespace=backend.namespace, presence=REDIS, **opts
                    )
                )
                for _ in range(2)
            ]
            await a.member("alice").join("lecture")
            await b.member("bob").join("lecture")
            await b.member("carol").join("lobby")
            await eventually(lambda: _assert(len(a.remote_hosts("lecture")) == 1))
            url = backend.process_url()
            done = await _run_inspect(
                "--broker", url, "--namespace", backend.namespace, "--presence", REDIS, "--json"
            )
            assert done.returncode == 0, done.stderr
            report = json.loads(done.stdout)
            assert "guest:guest" not in done.stdout
            nodes = {n["id"]: n for n in report["nodes"]}
            assert set(nodes) == {a.node_id, b.node_id}
            assert (nodes[a.node_id]["rooms"], nodes[a.node_id]["members"]) == (1, 1)
            assert (nodes[b.node_id]["rooms"], nodes[b.node_id]["members"]) == (2, 2)
            assert all(n["age_s"] is not None and n["age_s"] >= 0 for n in nodes.values())
            assert report["rooms"] == [
                {"room": "lecture", "hosts": sorted([a.node_id, b.node_id]), "presence": 2},
                {"room": "lobby", "hosts": [b.node_id], "presence": 1},
            ]
            # The tables for people: the same facts.
            table = await _run_inspect("--broker", url, "--namespace", backend.namespace)
            assert table.returncode == 0, table.stderr
            for text in (a.node_id, b.node_id, "lecture", "lobby", "2 live node(s)"):
                assert text in table.stdout, table.stdout
            # The inspector was a node for a moment and said goodbye.
            await eventually(lambda: _assert(a.live_nodes() == {b.node_id}), timeout=5)
    finally:
        await backend.cleanup()
        await BACKENDS["redis"](backend.namespace).cleanup()


def test_version_and_help() -> None:
    from roomrouter import __version__

    done = subprocess.run(
        [sys.executable, "-m", "roomrouter.cli", "--version"], cwd=ROOT, capture_output=True,
        text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )  # fmt: skip
    assert done.returncode == 0 and __version__ in done.stdout
    import click

    from roomrouter.cli import cli

    assert set(cli.commands) == {"bench", "demo", "worker", "inspect"}
    for name, command in cli.commands.items():
        for param in command.params:
            if isinstance(param, click.Option):
                assert param.help, f"roomrouter {name} {param.opts[0]} has no help text"
        done = subprocess.run(
            [sys.executable, "-m", "roomrouter.cli", name, "--help"], cwd=ROOT,
            capture_output=True, text=True, timeout=60,
            env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        )  # fmt: skip
        # `roomrouter bench` hands every option, --help included, to the suite's own parser.
        usage = "usage: python -m benchmarks" if name == "bench" else "Usage: roomrouter " + name
        assert done.returncode == 0 and usage in done.stdout, done.stderr


def test_without_rich_inspect_says_so_at_once(tmp_path: Path) -> None:
    """Without the ``cli`` extra the table view fails before joining the cluster (it listened
    for the whole ``--wait`` first, ~4 s, before saying so); ``--json`` needs no extra."""
    blocked = tmp_path / "rich"
    blocked.mkdir()
    (blocked / "__init__.py").write_text("raise ImportError('rich is not installed (test)')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT / "src")])}
    command = [sys.executable, "-m", "roomrouter.cli", "inspect", "--broker", "memory://",
               "--namespace", unique_namespace(), "--wait", "5"]  # fmt: skip
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env)
    elapsed = time.monotonic() - started
    assert done.returncode == 1, (done.returncode, done.stderr)
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("roomrouter: "), done.stderr
    assert "roomrouter[cli]" in done.stderr and "--json" in done.stderr, done.stderr
    assert elapsed < 4.0, elapsed  # never the 5 s of --wait
    done = subprocess.run(
        [*command[:-1], "0", "--json"], capture_output=True, text=True, timeout=60, env=env
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["nodes"] == []
