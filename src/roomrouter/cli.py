"""The ``roomrouter`` command.

roomrouter demo [--broker memory://] [--sink sqlite:///roomrouter-demo.db] [--port 8000]
roomrouter worker --broker redis://127.0.0.1:6379/0 --namespace chat --sink sqlite:///chat.db
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence

import anyio

from ._errors import MissingDependency, RoomRouterError

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
    try:
        if args.command == "worker":
            anyio.run(_run_worker, args)
        elif args.command == "demo":
            _run_demo(args)
    except RoomRouterError as exc:
        print(f"roomrouter: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
