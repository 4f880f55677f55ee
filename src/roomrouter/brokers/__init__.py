"""Broker backends and the public contract a backend implements.

A backend (built in, or a third party's) is written against these names only: the
:class:`Broker` ABC and the :class:`BrokerContext` the router hands it, and, for a backend
with a storage queue and recent caches, :class:`StorageConsumer`, :class:`StoredFrame`,
:class:`RecentFrames` and :class:`RecentScan`. Each guarantee a backend must give is
numbered in the :class:`Broker` module's docstring and in docs/architecture.md.

:func:`broker_from_url` builds a broker from a URL through the entry-point registry (group
``roomrouter.brokers``, the name is the URL scheme); the URL helpers a backend's ``from_url``
needs are in :mod:`roomrouter.urls`, and :mod:`roomrouter.testing` holds the conformance
suite a backend runs (docs/backends.md).
"""

# ``_urls`` imports this package for type checking only: no import cycle.
from .._urls import broker_from_url
from ._base import (
    RECENT_SKEW_MS,
    Broker,
    BrokerContext,
    RecentFrames,
    RecentScan,
    StorageConsumer,
    StoredFrame,
    TaskStarter,
    frame_id,
    recent_bound,
)

__all__ = [
    "RECENT_SKEW_MS",
    "Broker",
    "BrokerContext",
    "RecentFrames",
    "RecentScan",
    "StorageConsumer",
    "StoredFrame",
    "TaskStarter",
    "broker_from_url",
    "frame_id",
    "recent_bound",
]
