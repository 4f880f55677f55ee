"""Chaos on the storage path (issue 10): persisted publishes at a steady rate from three nodes,
two `roomrouter worker` processes into one SQLite sink, all on a private redis-server, while
the test kills client connections, SIGKILLs a worker (and restarts it) and restarts Redis
without persistence. A second namespace publishes beside it.

The accounting, per fault phase (the phase an acknowledged publish fell in):

* every acknowledged id is stored exactly once, *or* it was acknowledged before the Redis
  restart and the workers reported that loss window (``vanished`` in their error log);
* a poison frame injected on purpose is dead-lettered, not stored, and blocks nothing;
* no id of the other namespace is in the sink; both workers are alive at the end and exit
  cleanly on SIGTERM.

The table of figures is printed (``-s``) and written to ``/tmp/roomrouter-chaos-table.txt``.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from contextlib import AsyncExitStack
from pathlib import Path

import anyio
import pytest
from redis.asyncio import Redis

from roomrouter import Envelope, RoomRouter, RoomRouterError
from roomrouter.brokers.redis import RedisBroker, store_key
from roomrouter.storage import SQLiteSink

from .conftest import TEST_ROUTER_OPTIONS, unique_namespace
from .helpers import eventually
from .test_redis import PrivateRedis

# Serial: a steady publish rate, processes killed and restarted, for ~35 s: a load run.
pytestmark = [pytest.mark.anyio, pytest.mark.slow, pytest.mark.serial]

ROOT = Path(__file__).resolve().parent.parent
TABLE_PATH = Path("/tmp/roomrouter-chaos-table.txt")
RATE_PER_NODE = 40.0  # persisted publishes per second per node (3 nodes)
# (phase name, seconds it lasts); each fault is applied when its phase begins.
PHASES = [
    ("steady", 5.0),
    ("client-kill", 7.0),
    ("worker-kill", 7.0),
    ("broker-restart", 8.0),
    ("steady-after", 5.0),
]


def _stored_rows(path: Path) -> list[str]:
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT id FROM roomrouter_messages").fetchall()
    conn.close()
    return [r[0] for r in rows]


async def test_storage_path_survives_chaos_and_accounts_for_every_ack(
    private_redis: PrivateRedis, tmp_path: Path
) -> None:
    port = private_redis.port
    ns, other_ns = unique_namespace(), unique_namespace()
    sink_path = tmp_path / "chaos.db"
    url = f"redis://127.0.0.1:{port}/0?redelivery_after=1&operation_timeout=2&max_backoff=0.5"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    logs: list[Path] = []

    def start_worker(name: str) -> subprocess.Popen[bytes]:
        log_path = tmp_path / f"{name}-{len(logs)}.log"
        logs.append(log_path)
        with log_path.open("wb") as out:
            return subprocess.Popen(
                [sys.executable, "-m", "roomrouter.cli", "-v", "worker", "--broker", url,
                 "--namespace", ns, "--sink", f"sqlite:///{sink_path}", "--name", name,
                 "--batch-size", "200", "--max-delay", "0.05"],
                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip

    acked: dict[str, str] = {}  # id -> phase in which publish returned
    other_acked: list[str] = []
    failed = Counter[str]()
    phase = ["steady"]
    restart_at = [0.0]  # wall clock of the Redis restart
    poison = b"\xc1 chaos poison"

    def broker() -> RedisBroker:
        return RedisBroker(host="127.0.0.1", port=port, max_backoff=0.3, operation_timeout=2)

    workers = [start_worker("w1"), start_worker("w2")]
    try:
        async with AsyncExitStack() as stack:
            opts = {**TEST_ROUTER_OPTIONS}
            nodes = [
                await stack.enter_async_context(
                    RoomRouter(broker(), namespace=ns, **opts)  # type: ignore[arg-type]
                )
                for _ in range(3)
            ]
            other = await stack.enter_async_context(
                RoomRouter(broker(), namespace=other_ns, **opts)  # type: ignore[arg-type]
            )
            stop_publishing = anyio.Event()

            async def publish(router: RoomRouter, rate: float, into: list[str] | None) -> None:
                i = 0
                next_at = anyio.current_time()
                while not stop_publishing.is_set():
                    room = f"room-{i % 20}"
                    i += 1
                    try:
                        with anyio.fail_after(3):
                            envelope: Envelope = await router.publish(room, b"%d" % i, persist=True)
                    except (RoomRouterError, TimeoutError):
                        failed[phase[0]] += 1
                    else:
                        if into is None:
                            acked[envelope.id] = phase[0]
                        else:
                            into.append(envelope.id)
                    next_at += 1 / rate
                    await anyio.sleep(max(next_at - anyio.current_time(), 0))

            async def faults() -> None:
                control = Redis(host="127.0.0.1", port=port)
                try:
                    for name, seconds in PHASES:
                        phase[0] = name
                        if name == "steady":
                            await control.xadd(store_key(ns), {b"f": poison})
                        elif name == "client-kill":
                            for kind in ("normal", "pubsub"):
                                await control.execute_command(
                                    "CLIENT", "KILL", "TYPE", kind, "SKIPME", "yes"
                                )
                        elif name == "worker-kill":
                            workers[0].send_signal(signal.SIGKILL)
                            await anyio.to_thread.run_sync(workers[0].wait, 10)
                            await anyio.sleep(1.0)
                            workers[0] = start_worker("w1")
                        elif name == "broker-restart":
                            await control.aclose()
                            restart_at[0] = time.time()
                            private_redis.stop()
                            await anyio.sleep(0.5)
                            private_redis.start()  # --save "" --appendonly no: back empty
                            control = Redis(host="127.0.0.1", port=port)
                        await anyio.sleep(seconds)
                finally:
                    await control.aclose()
                    stop_publishing.set()

            async with anyio.create_task_group() as tg:
                for node in nodes:
                    tg.start_soon(publish, node, RATE_PER_NODE, None)
                tg.start_soon(publish, other, 15.0, other_acked)
                tg.start_soon(faults)

            # Drained: nothing left in the namespace's stream unacknowledged. Read with XLEN
            # behind the workers' back: a storage consumer's start() would recreate a lost
            # group itself and hide whether the workers did.
            control = Redis(host="127.0.0.1", port=port)
            try:

                async def drained() -> None:
                    assert await control.xlen(store_key(ns)) == 0

                with anyio.move_on_after(30):  # if not, the accounting below says what is missing
                    await eventually(drained, timeout=30, interval=0.25)
            finally:
                await control.aclose()
        alive = [w.poll() is None for w in workers]
    finally:
        for w in workers:
            if w.poll() is None:
                w.send_signal(signal.SIGTERM)
        codes = []
        for w in workers:
            try:
                codes.append(w.wait(timeout=15))
            except subprocess.TimeoutExpired:
                w.kill()
                codes.append(w.wait())

    rows = _stored_rows(sink_path)
    stored = Counter(rows)
    async with SQLiteSink(sink_path) as sink:
        letters = await sink.dead_letters(limit=1000)
    text = "\n".join(p.read_text(errors="replace") for p in logs)
    reported = text.count("or its consumer group vanished (")
    finals = [line for line in text.splitlines() if line.startswith("stored ")]

    # The figures, per phase.
    names = [name for name, _ in PHASES]
    table = {n: Counter[str]() for n in names}
    lost_late: list[str] = []
    for msg_id, name in acked.items():
        row = table[name]
        row["acknowledged"] += 1
        if stored[msg_id]:
            row["stored"] += 1
            row["duplicates"] += stored[msg_id] - 1
        elif reported and _ms_of(msg_id) / 1000 <= restart_at[0] + 0.5:
            row["lost-and-reported"] += 1
        else:
            row["unaccounted"] += 1
            lost_late.append(msg_id)
    table["steady"]["dead-lettered"] = sum(1 for d in letters if d.frame == poison)
    for name in names:
        table[name]["publish failed"] = failed[name]
    columns = [
        "acknowledged", "stored", "dead-lettered", "lost-and-reported", "duplicates",
        "unaccounted", "publish failed",
    ]  # fmt: skip
    lines = [f"{'fault':<16}" + "".join(f"{c:>19}" for c in columns)]
    for name in names:
        lines.append(f"{name:<16}" + "".join(f"{table[name][c]:>19}" for c in columns))
    total = sum((table[n] for n in names), Counter[str]())
    lines.append(f"{'total':<16}" + "".join(f"{total[c]:>19}" for c in columns))
    lines.append(
        f"other namespace: {len(other_acked)} acknowledged, "
        f"{sum(1 for i in other_acked if stored[i])} in this sink; "
        f"loss windows reported: {reported}; worker exit codes {codes}; alive at end {alive}"
    )
    lines.extend(f"worker final line: {line}" for line in finals)
    report = "\n".join(lines)
    print("\n" + report)
    await anyio.Path(TABLE_PATH).write_text(report + "\n")

    assert all(alive), f"a worker died\n{text[-3000:]}"
    assert codes == [0, 0], text[-3000:]
    assert not lost_late, f"{len(lost_late)} acknowledged ids neither stored nor reported"
    assert len(rows) == len(stored), "a duplicate row"  # the primary key forbids it anyway
    assert not set(other_acked) & set(stored), "a message of the other namespace was stored"
    assert table["steady"]["dead-lettered"] == 1 and poison not in stored
    # Every fault really happened and the run carried traffic through each phase.
    assert all(table[n]["acknowledged"] > 50 for n in names), report
    assert reported == 1, f"one Redis restart, one loss window reported, not {reported}"
    # Only what was acknowledged before the restart can be in the reported window.
    assert total["lost-and-reported"] <= table["broker-restart"]["acknowledged"] + sum(
        table[n]["acknowledged"] for n in names[: names.index("broker-restart")]
    )
    assert all(table[n]["lost-and-reported"] == 0 for n in ("steady-after",)), report


def _ms_of(msg_id: str) -> int:
    """The Unix milliseconds in a UUIDv7 id."""
    return int(msg_id.replace("-", "")[:12], 16)
