"""The ``roomrouter`` command.

roomrouter demo [--broker memory://] [--sink sqlite:///roomrouter-demo.db] [--port 8000]
roomrouter worker --broker redis://127.0.0.1:6379/0 --namespace chat --sink sqlite:///chat.db

A failure to start (bad option, unreachable broker, wrong password, missing database) is one
line ``roomrouter: <reason>`` on stderr and exit status 1; URLs in it have their password
redacted. Anything else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence
from urllib.parse import unquote, urlsplit

import anyio

from ._errors import ConfigurationError, MissingDependency, RoomRouterError

__all__ = ["main"]


async def _run_worker(args: argparse.Namespace) -> None:
    from .storage import StorageWorker

    worker = StorageWorker.from_urls(
        args.broker, args.namespace, args.sink, name=args.name,
        batch_size=args.batch_size, max_delay=args.max_delay,
    )  # fmt: skip
    async with anyio.create_task_group() as tg:

        async def on_signal() -> None:
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    logging.getLogger("roomrouter.worker").info("stopping after this batch")
                    worker.stop()
                    return

        tg.start_soon(on_signal)
        await worker.run()
        tg.cancel_scope.cancel()
    s = worker.stats
    print(
        f"stored {s.written} new, {s.acked} acknowledged, {s.batches} batches, "
        f"{s.dead_lettered} dead-lettered, {s.queue_recreated} queue losses, "
        f"{s.abandoned} left to redeliver",
        flush=True,
    )


def _run_demo(args: argparse.Namespace) -> None:
    if not 0 <= args.port <= 65535:
        raise ConfigurationError(f"--port must be 1 to 65535 (or 0: a free port), not {args.port}")
    try:
        from . import _demo
    except ImportError as exc:  # Starlette, uvicorn or websockets is missing
        raise MissingDependency("demo", exc.name or "starlette") from exc

    settings = _demo.DemoSettings(
        broker=args.broker,
        sink=args.sink,
        namespace=args.namespace,
        history=args.history,
        worker=not args.no_worker,
    )
    _demo.run(settings, host=args.host, port=args.port)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="roomrouter")
    parser.add_argument("-v", "--verbose", action="store_true")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo",
        help="run the demo chat server (web page + WebSocket)",
        description="Serve a web chat on roomrouter. The defaults need no service: the "
        "in-memory broker, and history in a SQLite file in the current directory. Give "
        "several processes one --broker (Redis, RabbitMQ, Kafka), one --sink and their own "
        "--port to run a multi-node chat.",
    )
    demo.add_argument("--broker", default="memory://", help="broker URL (default: memory://)")
    demo.add_argument(
        "--sink",
        default="sqlite:///roomrouter-demo.db",
        help="where history is stored and read (default: sqlite:///roomrouter-demo.db, "
        "a file in the current directory)",
    )
    demo.add_argument("--namespace", default="demo")
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    demo.add_argument("--history", type=int, default=50, help="messages shown on joining")
    demo.add_argument(
        "--no-worker",
        action="store_true",
        help="do not run a storage worker in this process (run `roomrouter worker` instead)",
    )
    worker = commands.add_parser("worker", help="move persisted messages into a sink")
    worker.add_argument("--broker", required=True, help="broker URL, e.g. redis://127.0.0.1/0")
    worker.add_argument("--namespace", required=True)
    worker.add_argument("--sink", required=True, help="sqlite:///path.db or postgresql://...")
    worker.add_argument("--name", default=None, help="consumer name (default: host-pid)")
    worker.add_argument("--batch-size", type=int, default=500)
    worker.add_argument("--max-delay", type=float, default=0.2, help="seconds")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        # aiormq logs every failed connect at ERROR in its own words; roomrouter reports the
        # same failure itself (one line at start-up, a warning and a retry later on).
        logging.getLogger("aiormq").setLevel(logging.CRITICAL)
    try:
        if args.command == "worker":
            anyio.run(_run_worker, args)
        elif args.command == "demo":
            _run_demo(args)
    except KeyboardInterrupt:
        return 130
    except BaseException as exc:
        error = _startup_error(exc)
        if error is None:
            raise
        message = _scrub(str(error), [getattr(args, "broker", ""), getattr(args, "sink", "")])
        print(f"roomrouter: {message}", file=sys.stderr)
        return 1
    return 0


def _startup_error(exc: BaseException) -> RoomRouterError | None:
    """The roomrouter error ``exc`` is, or the first one inside it if it is an exception group
    (task groups wrap what their tasks raised) holding nothing else; None for anything else."""
    if isinstance(exc, RoomRouterError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        ours, rest = exc.split(RoomRouterError)
        if ours is not None and rest is None:
            first: BaseException = ours
            while isinstance(first, BaseExceptionGroup):
                first = first.exceptions[0]
            assert isinstance(first, RoomRouterError)
            return first
    return None


def _scrub(message: str, urls: Sequence[str]) -> str:
    """Remove the passwords of ``urls`` from ``message``: a second line of defence behind
    ``redact`` at the source, for text a client library composed."""
    for url in urls:
        try:
            password = urlsplit(url).password
        except ValueError:
            continue
        for secret in {password, unquote(password or "")}:
            if secret:
                message = message.replace(secret, "***")
    return message


if __name__ == "__main__":
    sys.exit(main())
