"""A task that belongs to no caller: the router's host task runs there.

A task group entered in the caller's task ties the router to that task's cancel-scope stack:
closing routers in any order but the reverse of opening, or from another task, then breaks
(anyio refuses to exit a cancel scope that is not the task's current one). So a router runs
its background work in a task of its own, started here outside every caller's task group, as
aiokafka, aio-pika's robust connection and python-socketio do with their background tasks.
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Awaitable, Callable, Coroutine
from functools import partial
from typing import Any

from anyio.abc import TaskGroup

__all__ = ["SupervisedTasks", "spawn_detached", "stray_cancellation"]

#: The event loop keeps only weak references to tasks: hold them until they end.
_running: set[asyncio.Task[None]] = set()


def spawn_detached(func: Callable[[], Coroutine[Any, Any, None]], name: str) -> None:
    """Run ``func()`` in a new task of the current event loop, outside the caller's task group
    and cancel scopes. ``func`` must not raise: nobody would hear it."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        loop = None
    if loop is not None:
        task = loop.create_task(func(), name=name)
        _running.add(task)
        task.add_done_callback(_running.discard)
        return
    # The other event loop anyio runs on; imported by name since it is no dependency of ours.
    trio = importlib.import_module("trio")
    trio.lowlevel.spawn_system_task(func, name=name)


def stray_cancellation() -> bool:
    """True inside ``except CancelledError`` when nobody cancelled this task: a client library
    raised a ``CancelledError`` of its own (aiormq and aiokafka do when their connection
    closes under a pending call). Left alone, anyio takes it for the task's cancellation and
    cancels the whole task group: the router would stop, silently. asyncio only (a request to
    cancel shows in ``Task.cancelling()``); elsewhere every cancellation is taken as real."""
    try:
        task = asyncio.current_task()
    except RuntimeError:
        return False
    return task is not None and task.cancelling() == 0


class SupervisedTasks:
    """What brokers and presence stores start their tasks with (``BrokerContext.task_group``):
    every task runs under the router's supervision (``supervise(task_group, name, loop)``), so
    a failure is logged, counted and restarted instead of stopping the router."""

    def __init__(
        self,
        inner: TaskGroup,
        supervise: Callable[[TaskGroup, str, Callable[[], Awaitable[None]]], None],
    ) -> None:
        self._inner = inner
        self._supervise = supervise

    def start_soon(
        self, func: Callable[..., Coroutine[Any, Any, Any]], *args: object, name: object = None
    ) -> None:
        label = str(name or getattr(func, "__name__", "task"))
        self._supervise(self._inner, label, partial(func, *args))
