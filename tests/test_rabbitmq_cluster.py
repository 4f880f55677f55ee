"""roomrouter on a real three-node RabbitMQ cluster (tests/rabbitmq_cluster.py): the contract
suite and the persistence tests with routers connected to different nodes, a router whose node
dies moving to another host of its URL, ``roomrouter inspect``, and the fault test that
SIGKILLs the node leading the storage quorum queue under persisted publishes.

Every URL here names all three nodes (``amqp://guest:guest@h1:p1,h2:p2,h3:p3/``); the node
listed first is where a broker connects first, so rotating it puts routers, workers and
probes on different nodes. Marked ``serial`` (three more Erlang VMs and killed nodes do not
share the machine with the parallel pass) and ``rabbitmq_cluster`` (``-m rabbitmq_cluster``).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import quote

import anyio
import pytest

from roomrouter import (
    Broker,
    BrokerUnavailable,
    DeliveryGap,
    PublishOutcomeUnknown,
    RoomRouter,
)
from roomrouter.brokers.rabbitmq import RabbitMQBroker, amqp_name
from roomrouter.testing import BrokerContract

from . import rabbitmq_cluster
from .backends import RabbitMQBackend
from .conftest import TEST_ROUTER_OPTIONS, unique_namespace
from .helpers import eventually, receive_n
from .rabbitmq_cluster import RabbitMQCluster, require_rabbitmq_server

# The persistence tests, re-run here with routers, workers and probes on different nodes (the
# `sbackend` fixture below replaces theirs for this module).
from .test_persistence import (  # noqa: F401
    nodes,
    test_a_window_the_cache_no_longer_holds_is_reported,
    test_join_with_history_then_live,
    test_persisted_publish_to_a_local_room_goes_to_storage_only,
    test_rejoin_with_since_gets_exactly_the_missed_messages,
)

pytestmark = [pytest.mark.anyio, pytest.mark.serial, pytest.mark.rabbitmq_cluster]

ROOT = Path(__file__).resolve().parent.parent


def _cluster() -> RabbitMQCluster:
    require_rabbitmq_server()
    try:
        return rabbitmq_cluster.shared_cluster()
    except RuntimeError as exc:
        if os.environ.get("CI"):
            pytest.fail(str(exc), pytrace=False)
        pytest.skip(str(exc))


@pytest.fixture(scope="module", autouse=True)
def _stop_cluster_after_module() -> Iterator[None]:
    try:
        yield
    finally:
        rabbitmq_cluster.stop_shared_cluster()


@pytest.fixture
def rcluster() -> Iterator[RabbitMQCluster]:
    """The shared cluster, whole again after the test (a killed node is restarted)."""
    cluster = _cluster()
    try:
        yield cluster
    finally:
        for node in cluster.nodes:
            cluster.restart(node)


class ClusterBackend(RabbitMQBackend):
    """tests/backends.py's RabbitMQ backend on the cluster: each broker it builds lists the
    nodes from the next one on, so consecutive brokers connect to different nodes."""

    name = "rabbitmq-cluster"

    def __init__(self, namespace: str) -> None:
        super().__init__(namespace)
        self.cluster = _cluster()
        self._next = itertools.count()

    def available(self) -> None:
        pass  # _cluster() skipped or failed already

    def process_url(self, **query: object) -> str:
        return self.cluster.url(next(self._next) % len(self.cluster.nodes), **query)

    def broker(self, **options: Any) -> Broker:
        return RabbitMQBroker.from_url(self.process_url(), **options)

    async def inject(self, router: RoomRouter, room: str, frame: bytes) -> None:
        raise NotImplementedError

    async def cleanup(self) -> None:
        await _cleanup(self.cluster, self.namespace)


async def _cleanup(cluster: RabbitMQCluster, namespace: str) -> None:
    """Delete the namespace's durable queues and exchanges (through a live node)."""
    import aiormq

    live = next(i for i, n in enumerate(cluster.nodes) if cluster.alive(n))
    broker = RabbitMQBroker.from_url(cluster.url(live))
    prefix = amqp_name(namespace) + "."
    listing = await broker.management_request(
        "/api/queues/%2F?columns=name&use_regex=true&name=" + quote("^" + re.escape(prefix))
    )
    queues = [q["name"] for q in listing if str(q.get("name", "")).startswith(prefix)]
    connection = await aiormq.connect(f"amqp://guest:guest@{cluster.nodes[live].address}/")
    try:
        channel = await connection.channel()
        for queue in queues:
            await channel.queue_delete(queue)
        for kind in ("data", "control", "direct"):
            await channel.exchange_delete(amqp_name(namespace, kind, exchange=True))
    finally:
        await connection.close()


@pytest.fixture
async def sbackend() -> AsyncIterator[ClusterBackend]:
    backend = ClusterBackend(unique_namespace())
    try:
        yield backend
    finally:
        await backend.cleanup()


async def _connection_node(
    broker: RabbitMQBroker, role: str, via: RabbitMQBroker | None = None
) -> str:
    """The cluster node RabbitMQ says ``broker``'s ``role`` connection is attached to (the
    management API lists a connection within a statistics interval)."""
    name = broker.connection_name(role)
    found: list[str] = []

    async def listed() -> None:
        listing = await (via or broker).management_request(
            "/api/connections?columns=user_provided_name,node"
        )
        found[:] = [c["node"] for c in listing if c.get("user_provided_name") == name]
        assert len(found) == 1, (name, listing)

    await eventually(listed, timeout=10, interval=0.2)
    return found[0]


async def _attached(
    broker: RabbitMQBroker, role: str, node: str, via: RabbitMQBroker | None = None
) -> None:
    """Wait until ``broker``'s ``role`` connection is listed on ``node`` (a closed one may stay
    listed for a statistics interval)."""

    async def there() -> None:
        assert await _connection_node(broker, role, via) == node

    await eventually(there, timeout=15, interval=0.3)


# -- the contract suite, one node per router -------------------------------------------------


class TestRabbitMQClusterContract(BrokerContract):
    """The conformance suite with each broker connected to another node of the cluster."""

    router_options: ClassVar[dict[str, Any]] = dict(RabbitMQBackend.router_options)
    _next: ClassVar[Iterator[int]] = itertools.count()

    def available(self) -> None:
        _cluster()

    @property
    def broker_url(self) -> str:  # type: ignore[override]
        cluster = _cluster()
        return cluster.url(next(self._next) % len(cluster.nodes))

    async def cleanup(self, namespace: str) -> None:
        await _cleanup(_cluster(), namespace)

    async def check_subscriptions(self, routers: Sequence[RoomRouter]) -> None:
        await super().check_subscriptions(routers)
        # The routers really are spread over the nodes (until a reconnect moves one on to the
        # next host of its URL, which may be another's).
        if len(routers) >= 2 and not any(r.stats()["reconnects"] for r in routers):
            homes = set()
            for router in routers:
                assert isinstance(router.broker, RabbitMQBroker)
                homes.add(await _connection_node(router.broker, "sub"))
            assert len(homes) >= 2, homes

    async def break_connection(self, broker: Broker) -> None:
        """Close the broker's connections from the server (management API)."""
        assert isinstance(broker, RabbitMQBroker)
        names = {broker.connection_name("sub"), broker.connection_name("pub")}
        closed: list[str] = []

        async def close() -> None:
            listing = await broker.management_request(
                "/api/connections?columns=name,user_provided_name"
            )
            for conn in listing:
                if conn.get("user_provided_name") in names and conn["name"] not in closed:
                    path = "/api/connections/" + quote(conn["name"], safe="")
                    await broker.management_request(path, method="DELETE")
                    closed.append(conn["name"])
            assert closed, f"no connection named {names} yet"

        await eventually(close, timeout=10)


# -- failover ---------------------------------------------------------------------------------


async def test_router_whose_node_dies_moves_to_the_next_host(rcluster: RabbitMQCluster) -> None:
    """A router on node 2 loses it (SIGKILL): it reconnects to node 3, the next host of its
    URL, restores its rooms, and a router on node 1 reaches its members again."""
    namespace = unique_namespace()
    opts = {**TEST_ROUTER_OPTIONS, **RabbitMQBackend.router_options}
    _, n2, n3 = rcluster.nodes
    try:
        async with (
            RoomRouter(RabbitMQBroker.from_url(rcluster.url(0)), namespace=namespace, **opts) as a,
            RoomRouter(RabbitMQBroker.from_url(rcluster.url(1)), namespace=namespace, **opts) as b,
        ):
            assert isinstance(b.broker, RabbitMQBroker)
            await _attached(b.broker, "sub", n2.name)
            member = b.member("m")
            await member.join("room")
            await eventually(lambda: _hosts(a, "room", b.node_id), timeout=10)
            await a.publish("room", b"before")
            assert [e.payload for e in await receive_n(member, 1)] == [b"before"]

            rcluster.kill(n2)
            killed = time.monotonic()
            gaps: list[float] = []

            async def delivers_again() -> None:
                # The router on node 1 forgets b while it is away and learns it again: publish
                # until one arrives.
                try:
                    await a.publish("room", b"after")
                except BrokerUnavailable:
                    raise AssertionError("publish failed") from None
                envelope = None
                with anyio.move_on_after(0.5):
                    while envelope is None:
                        try:
                            envelope = await member.receive()
                        except DeliveryGap:
                            gaps.append(time.monotonic())  # the reconnect may have lost frames
                assert envelope is not None and envelope.payload == b"after"

            await eventually(delivers_again, timeout=30, interval=0.2)
            resumed = time.monotonic() - killed
            # Asked through node 1's management API: node 2's is gone with it.
            assert isinstance(a.broker, RabbitMQBroker)
            await _attached(b.broker, "sub", n3.name, via=a.broker)
            await _attached(b.broker, "pub", n3.name, via=a.broker)
            b.broker.management_url = a.broker.management_url
            assert await b.broker.broker_subscriptions() == frozenset({"room"})
            assert len(gaps) == 1  # the member was told, once, that it may have missed frames
            print(f"\nrouter moved from {n2.name} to {n3.name}; delivering again {resumed:.1f} s "
                  "after the kill")  # fmt: skip
    finally:
        await _cleanup(rcluster, namespace)


def _hosts(router: RoomRouter, room: str, node_id: str) -> None:
    assert any(n.node_id == node_id and room in n.rooms for n in router.nodes())


def test_quorum_cost_benchmark_runs_on_the_cluster(rcluster: RabbitMQCluster) -> None:
    """benchmarks/rabbitmq_quorum.py against the cluster (its three VMs' CPU counted) and the
    local server: tiny by default, the figures of docs/scaling.md with
    ``ROOMROUTER_QUORUM_BENCH=5000x3`` (messages x rounds; run with ``-s`` to see them)."""
    size = os.environ.get("ROOMROUTER_QUORUM_BENCH", "200x1")
    messages, rounds = (int(x) for x in size.split("x"))
    first = rcluster.nodes[0]
    pids = ",".join(str(n.process.pid) for n in rcluster.nodes if n.process is not None)
    args = [
        sys.executable, str(ROOT / "benchmarks" / "rabbitmq_quorum.py"),
        "--messages", str(messages), "--rounds", str(rounds),
        "--target", f"cluster=amqp://guest:guest@{first.address}/", "--pids", f"cluster={pids}",
        "--target", "single=amqp://guest:guest@127.0.0.1:5672/",
    ]  # fmt: skip
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=1200, check=False)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| cluster |")
            or line.startswith("| single |")]  # fmt: skip
    assert len(rows) == 8, done.stdout
    print("\n" + done.stdout)


# -- inspect ----------------------------------------------------------------------------------


async def test_inspect_works_against_the_cluster(rcluster: RabbitMQCluster) -> None:
    namespace = unique_namespace()
    opts = {**TEST_ROUTER_OPTIONS, **RabbitMQBackend.router_options}
    try:
        async with (
            RoomRouter(RabbitMQBroker.from_url(rcluster.url(0)), namespace=namespace, **opts) as a,
            RoomRouter(RabbitMQBroker.from_url(rcluster.url(2)), namespace=namespace, **opts) as c,
        ):
            await a.member("x").join("lobby")
            await c.member("y").join("lobby")
            await c.member("z").join("stage")
            url = rcluster.url(1)
            done = await anyio.to_thread.run_sync(
                lambda: subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "roomrouter.cli",
                        "inspect",
                        "--broker",
                        url,
                        "--namespace",
                        namespace,
                        "--json",
                    ],
                    cwd=ROOT,
                    capture_output=True,
                    text=True,
                    timeout=60,
                    check=False,
                )
            )
    finally:
        await _cleanup(rcluster, namespace)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert {n["id"] for n in report["nodes"]} == {a.node_id, c.node_id}
    assert {r["room"]: sorted(r["hosts"]) for r in report["rooms"]} == {
        "lobby": sorted([a.node_id, c.node_id]),
        "stage": [c.node_id],
    }
    assert report["broker"].startswith("amqp://guest:***@" + rcluster.nodes[1].address + ",")
    assert ":guest@" not in done.stdout + done.stderr


# -- the fault test ---------------------------------------------------------------------------


async def test_killing_the_storage_queue_leader_loses_no_acknowledged_message(
    rcluster: RabbitMQCluster, tmp_path: Path
) -> None:
    """Two routers publish persisted messages with ids, two ``roomrouter worker`` processes
    store them, and the node leading the storage quorum queue is SIGKILLed mid-run: every
    acknowledged id is stored exactly once, a publish that raised PublishOutcomeUnknown (or
    "not sent") is retried with its id until acknowledged, both workers live on, and
    publishes resume within a bounded time. Prints the table."""
    namespace = unique_namespace()
    store = amqp_name(namespace, "store")
    sink_path = tmp_path / "fault.db"
    opts = {**TEST_ROUTER_OPTIONS, **RabbitMQBackend.router_options}
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    workers: list[subprocess.Popen[str]] = []
    try:

        def start_worker(name: str, first_node: int) -> subprocess.Popen[str]:
            return subprocess.Popen(
                [sys.executable, "-m", "roomrouter.cli", "worker", "--broker",
                 rcluster.url(first_node), "--namespace", namespace,
                 "--sink", f"sqlite:///{sink_path}", "--name", name, "--batch-size", "100",
                 "--max-delay", "0.05"],
                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            )  # fmt: skip

        # The first worker, on node 1, declares the storage queue (its leader is then most
        # likely node 1, but it is read, not assumed). The namespace's classic ``nodes`` queue
        # (the node count) is declared first by router b, on another node than the leader: a
        # classic queue lives on one node, and while that node is down no router can set up
        # its subscriber (README, "RabbitMQ cluster") -- this test is about the storage queue.
        workers = [start_worker("w-leader", 0)]

        def leader_known() -> None:
            try:
                found.append(rcluster.quorum_leader(store))
            except RuntimeError as exc:
                raise AssertionError(str(exc)) from exc

        found: list[Any] = []
        await eventually(lambda: anyio.to_thread.run_sync(leader_known), timeout=30, interval=0.3)
        leader = found[-1]
        li = rcluster.nodes.index(leader)
        other = (li + 1) % 3
        # One worker and one router on the leader's node, the others elsewhere.
        if li != 0:
            workers[0].terminate()
            workers[0].wait(timeout=20)
            workers = [start_worker("w-leader", li)]
        workers.append(start_worker("w-other", other))
        acked: dict[str, float] = {}  # id -> when acknowledged
        unknown: set[str] = set()
        not_sent = 0
        # Per router: seconds from the kill to each ack of a publish begun after it.
        after_kill: dict[str, list[float]] = {"a": [], "b": []}
        killed_at: list[float] = []
        stop = anyio.Event()
        last_error: dict[str, str] = {}

        async def publish_loop(router: RoomRouter, tag: str) -> None:
            nonlocal not_sent
            i = 0
            while not stop.is_set():
                envelope_id: str | None = None
                began = time.monotonic()
                while True:
                    try:
                        envelope = await router.publish(
                            f"room-{i % 20}", f"{tag} {i}".encode(), persist=True,
                            id=envelope_id,
                        )  # fmt: skip
                        break
                    except PublishOutcomeUnknown as exc:
                        unknown.add(exc.envelope_id or "")
                        envelope_id = exc.envelope_id
                    except BrokerUnavailable as exc:
                        not_sent += 1  # not sent: retried (with the id of an earlier try)
                        last_error[tag] = str(exc)
                    await anyio.sleep(0.05)
                now = time.monotonic()
                acked[envelope.id] = now
                if killed_at and began >= killed_at[0]:
                    after_kill[tag].append(now - killed_at[0])
                i += 1

        async with (
            RoomRouter(
                RabbitMQBroker.from_url(rcluster.url(other)), namespace=namespace, **opts
            ) as b,
            RoomRouter(RabbitMQBroker.from_url(rcluster.url(li)), namespace=namespace, **opts) as a,
            anyio.create_task_group() as tg,
        ):
            # b (not on the leader) publishes to every room first, so the rooms' recent
            # queues, classic queues like ``nodes``, live on its node too.
            for room in range(20):
                first = await b.publish(f"room-{room}", b"first", persist=True)
                acked[first.id] = time.monotonic()
            tg.start_soon(publish_loop, a, "a")
            tg.start_soon(publish_loop, b, "b")
            await eventually(lambda: _assert(len(acked) >= 300), timeout=30)
            await eventually(lambda: _assert(_count(sink_path) > 0), timeout=30)
            before_kill = len(acked)
            killed_at.append(time.monotonic())
            rcluster.kill(leader)

            # Both routers publish again: each has an acknowledged publish begun after
            # the kill (a's node is gone: it moved to another).
            def resumed() -> None:
                counts = {tag: len(times) for tag, times in after_kill.items()}
                assert min(counts.values()) >= 50, (counts, last_error)

            try:
                await eventually(resumed, timeout=40, interval=0.1)
            except AssertionError as exc:
                notes = [str(exc)]
                assert isinstance(b.broker, RabbitMQBroker) and isinstance(a.broker, RabbitMQBroker)
                for role in ("pub", "sub"):
                    try:
                        notes.append(
                            f"a {role} on " + await _connection_node(a.broker, role, via=b.broker)
                        )
                    except AssertionError as e:
                        notes.append(f"a {role}: {e}")
                async with RoomRouter(
                    RabbitMQBroker.from_url(rcluster.url(other)), namespace=namespace, **opts
                ) as c:
                    try:
                        await c.publish("room-1", b"c", persist=True)
                        notes.append("fresh router c on b's node: persisted publish ok")
                    except BrokerUnavailable as e:
                        notes.append(f"fresh router c: {e}")
                    try:
                        await a.publish("room-1", b"a-live", persist=False)
                        notes.append("a live publish ok")
                    except BrokerUnavailable as e:
                        notes.append(f"a live publish: {e}")
                raise AssertionError("; ".join(notes)) from None
            await anyio.sleep(1.0)
            stop.set()
        resume = max(times[0] for times in after_kill.values())
        new_leader = rcluster.quorum_leader(store)
        assert new_leader is not leader

        async def all_stored() -> None:
            assert set(acked) <= _ids(sink_path)

        await eventually(all_stored, timeout=60, interval=0.25)
        alive = [w.poll() is None for w in workers]
    finally:
        outputs = []
        for w in workers:
            w.send_signal(signal.SIGTERM)
        for w in workers:
            try:
                out, _ = w.communicate(timeout=20)
            except subprocess.TimeoutExpired:
                w.kill()
                out, _ = w.communicate()
            outputs.append(out)
        for node in rcluster.nodes:  # the namespace's queues may live on the killed node
            await anyio.to_thread.run_sync(rcluster.restart, node)
        await _cleanup(rcluster, namespace)
    rows, distinct = _rows(sink_path)
    worker_acks = sum(
        int(m.group(1)) for out in outputs for m in re.finditer(r"(\d+) acknowledged", out)
    )
    table = [
        ("killed node (storage queue leader)", leader.name),
        ("new leader", new_leader.name),
        ("acknowledged publishes", len(acked)),
        ("  of them acknowledged before the kill", before_kill),
        ("raised PublishOutcomeUnknown (retried with the id)", len(unknown)),
        ("raised BrokerUnavailable, not sent (retried)", not_sent),
        ("stored rows", rows),
        ("acknowledged ids missing from the sink", len(set(acked) - _ids(sink_path))),
        ("duplicate rows (count - distinct ids)", rows - distinct),
        ("frames acknowledged by workers (redeliveries included)", worker_acks),
        (
            "time to resume (both routers: first ack of a publish begun after the kill)",
            f"{resume:.2f} s",
        ),
        ("workers alive after the kill", f"{sum(alive)}/2"),
    ]
    print("\nRabbitMQ cluster fault test: SIGKILL of the storage quorum queue's leader")
    for label, value in table:
        print(f"  {label:<62} {value}")
    assert all(alive), outputs
    assert set(acked) <= _ids(sink_path)
    assert rows == distinct == len(acked)  # nothing stored that was not acknowledged in the end
    assert resume < 30


def _assert(condition: bool) -> None:
    assert condition


def _count(path: Path) -> int:
    return _rows(path)[0]


def _rows(path: Path) -> tuple[int, int]:
    import sqlite3

    try:
        with sqlite3.connect(path) as conn:
            count, distinct = conn.execute(
                "SELECT count(*), count(DISTINCT id) FROM roomrouter_messages"
            ).fetchone()
        conn.close()
    except sqlite3.OperationalError:  # not created yet
        return 0, 0
    return int(count), int(distinct)


def _ids(path: Path) -> set[str]:
    import sqlite3

    try:
        with sqlite3.connect(path) as conn:
            ids = {row[0] for row in conn.execute("SELECT id FROM roomrouter_messages")}
        conn.close()
    except sqlite3.OperationalError:
        return set()
    return ids
