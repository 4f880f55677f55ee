"""The ``roomrouter`` command (click, with rich tables for ``inspect``).

roomrouter demo [--broker memory://] [--sink sqlite:///roomrouter-demo.db] [--port 8000]
roomrouter worker --broker redis://127.0.0.1:6379/0 --namespace chat --sink sqlite:///chat.db
roomrouter inspect --broker redis://127.0.0.1:6379/0 --namespace chat [--json]
roomrouter bench [python -m benchmarks options]       (from a repo checkout)

Exit status: 0 done; 1 a failure to start (bad option, unreachable broker, presence store or
sink, wrong password, missing database or extra), one line ``roomrouter: <reason>`` on stderr
with the password of every URL redacted; 2 an unexpected error (a bug), also one line, its
traceback with ``--verbose``; 130 interrupted (Ctrl-C). A running server or worker prints
one line on stdout once it is ready.
"""

from __future__ import annotations

import json
import logging
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import anyio
import click

from ._errors import ConfigurationError, MissingDependency, RoomRouterError, describe
from ._urls import redact

__all__ = ["main"]

_E = TypeVar("_E", bound=BaseException)


def _version() -> str:
    try:
        return version("roomrouter")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        from . import __version__

        return __version__


@click.group(
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog="Exit status: 0 done; 1 could not start (one line on stderr says why: a bad option, "
    "an unreachable or refusing service, a missing extra); 2 an unexpected error (one line; "
    "--verbose shows its traceback); 130 interrupted.",
)
@click.version_option(_version(), "--version", prog_name="roomrouter")
@click.option("-v", "--verbose", is_flag=True, help="Log at INFO level (default: warnings).")
def cli(verbose: bool) -> None:
    """Route real-time room messages between nodes: run the demo chat, a storage worker, or
    look at a running cluster."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not verbose:
        # aiormq logs every failed connect at ERROR in its own words; roomrouter reports the
        # same failure itself (one line at start-up, a warning and a retry later on).
        # Same for aiokafka (one ERROR per failed connect attempt).
        for name in ("aiormq", "aiokafka"):
            logging.getLogger(name).setLevel(logging.CRITICAL)


# -- demo -------------------------------------------------------------------------------------


@cli.command()
@click.option("--broker", default="memory://", show_default=True, help="Broker URL.")
@click.option(
    "--sink",
    default="sqlite:///roomrouter-demo.db",
    show_default=True,
    help="Where history is stored and read: sqlite:///path.db (a SQLite file in the current "
    "directory by default), postgresql://user@host/db or mysql://user@host/db; any with "
    "?table_prefix=name (tables <name>_messages, ...; default roomrouter).",
)
@click.option(
    "--presence",
    default=None,
    help="Where the who-is-here list is kept: a presence URL (redis://HOST:PORT/DB, "
    "memory://NAME) or 'off'; default: the broker's own server for memory:// and redis:// "
    "brokers, none for other brokers.",
)
@click.option("--namespace", default="demo", show_default=True, help="Cluster namespace.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to serve on.")
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=8000,
    show_default=True,
    help="Port to serve on (0 picks a free one).",
)
@click.option("--history", type=int, default=50, show_default=True, help="Messages on joining.")
@click.option(
    "--no-worker",
    is_flag=True,
    help="Run no storage worker in this process (run `roomrouter worker` instead).",
)
def demo(
    broker: str, sink: str, presence: str | None, namespace: str, host: str, port: int,
    history: int, no_worker: bool,
) -> None:  # fmt: skip
    """Serve a web chat on roomrouter.

    The defaults need no service: the in-memory broker, and history in a SQLite file. Give
    several processes one --broker (Redis, RabbitMQ, Kafka), one --sink and their own --port
    to run a multi-node chat.
    """
    try:
        from . import _demo
    except ImportError as exc:  # Starlette, uvicorn or websockets is missing
        raise MissingDependency("demo", exc.name or "starlette") from exc
    options: dict[str, Any] = {
        "broker": broker, "sink": sink, "namespace": namespace, "history": history,
        "worker": not no_worker,
    }  # fmt: skip
    if presence is not None:
        options["presence"] = False if presence == "off" else presence
    _demo.run(_demo.DemoSettings(**options), host=host, port=port)


# -- worker -----------------------------------------------------------------------------------


@cli.command()
@click.option("--broker", required=True, help="Broker URL, e.g. redis://127.0.0.1:6379/0.")
@click.option("--namespace", required=True, help="Cluster namespace whose queue to drain.")
@click.option(
    "--sink",
    required=True,
    help="sqlite:///path.db, postgresql://user@host/db or mysql://user@host/db; any with "
    "?table_prefix=name (tables <name>_messages, ...; default roomrouter).",
)
@click.option("--name", default=None, help="Consumer name (default: host-pid).")
@click.option(
    "--batch-size", type=click.IntRange(min=1), default=500, show_default=True,
    help="Most envelopes written per sink transaction.",
)  # fmt: skip
@click.option(
    "--max-delay", type=click.FloatRange(min=0), default=0.2, show_default=True,
    help="Seconds an envelope may wait for its batch to fill.",
)  # fmt: skip
@click.option(
    "--stall-after", type=click.FloatRange(min=0, min_open=True), default=30.0, show_default=True,
    help="Seconds of failing without progress before an ERROR says the worker is stalled.",
)  # fmt: skip
def worker(
    broker: str, namespace: str, sink: str, name: str | None, batch_size: int, max_delay: float,
    stall_after: float,
) -> None:  # fmt: skip
    """Move persisted messages from the broker's storage queue into a sink.

    Run one or more, anywhere: they are competing consumers, acknowledge only what the sink
    committed, and stop within a bounded time on SIGTERM.
    """
    anyio.run(_run_worker, broker, namespace, sink, name, batch_size, max_delay, stall_after)


async def _run_worker(
    broker: str, namespace: str, sink: str, name: str | None, batch_size: int, max_delay: float,
    stall_after: float = 30.0,
) -> None:  # fmt: skip
    from .storage import StorageWorker

    worker = StorageWorker.from_urls(
        broker, namespace, sink, name=name, batch_size=batch_size, max_delay=max_delay,
        stall_after=stall_after,
    )  # fmt: skip
    async with anyio.create_task_group() as tg:

        async def announce() -> None:
            await worker.ready.wait()
            print(
                f"roomrouter worker: consuming {redact(broker)} namespace {namespace} into "
                f"{redact(sink)} (consumer {worker.name})",
                flush=True,
            )

        async def on_signal() -> None:
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    logging.getLogger("roomrouter.worker").info("stopping after this batch")
                    worker.stop()
                    return

        tg.start_soon(on_signal)
        tg.start_soon(announce)
        await worker.run()
        tg.cancel_scope.cancel()
    s = worker.stats
    print(
        f"stored {s.written} new, {s.acked} acknowledged, {s.batches} batches, "
        f"{s.dead_lettered} dead-lettered, {s.queue_recreated} queue losses, "
        f"{s.abandoned} left to redeliver, {s.stalls} stall(s)",
        flush=True,
    )


# -- inspect ----------------------------------------------------------------------------------


@cli.command()
@click.option("--broker", required=True, help="Broker URL of the cluster.")
@click.option("--namespace", required=True, help="Cluster namespace.")
@click.option(
    "--presence",
    default=None,
    help="Presence store URL, for member counts per room (redis://...).",
)
@click.option(
    "--wait", type=click.FloatRange(min=0), default=1.5, show_default=True,
    help="Seconds to listen after joining, so every node's heartbeat is heard.",
)  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
def inspect(broker: str, namespace: str, presence: str | None, wait: float, as_json: bool) -> None:
    """Show a running cluster: its live nodes (age, rooms, members) and its rooms (hosting
    nodes, presence counts).

    The inspector joins the cluster as a short-lived node of its own (it hosts nothing and
    says goodbye), so it sees what every node sees.
    """
    if not as_json:
        _rich()  # before joining the cluster: a missing extra fails at once, not after --wait
    report = anyio.run(_inspect, broker, namespace, presence, wait)
    if as_json:
        click.echo(json.dumps(report, indent=2, sort_keys=True))
    else:
        _print_report(report)


async def _inspect(
    broker: str, namespace: str, presence: str | None, wait: float
) -> dict[str, Any]:
    from ._router import RoomRouter

    router = RoomRouter.from_url(
        broker, namespace=namespace, node_id="inspect-" + secrets.token_hex(4), linger=0,
        presence=presence,
    )  # fmt: skip
    async with router:
        await anyio.sleep(wait)
        now = time.time()
        nodes = [n for n in router.nodes() if n.node_id != router.node_id]
        hosts: dict[str, list[str]] = {}
        for node in nodes:
            for room in node.rooms:
                hosts.setdefault(room, []).append(node.node_id)
        rooms = []
        for room in sorted(hosts):
            count = len(await router.presence(room)) if presence is not None else None
            rooms.append({"room": room, "hosts": sorted(hosts[room]), "presence": count})
        return {
            "broker": redact(broker),
            "namespace": namespace,
            "nodes": [
                {
                    "id": n.node_id,
                    "age_s": round(now - n.started, 1) if n.started else None,
                    "last_seen_s": round(n.last_seen, 2),
                    "rooms": len(n.rooms),
                    "members": n.members,
                }
                for n in nodes
            ],
            "rooms": rooms,
        }


def _rich() -> tuple[Any, Any]:
    """rich's ``Console`` and ``Table``; :class:`MissingDependency` (which also says that
    ``--json`` needs no extra) if the ``cli`` extra is not installed."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError as exc:
        error = MissingDependency("cli", "rich")
        error.args = (f"{error}; or use --json, which needs no extra",)
        raise error from exc
    return Console, Table


def _print_report(report: dict[str, Any]) -> None:
    Console, Table = _rich()
    console = Console()
    nodes = Table(title=f"{len(report['nodes'])} live node(s) of {report['namespace']!r} on "
                        f"{report['broker']}")  # fmt: skip
    for column, justify in (("node", "left"), ("age", "right"), ("last heard", "right"),
                            ("rooms", "right"), ("members", "right")):  # fmt: skip
        nodes.add_column(column, justify=justify)
    for n in report["nodes"]:
        age = "?" if n["age_s"] is None else _duration(n["age_s"])
        nodes.add_row(n["id"], age, f"{n['last_seen_s']:.1f}s", str(n["rooms"]), str(n["members"]))
    console.print(nodes)
    rooms = Table(title=f"{len(report['rooms'])} room(s)")
    rooms.add_column("room")
    rooms.add_column("hosting nodes")
    rooms.add_column("present", justify="right")
    for r in report["rooms"]:
        present = "-" if r["presence"] is None else str(r["presence"])
        rooms.add_row(r["room"], ", ".join(r["hosts"]), present)
    console.print(rooms)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


# -- bench ------------------------------------------------------------------------------------


def _benchmarks_root() -> Path | None:
    """The checkout holding ``benchmarks/__main__.py``: the current directory or one of its
    parents, else the one this package was installed from in editable mode."""
    here = Path.cwd().resolve()
    candidates = [here, *here.parents, Path(__file__).resolve().parents[2]]
    for root in candidates:
        if (root / "benchmarks" / "__main__.py").is_file():
            return root
    return None


@cli.command(
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    add_help_option=False,
)
@click.argument("options", nargs=-1, type=click.UNPROCESSED)
def bench(options: tuple[str, ...]) -> None:
    """Run the benchmark suite (python -m benchmarks) of a repo checkout; every option is
    passed on (roomrouter bench --help lists them). Writes benchmarks/results/ and
    docs/benchmarks.md there."""
    root = _benchmarks_root()
    if root is None:
        raise ConfigurationError(
            "bench needs a roomrouter repo checkout: no benchmarks/ in the current directory "
            "or its parents (git clone the repository and run it there)"
        )
    done = subprocess.run([sys.executable, "-m", "benchmarks", *options], cwd=root)
    if done.returncode:
        raise click.exceptions.Exit(done.returncode)


# -- entry point ------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        cli.main(args=args, prog_name="roomrouter", standalone_mode=False)
    except click.exceptions.Exit as exc:  # --help, --version
        return exc.exit_code
    except click.exceptions.Abort:
        return 130
    except click.UsageError as exc:
        # A bad option is a start-up failure like any other: one line, status 1.
        command = exc.ctx.command_path if exc.ctx is not None else "roomrouter"
        message = _scrub(exc.format_message(), args)
        print(f"roomrouter: {message} (see: {command} --help)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except SystemExit:
        raise
    except BaseException as exc:
        error = _first(exc, RoomRouterError)
        if error is not None:
            print(f"roomrouter: {_scrub(str(error), args)}", file=sys.stderr)
            return 1
        if _first(exc, KeyboardInterrupt) is not None:
            return 130
        if "-v" in args or "--verbose" in args:
            raise
        # A bug, yet still one line (a client library's words, never its repr).
        found = exc
        while isinstance(found, BaseExceptionGroup):
            found = found.exceptions[0]
        reason = _scrub(describe(found), args)
        print(f"roomrouter: unexpected error: {reason} (--verbose shows where)", file=sys.stderr)
        return 2
    return 0


def _first(exc: BaseException, kind: type[_E]) -> _E | None:
    """``exc`` if it is a ``kind``, else the first ``kind`` inside it if it is an exception
    group (anyio task groups wrap what their tasks raised, beside their cancellations)."""
    if isinstance(exc, kind):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _first(inner, kind)
            if found is not None:
                return found
    return None


def _scrub(message: str, args: Sequence[str]) -> str:
    """Remove the passwords of every URL among ``args`` from ``message``: a second line of
    defence behind ``redact`` at the source, for text a client library composed."""
    for arg in args:
        for candidate in (arg, arg.partition("=")[2]):
            if "://" not in candidate:
                continue
            try:
                password = urlsplit(candidate).password
            except ValueError:
                continue
            for secret in {password, unquote(password or "")}:
                if secret:
                    message = message.replace(secret, "***")
    return message


if __name__ == "__main__":
    sys.exit(main())
