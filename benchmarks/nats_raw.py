"""roomrouter on NATS against raw nats-py pub/sub, and beside roomrouter on Redis: cross-node
messages per second, each node in its own process.

    python benchmarks/nats_raw.py                              # every mode, medians of 3
    python benchmarks/nats_raw.py --modes raw-nats,roomrouter-nats --n 50000 --rounds 5

A receiving node hosts room R and counts ``--n`` frames; a publishing node (another process)
sends them from ``--concurrency`` tasks as fast as it can. Reported: the receiver's rate from
its first frame to its last (msg/s), and the publisher's from its first publish to its last
return. Modes, interleaved round by round (A, B, C, A, B, C, ...), medians of ``--rounds``:

* ``raw-nats``: nats-py ``publish`` (fire and forget, one flush at the end) to one subject,
  a nats-py subscription with a callback counting: the ceiling of the client library.
* ``roomrouter-nats``: ``RoomRouter.publish`` over ``nats://`` (each publish returns once the
  round trip sent behind its batch came back) to a member.
* ``roomrouter-nats-persist``: the same with ``persist=True`` (two JetStream publishes, then
  the live one).
* ``roomrouter-redis`` / ``roomrouter-redis-persist``: the same over ``redis://``.

``--before DIR``: also run the roomrouter-on-NATS modes on the roomrouter source tree in
``DIR/src`` (another version, e.g. ``git archive <commit> src | tar -x -C DIR``), labelled
``(before)`` and interleaved with the others, so before and after are measured in one run.

Loopback servers (NATS 4222, Redis 6379); every child is bounded by ``--timeout``.
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
MODES = [
    "raw-nats",
    "roomrouter-nats",
    "roomrouter-nats-persist",
    "roomrouter-redis",
    "roomrouter-redis-persist",
]


def _url(args: argparse.Namespace) -> str:
    return args.redis if "redis" in args.mode else args.nats


async def _raw(args: argparse.Namespace) -> None:
    import anyio
    import nats

    nc = await nats.connect(args.nats)
    subject = f"bench.{args.namespace}"
    try:
        if args.role == "receiver":
            done = anyio.Event()
            times: list[float] = []
            count = 0

            async def on_msg(msg: Any) -> None:
                nonlocal count
                count += 1
                if count == 1:
                    times.append(time.perf_counter())
                if count == args.n:
                    times.append(time.perf_counter())
                    done.set()

            await nc.subscribe(subject, cb=on_msg, pending_msgs_limit=args.n + 10)
            await nc.flush()
            print(json.dumps({"ready": True}), flush=True)
            with anyio.fail_after(args.timeout):
                await done.wait()
            print(json.dumps({"seconds": times[1] - times[0]}), flush=True)
            return
        payload = b"x" * args.payload
        per_task = args.n // args.concurrency

        async def publish() -> None:
            for _ in range(per_task):
                await nc.publish(subject, payload)

        started = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for _ in range(args.concurrency):
                tg.start_soon(publish)
        await nc.flush()
        print(json.dumps({"seconds": time.perf_counter() - started}), flush=True)
    finally:
        await nc.close()


async def _router(args: argparse.Namespace) -> None:
    import anyio

    from roomrouter import RoomRouter

    router = RoomRouter.from_url(
        _url(args), namespace=args.namespace, node_id=args.role, linger=0.0,
        heartbeat_interval=0.5, node_ttl=5.0, inbox_size=args.n + 10,
    )  # fmt: skip
    async with router:
        if args.role == "receiver":
            member = router.member("m")
            await member.join("R")
            print(json.dumps({"ready": True}), flush=True)
            got = 0
            with anyio.fail_after(args.timeout):
                got = len(await member.receive_batch())
                first = time.perf_counter()
                while got < args.n:
                    got += len(await member.receive_batch())
            print(json.dumps({"seconds": time.perf_counter() - first}), flush=True)
            sys.stdin.readline()  # stay until the publisher is done
            return
        with anyio.fail_after(args.timeout):
            while not router.remote_hosts("R"):
                await anyio.sleep(0.02)
        payload = b"x" * args.payload
        per_task = args.n // args.concurrency
        persist = args.mode.endswith("-persist")

        async def publish() -> None:
            for _ in range(per_task):
                await router.publish("R", payload, persist=persist)

        started = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for _ in range(args.concurrency):
                tg.start_soon(publish)
        print(json.dumps({"seconds": time.perf_counter() - started}), flush=True)


_BEFORE = " (before)"


def _spawn(args: argparse.Namespace, mode: str, role: str, ns: str) -> subprocess.Popen[str]:
    env = None
    if mode.endswith(_BEFORE):
        mode = mode[: -len(_BEFORE)]
        env = {**os.environ, "PYTHONPATH": os.path.join(args.before, "src")}
    cmd = [
        sys.executable, __file__, "--child", role, "--mode", mode, "--namespace", ns,
        "--n", str(args.n), "--payload", str(args.payload), "--nats", args.nats,
        "--redis", args.redis, "--concurrency", str(args.concurrency),
        "--timeout", str(args.timeout),
    ]  # fmt: skip
    return subprocess.Popen(
        cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env
    )


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


def _cleanup(args: argparse.Namespace, mode: str, ns: str) -> None:
    """Drop what a run left on the servers (a NATS node creates its namespace's streams at
    start; a persisted run leaves Redis keys)."""
    if mode == "roomrouter-redis" or mode == "raw-nats":
        return
    if "nats" in mode:
        import asyncio

        import nats

        from roomrouter.brokers.nats import Names

        async def drop() -> None:
            nc = await nats.connect(args.nats)
            try:
                for kind in ("STORE", "RECENT", "META"):
                    await nc.request(f"$JS.API.STREAM.DELETE.{Names.of(ns).stream(kind)}", b"")
            finally:
                await nc.close()

        asyncio.run(drop())
    else:
        import redis

        from roomrouter.brokers.redis import key_prefix

        client = redis.Redis.from_url(args.redis)
        try:
            keys = list(client.scan_iter(match=key_prefix(ns).replace(b"{", b"[{]") + b"*"))
            if keys:
                client.delete(*keys)
        finally:
            client.close()


def _run(args: argparse.Namespace, mode: str) -> dict[str, float]:
    ns = "bench" + uuid.uuid4().hex[:8]
    ran = mode.removesuffix(_BEFORE)
    receiver = _spawn(args, mode, "receiver", ns)
    procs = [receiver]
    try:
        _line(receiver, args.timeout)
        publisher = _spawn(args, mode, "publisher", ns)
        procs.append(publisher)
        sent = _line(publisher, args.timeout)["seconds"]
        got = _line(receiver, args.timeout)["seconds"]
    finally:
        for proc in procs:
            try:
                assert proc.stdin is not None
                proc.stdin.close()
                proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                proc.kill()
        _cleanup(args, ran, ns)
    return {"received_per_s": (args.n - 1) / got, "sent_per_s": args.n / sent}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--nats", default="nats://127.0.0.1:4222")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--n", type=int, default=30_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--payload", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--before", help="a roomrouter tree (DIR/src) to measure beside this one")
    parser.add_argument("--child", choices=("receiver", "publisher"), dest="role")
    parser.add_argument("--mode", default="")
    parser.add_argument("--namespace", default="")
    args = parser.parse_args()
    args.n -= args.n % args.concurrency
    if args.role:
        import anyio

        anyio.run(_raw if args.mode == "raw-nats" else _router, args)
        return
    modes = args.modes.split(",")
    if args.before:
        modes += [m + _BEFORE for m in modes if m.startswith("roomrouter-nats")]
    samples: dict[str, list[dict[str, float]]] = {mode: [] for mode in modes}
    for _ in range(args.rounds):
        for mode in modes:
            samples[mode].append(_run(args, mode))
            print(json.dumps({"mode": mode, **samples[mode][-1]}), flush=True)
    print(f"\n{args.n} frames of {args.payload} B, {args.concurrency} publisher tasks, "
          f"medians of {args.rounds}\n")  # fmt: skip
    print("| mode | received msg/s | sent msg/s |")
    print("|---|---|---|")
    for mode, runs in samples.items():
        received = statistics.median(r["received_per_s"] for r in runs)
        sent = statistics.median(r["sent_per_s"] for r in runs)
        print(f"| {mode} | {received:,.0f} | {sent:,.0f} |")


if __name__ == "__main__":
    main()
