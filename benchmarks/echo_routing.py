"""Room channel vs the remote hosts' node channels (Redis) or addressed keys (RabbitMQ): what
each costs, per message.

    python benchmarks/echo_routing.py                      # Redis, k = 1, 2, 4 remote hosts
    python benchmarks/echo_routing.py --hosts 1,2,3 --n 20000 --rounds 3
    python benchmarks/echo_routing.py --url amqp://guest:guest@127.0.0.1:5672/ --hosts 1,2,3

One publishing node hosts room R (it has a local member, so a room-channel publish is echoed
back to it) and ``k`` other nodes host R too; each node is its own process. The publisher sends
``--n`` frames from ``--concurrency`` tasks, once with ``direct_max=0`` (every publish goes to
the room channel: one PUBLISH, k + 1 receivers, the publisher's own copy dropped as an echo)
and once with ``direct_max=k`` (Redis: one PUBLISH per remote host to its node channel;
RabbitMQ: one publish whose routing key and BCC header name the k hosts; no echo either way).

Reported per message, medians of ``--rounds`` interleaved runs: the server's CPU (Redis:
``INFO cpu``; RabbitMQ: the node's OS process, found through the management API, read from
``/proc``), the publishing node's CPU, all the receiving nodes' CPU, and the sum; plus what
the publisher received back and its publish rate (wall clock, first publish to last
confirmation). The router's ``direct_max`` default is the
largest k for which the direct way costs less in total. Figures are reported, not asserted;
every child is bounded by ``--timeout``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


async def _child(args: argparse.Namespace) -> None:
    import anyio

    from roomrouter import RoomRouter

    router = RoomRouter.from_url(
        args.url, namespace=args.namespace, node_id=args.node, direct_max=args.direct_max,
        linger=0.0, heartbeat_interval=0.5, node_ttl=5.0, inbox_size=args.n + 10,
    )  # fmt: skip
    async with router:
        member = router.member("m")
        await member.join("R")
        print(json.dumps({"ready": args.node}), flush=True)
        if args.role == "receiver":
            # Wait for the first frame, then count CPU until the last one.
            await member.receive()
            cpu0 = time.process_time()
            for _ in range(args.n - 1):
                await member.receive()
            print(json.dumps({"cpu": time.process_time() - cpu0}), flush=True)
            sys.stdin.readline()  # stay hosting until the coordinator is done
            return
        with anyio.fail_after(args.timeout):
            while len(router.remote_hosts("R")) < args.want:
                await anyio.sleep(0.05)
        before = router.stats()
        cpu0 = time.process_time()
        wall0 = time.perf_counter()
        per_task = args.n // args.concurrency

        async def publish() -> None:
            for _ in range(per_task):
                await router.publish("R", b"x" * args.payload)

        async with anyio.create_task_group() as tg:
            for _ in range(args.concurrency):
                tg.start_soon(publish)
        wall = time.perf_counter() - wall0
        await anyio.sleep(0.5)  # let the echoes arrive
        cpu = time.process_time() - cpu0
        after = router.stats()
        print(json.dumps({
            "cpu": cpu,
            "wall": wall,
            "echoes": after["dropped_echo"] - before["dropped_echo"],
            "received": after["broker_received"] - before["broker_received"],
            "direct": after["direct_publishes"] - before["direct_publishes"],
        }), flush=True)  # fmt: skip


def _server_cpu(url: str) -> float:
    """CPU seconds the broker server has used so far."""
    if url.startswith("amqp"):
        return _rabbitmq_cpu(url)
    return _redis_cpu(url)


def _rabbitmq_cpu(url: str) -> float:
    import base64
    import urllib.request
    from urllib.parse import unquote, urlsplit

    parts = urlsplit(url)
    auth = f"{unquote(parts.username or 'guest')}:{unquote(parts.password or 'guest')}"
    request = urllib.request.Request(
        f"http://{parts.hostname or '127.0.0.1'}:15672/api/nodes",
        headers={"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()},
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        nodes = json.load(answer)
    total = 0.0
    for node in nodes:  # every node of the cluster, if they run on this machine
        with open(f"/proc/{int(node['os_pid'])}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _redis_cpu(url: str) -> float:
    import redis

    client = redis.Redis.from_url(url)
    try:
        info: dict[str, Any] = client.info("cpu")
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
    finally:
        client.close()


def _spawn(
    args: argparse.Namespace, role: str, node: str, ns: str, direct_max: int, n: int, want: int
) -> subprocess.Popen[str]:
    cmd = [
        sys.executable, __file__, "--child", role, "--node", node, "--namespace", ns,
        "--direct-max", str(direct_max), "--n", str(n), "--url", args.url,
        "--payload", str(args.payload), "--concurrency", str(args.concurrency),
        "--timeout", str(args.timeout), "--want", str(want),
    ]  # fmt: skip
    return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)


def _line(proc: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    import selectors

    sel = selectors.DefaultSelector()
    assert proc.stdout is not None
    sel.register(proc.stdout, selectors.EVENT_READ)
    if not sel.select(timeout):
        raise TimeoutError("a child did not answer in time")
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"a child exited ({proc.wait()})")
    return json.loads(line)  # type: ignore[no-any-return]


def _run(args: argparse.Namespace, hosts: int, direct: bool) -> dict[str, float]:
    ns = "echo" + uuid.uuid4().hex[:8]
    n = args.n - args.n % args.concurrency
    procs = [_spawn(args, "receiver", f"r{i}", ns, 0, n, 0) for i in range(hosts)]
    try:
        for proc in procs:
            _line(proc, args.timeout)
        pub = _spawn(args, "publisher", "pub", ns, hosts if direct else 0, n, hosts)
        procs.append(pub)
        _line(pub, args.timeout)
        server0 = _server_cpu(args.url)
        result = _line(pub, args.timeout)
        receivers = [_line(p, args.timeout)["cpu"] for p in procs[:-1]]
        server = _server_cpu(args.url) - server0
    finally:
        for proc in procs:
            try:
                assert proc.stdin is not None
                proc.stdin.close()
                proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                proc.kill()
    us = 1e6 / n
    return {
        "server_us": server * us,
        "publisher_us": result["cpu"] * us,
        "receivers_us": sum(receivers) * us,
        "total_us": (server + result["cpu"] + sum(receivers)) * us,
        "echoes_per_msg": result["echoes"] / n,
        "direct_per_msg": result["direct"] / n,
        "msg_per_s": n / result["wall"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--hosts", default="1,2,4", help="remote hosts of the room (k)")
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--payload", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--child", choices=("receiver", "publisher"), dest="role")
    parser.add_argument("--node", default="")
    parser.add_argument("--namespace", default="")
    parser.add_argument("--direct-max", type=int, default=0)
    parser.add_argument("--want", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        import anyio

        anyio.run(_child, args)
        return
    rows = []
    for hosts in [int(k) for k in args.hosts.split(",")]:
        samples: dict[str, list[dict[str, float]]] = {"room": [], "direct": []}
        for _ in range(args.rounds):
            for way in ("room", "direct"):
                samples[way].append(_run(args, hosts, way == "direct"))
        for way, runs in samples.items():
            row = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            rows.append({"k": hosts, "way": way, **row})
            print(json.dumps(rows[-1]), flush=True)
    print()
    server = "RabbitMQ" if args.url.startswith("amqp") else "Redis"
    head = ("k", "way", f"{server} µs/msg", "publisher µs/msg", "receivers µs/msg")
    print("| " + " | ".join(head) + " | total µs/msg | echoes/msg | publish msg/s |")
    print("|---" * (len(head) + 3) + "|")
    keys = ("server_us", "publisher_us", "receivers_us", "total_us", "echoes_per_msg")
    for r in rows:
        cells = " | ".join(f"{r[k]:.2f}" for k in keys)
        print(f"| {r['k']} | {r['way']} | {cells} | {r['msg_per_s']:,.0f} |")


if __name__ == "__main__":
    main()
