"""Persistence: sinks that store envelopes durably, and the worker that feeds them.

A sink (built in, or a third party's) implements :class:`Sink` (its guarantees are numbered in
its module's docstring and in docs/backends.md) and registers a factory for its URL scheme in
the ``roomrouter.sinks`` entry-point group; :func:`sink_from_url` resolves through it, and
:class:`roomrouter.testing.SinkContract` is the conformance suite a sink runs.

``PostgresSink`` and ``MySQLSink`` are imported on first access, so ``import roomrouter.storage``
never imports asyncpg or asyncmy; without the ``roomrouter[postgres]`` (``roomrouter[mysql]``)
extra that access raises :class:`~roomrouter.MissingDependency`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._base import (
    MAX_HISTORY_LIMIT,
    SCHEMA_VERSION,
    DeadLetter,
    Sink,
    check_history_limit,
    check_table_prefix,
)
from ._urls import sink_from_url
from .sqlite import SQLiteSink
from .worker import StorageWorker, WorkerStats

if TYPE_CHECKING:
    from .mysql import MySQLSink
    from .postgres import PostgresSink

__all__ = [
    "DeadLetter",
    "MAX_HISTORY_LIMIT",
    "MySQLSink",
    "PostgresSink",
    "SCHEMA_VERSION",
    "SQLiteSink",
    "Sink",
    "StorageWorker",
    "WorkerStats",
    "check_history_limit",
    "check_table_prefix",
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
