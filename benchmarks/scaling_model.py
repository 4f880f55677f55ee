"""The scaling model of docs/scaling.md: broker and node load as rooms x nodes x members grow.

    python benchmarks/scaling_model.py                   # the tables of docs/scaling.md
    python benchmarks/scaling_model.py --check results.jsonl   # model vs a lecture run

Three ways to route room messages between N nodes, for R rooms of M members each, every room
publishing ``rate`` messages per second:

* **subscribe-all** (python-socketio's managers, broadcaster with one channel): every node
  receives every message;
* **dynamic** subscription: a node receives the messages of the rooms it hosts, its own
  publishes included (the echo of one shared channel per room);
* **dynamic + bypass + affinity**: rooms live on as few nodes as the balancer manages
  (``h_affine``, 1 when every client of a room lands on its node), a room hosted only by the
  publisher costs the broker nothing, and a publish reaches only the *other* hosts.

``h`` is the expected number of nodes hosting a room when its M members are placed uniformly at
random: ``N * (1 - (1 - 1/N) ** M)``.

Pure arithmetic, no I/O; ``--check`` compares the model's irrelevant share and per-node receive
rate with what a lecture run of ``python -m benchmarks`` measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib

__all__ = ["Load", "hosts_random", "load"]


def hosts_random(nodes: int, members: int) -> float:
    """Expected number of distinct nodes among ``members`` placed uniformly on ``nodes``."""
    return nodes * (1.0 - (1.0 - 1.0 / nodes) ** members)


@dataclasses.dataclass(frozen=True, slots=True)
class Load:
    strategy: str
    #: Broker-side deliveries per second (messages pushed to subscriber connections).
    broker_deliveries: float
    #: Messages per second each node receives from the broker.
    node_received: float
    #: Share of ``node_received`` no local member needed (echoes and rooms not hosted).
    irrelevant: float
    #: Broker subscriptions (channels, bindings or partitions) per node.
    subscriptions_per_node: float
    #: Cluster-view entries (room, node) every node keeps; 0 where there is none.
    view_entries: float


def load(
    strategy: str, *, nodes: int, rooms: int, hosts: float, rate: float = 1.0, echo: bool = True
) -> Load:
    """Steady-state load for ``rooms`` rooms each hosted by ``hosts`` of ``nodes`` nodes.

    The publisher of a message is one of the room's hosts (an app server publishes what a local
    client said). ``echo`` says whether the publisher's own copy comes back from the broker
    (Redis pub/sub on one channel per room: yes; routing to the other hosts only: no).
    """
    total = rooms * rate  # messages/s cluster-wide
    if strategy == "subscribe-all":
        deliveries = total * nodes
        received = total  # every node gets every message
        relevant = total * (hosts - 1) / nodes  # per node: messages of rooms it hosts, not its own
        return Load(strategy, deliveries, received, 1 - relevant / received, 1, 0)
    if strategy == "dynamic":
        copies = hosts if echo else hosts - 1
        deliveries = total * copies
        received = deliveries / nodes
        relevant = total * (hosts - 1) / nodes
        irrelevant = 1 - relevant / received if received else 0.0
        return Load(
            strategy, deliveries, received, irrelevant, rooms * hosts / nodes, rooms * hosts
        )
    raise ValueError(f"unknown strategy {strategy!r}")


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _si(value: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.3g}{unit}"
    return f"{value:.3g}"


def tables(members: int, rate: float, affine_hosts: float) -> str:
    out = [
        f"Each room: {members} members, {rate:g} msg/s. Random placement: a room is hosted by "
        "h = N(1-(1-1/N)^M) nodes; with affinity by "
        f"h = {affine_hosts:g}.",
        "",
        _row(
            [
                "nodes",
                "rooms",
                "strategy",
                "h",
                "broker deliveries/s",
                "received/s per node",
                "irrelevant",
                "subscriptions per node",
                "view entries per node",
            ]
        ),
        _row(["---:", "---:", "---", "---:", "---:", "---:", "---:", "---:", "---:"]),
    ]
    for nodes in (10, 100, 1000):
        h_random = hosts_random(nodes, members)
        for rooms in (10_000, 1_000_000):
            cases = [
                ("subscribe-all", h_random, True),
                ("dynamic", h_random, True),
                ("dynamic, no echo", h_random, False),
                ("dynamic + affinity", affine_hosts, False),
            ]
            for label, h, echo in cases:
                kind = "subscribe-all" if label == "subscribe-all" else "dynamic"
                res = load(kind, nodes=nodes, rooms=rooms, hosts=h, rate=rate, echo=echo)
                out.append(
                    _row(
                        [
                            str(nodes),
                            _si(rooms),
                            label,
                            f"{h:.3g}",
                            _si(res.broker_deliveries),
                            _si(res.node_received),
                            f"{res.irrelevant:.0%}",
                            _si(res.subscriptions_per_node),
                            _si(res.view_entries) if res.view_entries else "-",
                        ]
                    )
                )
    return "\n".join(out)


def control_plane(heartbeat_interval: float = 1.0) -> str:
    out = [
        _row(["nodes", "heartbeat deliveries/s", "per first join of a room on a node"]),
        _row(["---:", "---:", "---"]),
    ]
    for nodes in (10, 100, 1000):
        beats = nodes * (nodes - 1) / heartbeat_interval
        out.append(
            _row([str(nodes), _si(beats), f"1 Host to {nodes - 1} nodes + {nodes - 1} Acks back"])
        )
    return "\n".join(out)


#: Systems of the suite whose nodes route around the echo (direct publishing, ``direct_max``
#: >= k - 1 remote hosts): roomrouter on these backends.
_NO_ECHO = {"memory", "redis", "redis-sharded"}


def _model_for(impl: str, backend: str, nodes: int, rooms: int, k: int) -> Load | None:
    if impl.startswith("socketio"):
        return load("subscribe-all", nodes=nodes, rooms=rooms, hosts=k)
    if impl == "raw-aiokafka":
        return None  # a partition per node's rooms is not one of the three models
    echo = not (impl == "roomrouter" and backend in _NO_ECHO)
    return load("dynamic", nodes=nodes, rooms=rooms, hosts=k, echo=echo)


def check(path: pathlib.Path) -> str:
    """Model vs measured for the lecture results in a ``python -m benchmarks`` JSONL file
    (its ``median`` records, one per system, backend and pacing)."""
    out = [
        _row(
            [
                "system",
                "backend",
                "pacing",
                "nodes",
                "rooms",
                "k",
                "model irrelevant",
                "measured irrelevant",
            ]
        ),
        _row(["---", "---", "---", "---:", "---:", "---:", "---:", "---:"]),
    ]
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        if (
            rec.get("kind") != "median"
            or rec.get("workload") != "lecture"
            or "irrelevant_share" not in rec
        ):
            continue
        nodes, rooms, k = rec.get("nodes"), rec.get("rooms"), rec.get("k")
        if not (nodes and rooms and k):
            continue
        impl, backend = str(rec.get("impl", "?")), str(rec.get("backend", "?"))
        model = _model_for(impl, backend, nodes, rooms, k)
        measured = float(rec["irrelevant_share"])
        out.append(
            _row(
                [
                    impl,
                    backend,
                    str(rec.get("pacing", "?")),
                    str(nodes),
                    str(rooms),
                    str(k),
                    "-" if model is None else f"{model.irrelevant:.0%}",
                    f"{measured:.0%}" if not math.isnan(measured) else "-",
                ]
            )
        )
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", type=int, default=50)
    parser.add_argument("--rate", type=float, default=1.0, help="messages/s per room")
    parser.add_argument("--affine-hosts", type=float, default=1.0)
    parser.add_argument("--check", type=pathlib.Path, help="a benchmarks JSONL results file")
    args = parser.parse_args()
    if args.check:
        print(check(args.check))
        return
    print(tables(args.members, args.rate, args.affine_hosts))
    print()
    print(control_plane())


if __name__ == "__main__":
    main()
