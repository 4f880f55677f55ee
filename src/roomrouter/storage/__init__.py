"""Persistence: sinks that store envelopes durably, and the worker that feeds them.

``PostgresSink`` and ``MySQLSink`` are imported on first access, so ``import roomrouter.storage``
never imports asyncpg or asyncmy; without the ``roomrouter[postgres]`` (``roomrouter[mysql]``)
extra that access raises :class:`~roomrouter.MissingDependency`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._base import DeadLetter, Sink
from ._urls import sink_from_url
from .sqlite import SQLiteSink
from .worker import StorageWorker, WorkerStats

if TYPE_CHECKING:
    from .mysql import MySQLSink
    from .postgres import PostgresSink

__all__ = [
    "DeadLetter",
    "MySQLSink",
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
    if name == "MySQLSink":
        from .mysql import MySQLSink

        return MySQLSink
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
