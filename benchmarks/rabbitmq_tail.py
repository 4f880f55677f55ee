"""Where a RabbitMQ latency spike comes from: a paced cross-node run with its causes recorded.

    python benchmarks/rabbitmq_tail.py                         # 5 runs x 5 s at 1000 msg/s
    python benchmarks/rabbitmq_tail.py --runs 10 --hogs 2      # with 2 CPU-bound processes

Node B (a child process) joins one room; node A publishes to it at ``--rate`` msg/s from one
loop for ``--seconds``. Per message B records publish -> receive latency. Beside it, three
recorders look for the cause of every spike (a 50 ms window whose worst latency exceeds
``--spike-ms``):

* **event-loop lag** on both nodes: a task that sleeps 1 ms and records how late it woke (a
  node whose loop is blocked, or whose process the OS did not schedule, delays everything);
* **RabbitMQ's view**: the two connections' ``state`` (``running``, or ``flow`` when credit
  flow control throttles a publisher; ``blocked`` under a resource alarm) polled from the
  management API every 50 ms;
* **the publisher's confirm wait**: how long each ``publish`` awaited RabbitMQ's confirm.

Per run it prints p50/p99/p999/max and, per spike, what coincided with it. ``--hogs N`` starts
N busy-looping processes for the duration (the benchmark suite runs 4 nodes on 2 cores). Not a
test: it reports figures. Every child is bounded by ``--seconds`` plus a margin.

Findings (2026-12-02, RabbitMQ 3.10.8, 2 cores): alone, p99 1.3-5.4 ms and max <= 40 ms over
5 runs. With ``--hogs 2``, p99 5-54 ms and single spikes of 230-404 ms; each spike over 150 ms
coincided with a confirm wait of the same length, neither node's loop late by more than
25 ms, and both connections ``running`` (no credit flow, no alarm): the frame waited inside
RabbitMQ, whose VM did not get the CPU. Turning off the Erlang schedulers' busy waiting
(``+sbwt none +sbwtdcpu none +sbwtdio none``, on a second RabbitMQ) did not help: max 11, 514,
642 and 431 ms in 4 runs against 90, 41, 33 and 16 ms for the default, interleaved. The tail
is the broker starved of CPU on an oversubscribed machine; give it a core of its own.
"""

from __future__ import annotations

import argparse
import base64
import json
import multiprocessing
import statistics
import sys
import time
import urllib.request
import uuid
from typing import Any

import anyio
from _rabbitmq_probe import _delete_exchanges  # run as a script: benchmarks/ is on the path
from anyio.streams.buffered import BufferedByteReceiveStream

from roomrouter import RoomRouter

ROOM = "tail"


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def _lag_monitor(into: list[tuple[float, float]], stop: anyio.Event) -> None:
    """(wall time, ms late) for every wake-up more than 5 ms late."""
    while not stop.is_set():
        before = time.perf_counter()
        await anyio.sleep(0.001)
        late = (time.perf_counter() - before - 0.001) * 1000
        if late > 5:
            into.append((time.time(), late))


async def receiver(url: str, namespace: str, count: int, timeout: float) -> None:
    lag: list[tuple[float, float]] = []
    stop = anyio.Event()
    async with (
        RoomRouter.from_url(
            url, namespace=namespace, inbox_size=count + 10, discovery_window=0.3, node_id="tail-b"
        ) as router,  # fmt: skip
        anyio.create_task_group() as tg,
    ):
        member = router.member("b")
        await member.join(ROOM)
        tg.start_soon(_lag_monitor, lag, stop)
        print("ready", flush=True)
        samples: list[tuple[float, float]] = []  # (publish ts, latency ms)
        with anyio.move_on_after(timeout):
            while len(samples) < count:
                envelope = await member.receive()
                samples.append((envelope.ts, (time.time() - envelope.ts) * 1000))
        stop.set()
    print(json.dumps({"samples": samples, "lag": lag}), flush=True)


def _hog(seconds: float) -> None:
    end = time.time() + seconds
    while time.time() < end:
        pass


def _connection_states(api: str, auth: str) -> dict[str, str]:
    request = urllib.request.Request(
        api + "/api/connections?columns=client_properties.connection_name,name,state",
        headers={"Authorization": "Basic " + auth},
    )
    with urllib.request.urlopen(request, timeout=2) as response:
        rows = json.loads(response.read())
    return {row.get("name", "?"): row.get("state", "?") for row in rows}


async def one_run(args: argparse.Namespace) -> dict[str, Any]:
    namespace = "tail-" + uuid.uuid4().hex[:8]
    count = int(args.rate * args.seconds)
    child = await anyio.open_process(
        [sys.executable, __file__, "--role", "receiver", "--url", args.url,
         "--namespace", namespace, "--count", str(count), "--timeout", str(args.seconds + 30)],
        stderr=None,
    )  # fmt: skip
    assert child.stdout is not None
    lines = BufferedByteReceiveStream(child.stdout)
    auth = base64.b64encode(b"guest:guest").decode()
    states: list[tuple[float, dict[str, str]]] = []
    lag: list[tuple[float, float]] = []
    confirms: list[tuple[float, float]] = []
    stop = anyio.Event()
    hogs = [
        multiprocessing.Process(target=_hog, args=(args.seconds + 3,)) for _ in range(args.hogs)
    ]

    async def poll_states() -> None:
        while not stop.is_set():
            try:
                snapshot = await anyio.to_thread.run_sync(_connection_states, args.api, auth)
                states.append((time.time(), snapshot))
            except OSError:
                pass
            await anyio.sleep(0.05)

    try:
        with anyio.fail_after(20):
            assert (await lines.receive_until(b"\n", 1 << 20)).strip() == b"ready"
        async with (
            RoomRouter.from_url(
                args.url, namespace=namespace, discovery_window=0.3, node_id="tail-a"
            ) as router,  # fmt: skip
            anyio.create_task_group() as tg,
        ):
            with anyio.fail_after(10):
                while not router.remote_hosts(ROOM):
                    await anyio.sleep(0.01)
            for hog in hogs:
                hog.start()
            tg.start_soon(_lag_monitor, lag, stop)
            tg.start_soon(poll_states)
            payload = b"x" * 100
            interval = 1.0 / args.rate
            next_at = time.perf_counter()
            for _ in range(count):
                sent = time.time()
                await router.publish(ROOM, payload)
                confirms.append((sent, (time.time() - sent) * 1000))
                next_at += interval
                await anyio.sleep(max(0.0, next_at - time.perf_counter()))
            with anyio.fail_after(args.seconds + 30):
                report = json.loads(await lines.receive_until(b"\n", 1 << 26))
            stop.set()
    finally:
        for hog in hogs:
            if hog.is_alive():
                hog.terminate()
            hog.join(timeout=5)
        if child.returncode is None:
            try:
                child.terminate()
            except ProcessLookupError:
                pass
        with anyio.move_on_after(10, shield=True):
            await child.wait()
        await child.aclose()
        await _delete_exchanges(args.url, namespace)
    return _analyse(args, report, lag, confirms, states)


def _analyse(
    args: argparse.Namespace,
    report: dict[str, Any],
    lag_a: list[tuple[float, float]],
    confirms: list[tuple[float, float]],
    states: list[tuple[float, dict[str, str]]],
) -> dict[str, Any]:
    samples = [(ts, ms) for ts, ms in report["samples"]]
    lat = [ms for _, ms in samples]
    lag_b = [(t, ms) for t, ms in report["lag"]]
    window = 0.05
    spikes: dict[int, float] = {}
    for ts, ms in samples:
        if ms > args.spike_ms:
            key = int(ts / window)
            spikes[key] = max(spikes.get(key, 0.0), ms)
    causes = []
    for key, worst in sorted(spikes.items()):
        start, end = key * window, key * window + worst / 1000 + window

        def near(events: list[tuple[float, float]], s: float = start, e: float = end) -> float:
            return max((ms for t, ms in events if s - 0.01 <= t <= e), default=0.0)

        flow = sorted({st for t, snap in states if start <= t <= end for st in snap.values()})
        causes.append({
            "at_s": round(start - samples[0][0], 3), "worst_ms": round(worst, 1),
            "lag_a_ms": round(near(lag_a), 1), "lag_b_ms": round(near(lag_b), 1),
            "confirm_ms": round(near(confirms), 1), "rabbit_states": flow,
        })  # fmt: skip
    return {
        "received": len(lat),
        "p50_ms": _pct(lat, 0.5),
        "p99_ms": _pct(lat, 0.99),
        "p999_ms": _pct(lat, 0.999),
        "max_ms": max(lat, default=float("nan")),
        "mean_ms": statistics.fmean(lat) if lat else float("nan"),
        "max_lag_a_ms": max((ms for _, ms in lag_a), default=0.0),
        "max_lag_b_ms": max((ms for _, ms in lag_b), default=0.0),
        "max_confirm_ms": max((ms for _, ms in confirms), default=0.0),
        "states_seen": sorted({st for _, snap in states for st in snap.values()}),
        "spikes": causes,
    }


async def coordinator(args: argparse.Namespace) -> None:
    for i in range(args.runs):
        result = await one_run(args)
        spikes = result.pop("spikes")
        print(json.dumps({"run": i, **{k: (round(v, 2) if isinstance(v, float) else v)
                                       for k, v in result.items()}}), flush=True)  # fmt: skip
        for spike in spikes[:10]:
            print("   spike", json.dumps(spike), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--api", default="http://127.0.0.1:15672")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--spike-ms", type=float, default=50.0)
    parser.add_argument("--hogs", type=int, default=0)
    parser.add_argument("--role", default="coordinator", choices=["coordinator", "receiver"])
    parser.add_argument("--namespace", default="")
    parser.add_argument("--count", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args()
    if args.role == "receiver":
        anyio.run(receiver, args.url, args.namespace, args.count, args.timeout)
    else:
        anyio.run(coordinator, args)


if __name__ == "__main__":
    main()
