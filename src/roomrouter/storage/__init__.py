"""Persistence: sinks that store envelopes durably, and the worker that feeds them.

``PostgresSink`` is imported on first access, so ``import roomrouter.storage`` never imports
asyncpg; without the ``roomrouter[postgres]`` extra that access raises
:class:`~roomrouter.MissingDependency`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._base import DeadLetter, Sink
from ._urls import sink_from_url
from .sqlite import SQLiteSink
from .worker import StorageWorker, WorkerStats

if TYPE_CHECKING:
    from .postgres import PostgresSink

__all__ = [
    "DeadLetter",
    "PostgresSink",
    "SQLiteSink",
    "Sink",
    "StorageWorker",
    "WorkerStats",
    "sink_from_url",
]


def __getattr__(name: str) -> Any:
    if name == "PostgresSink":
        from .postgres import PostgresSink

        return PostgresSink
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
