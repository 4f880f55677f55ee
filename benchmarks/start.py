"""How long ``async with RoomRouter(...)`` takes to start, per broker, with default timings.

    python benchmarks/start.py                           # redis, rabbitmq, kafka (Tansu here)
    python benchmarks/start.py --backends rabbitmq --repeats 5
    python benchmarks/start.py --bootstrap host:9092     # a Kafka of your own

Two cases per broker, each in a fresh namespace:

* **empty**: the first node of a new namespace;
* **emptied**: the first node of a namespace whose nodes have all left (the one before);
* **3 live**: a node joining 3 live nodes, each its own process, each hosting one room (the
  new node must know all three rooms when its start returns, or the run fails).

The timed node runs in this process (a fresh router each time, its broker connection
included in the figure); figures are the median of ``--repeats`` (min and max beside). The
start's exactness argument is in docs/architecture.md ("The cluster view", rule 2); the
figures measured before and after it are there too. Loopback only; every peer process is
bounded by ``--timeout``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
URLS = {
    "redis": "redis://127.0.0.1:6379/0",
    "rabbitmq": "amqp://guest:guest@127.0.0.1:5672/",
}
PEER = """
import sys, anyio
from roomrouter import RoomRouter
async def main():
    async with RoomRouter.from_url(sys.argv[1], namespace=sys.argv[2]) as router:
        with anyio.fail_after(float(sys.argv[3])):  # then readline sees the end: it failed
            await router.member().join("room-" + router.node_id)
        print(router.node_id, flush=True)
        await anyio.to_thread.run_sync(sys.stdin.read)
anyio.run(main)
"""


async def timed_start(url: str, namespace: str, peers: list[str]) -> float:
    from roomrouter import RoomRouter

    router = RoomRouter.from_url(url, namespace=namespace)
    started = time.perf_counter()
    async with router:
        took = time.perf_counter() - started
        for peer in peers:
            hosts = router.remote_hosts(f"room-{peer}")
            assert hosts == {peer}, f"the start returned before it knew {peer}'s room: {hosts}"
    return took


def start_peers(
    url: str, namespace: str, count: int, timeout: float
) -> list[subprocess.Popen[str]]:
    return [
        subprocess.Popen(
            [sys.executable, "-c", PEER, url, namespace, str(timeout)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(count)
    ]


def peer_ids(procs: list[subprocess.Popen[str]], timeout: float) -> list[str]:
    ids = []
    for proc in procs:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()  # the peer prints once it hosts its room
        if not line:
            raise RuntimeError(f"a peer did not start within {timeout}s")
        ids.append(line)
    return ids


def stop_peers(procs: list[subprocess.Popen[str]], timeout: float) -> None:
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.close()
    for proc in procs:
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()


def measure(url: str, repeats: int, timeout: float) -> dict[str, list[float]]:
    figures: dict[str, list[float]] = {"empty": [], "emptied": [], "3 live": []}
    for _ in range(repeats):
        namespace = "start" + uuid.uuid4().hex[:8]
        figures["empty"].append(asyncio.run(timed_start(url, namespace, [])))
        # The same namespace again, empty again: its first node has left.
        figures["emptied"].append(asyncio.run(timed_start(url, namespace, [])))
        namespace = "start" + uuid.uuid4().hex[:8]
        procs = start_peers(url, namespace, 3, timeout)
        try:
            ids = peer_ids(procs, timeout)
            figures["3 live"].append(asyncio.run(timed_start(url, namespace, ids)))
        finally:
            stop_peers(procs, timeout)
    return figures


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backends", default="redis,rabbitmq,kafka")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--bootstrap", help="host:port of a Kafka; default: start Tansu")
    args = p.parse_args()
    tansu = None
    urls = dict(URLS)
    if "kafka" in args.backends.split(","):
        if args.bootstrap is None:
            sys.path.insert(0, str(HERE))
            from _kafka_probe import _start_tansu

            tansu, args.bootstrap = _start_tansu()
        urls["kafka"] = f"kafka://{args.bootstrap}"
    try:
        print(f"{'backend':10} {'case':9} {'median ms':>10} {'min':>7} {'max':>7}")
        for backend in args.backends.split(","):
            for case, values in measure(urls[backend], args.repeats, args.timeout).items():
                ms = [v * 1000 for v in values]
                print(
                    f"{backend:10} {case:9} {statistics.median(ms):10.0f} "
                    f"{min(ms):7.0f} {max(ms):7.0f}",
                    flush=True,
                )
    finally:
        if tansu is not None:
            tansu.kill()
            tansu.wait()


if __name__ == "__main__":
    main()
