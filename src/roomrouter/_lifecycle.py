"""A router's life: its host task from start to close, and the supervision of its loops.

The router's background work runs in a host task of its own, not in the caller's task:
routers then open and close in any order, from any task, inside any framework's lifespan (see
_host.py). The caller of ``start``/``aclose`` only waits for the host task to say "started"
or "stopped"; the router says what to open, what to start and how to stop.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from functools import partial

import anyio
from anyio.abc import TaskGroup

from ._host import spawn_detached, stray_cancellation
from ._stats import Stats

__all__ = ["HostTask"]

log = logging.getLogger("roomrouter")


@dataclass(slots=True, eq=False)
class _Run:
    """What the caller of start/close and the host task tell each other."""

    started: anyio.Event = field(default_factory=anyio.Event)
    stop: anyio.Event = field(default_factory=anyio.Event)
    stopped: anyio.Event = field(default_factory=anyio.Event)
    error: Exception | None = None


class HostTask:
    """The host task of one router (node ``node_id``); ``running`` from a successful start
    until the stop begins."""

    def __init__(self, node_id: str, stats: Stats) -> None:
        self.node_id = node_id
        self.running = False
        self._stats = stats
        self._run: _Run | None = None

    async def start(
        self,
        enter: Callable[[AsyncExitStack], Awaitable[None]],
        start_in: Callable[[TaskGroup], Awaitable[None]],
        stop: Callable[[], Awaitable[None]],
    ) -> None:
        """Run the host task: ``enter`` opens what lives as long as it (closed by the stack,
        after the task group), ``start_in`` starts the router in the task group, ``stop`` is
        called when :meth:`close` is. Returns once started; raises what made the start fail,
        with nothing left running."""
        if self._run is not None:
            raise RuntimeError("this router was already started (a router starts once)")
        run = self._run = _Run()
        main = partial(self._main, run, enter, start_in, stop)
        spawn_detached(main, f"roomrouter host {self.node_id}")
        try:
            await run.started.wait()
        except BaseException:
            # The caller gave up (cancelled): stop what started, then let the cancellation on.
            run.stop.set()
            with anyio.CancelScope(shield=True):
                await run.stopped.wait()
            raise
        if run.error is not None:
            with anyio.CancelScope(shield=True):
                await run.stopped.wait()
            raise run.error

    async def close(self) -> None:
        """Stop the host task and return once it ended. Idempotent, callable from any task."""
        run = self._run
        if run is None:
            return
        run.stop.set()
        with anyio.CancelScope(shield=True):
            await run.stopped.wait()

    async def _main(
        self,
        run: _Run,
        enter: Callable[[AsyncExitStack], Awaitable[None]],
        start_in: Callable[[TaskGroup], Awaitable[None]],
        stop: Callable[[], Awaitable[None]],
    ) -> None:
        """The host task: everything the router runs lives in here, from start to close."""
        try:
            async with AsyncExitStack() as stack:
                await enter(stack)
                async with anyio.create_task_group() as tg:
                    try:
                        await start_in(tg)
                    except Exception as exc:
                        run.error = exc
                    else:
                        self.running = True
                    run.started.set()
                    if run.error is None:
                        await run.stop.wait()
                        self.running = False
                        await stop()
                    tg.cancel_scope.cancel()
        except Exception as exc:
            if not run.started.is_set():
                run.error = exc
            else:
                log.exception("node %s: the router stopped on an error", self.node_id)
        finally:
            self.running = False
            run.started.set()
            run.stopped.set()

    def spawn(self, tg: TaskGroup, name: str, loop: Callable[[], Awaitable[None]]) -> None:
        """Run ``loop`` under supervision: an exception is logged, counted, and the loop restarted
        after a capped backoff. Cancellation (router exit) ends it."""
        node_id, stats = self.node_id, self._stats

        async def supervised() -> None:
            delay = 0.05
            while True:
                try:
                    await loop()
                    return
                except Exception:
                    stats.task_restarts += 1
                    log.exception("node %s: background task %r failed; restarting", node_id, name)
                except anyio.get_cancelled_exc_class():
                    if not stray_cancellation():
                        raise  # the router is closing
                    stats.task_restarts += 1
                    log.error(
                        "node %s: background task %r ended with a CancelledError nobody asked "
                        "for (raised by a client library); restarting", node_id, name,
                        exc_info=True,
                    )  # fmt: skip
                await anyio.sleep(delay)
                delay = min(delay * 2, 5.0)

        tg.start_soon(supervised, name=f"roomrouter {name} {node_id}")
