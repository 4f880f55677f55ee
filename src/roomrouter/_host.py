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
from collections.abc import Callable, Coroutine
from typing import Any

__all__ = ["spawn_detached"]

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
