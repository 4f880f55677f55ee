"""Broker selection by URL, through the entry-point registry (``roomrouter._registry``).

The URL's scheme names the backend: an entry point of the ``roomrouter.brokers`` group, whose
factory builds the broker. The factories below are roomrouter's own, registered in
pyproject.toml like a third party's; each imports its backend only when called, so a missing
optional dependency costs nothing until it is needed, and then says what to install.

The URL helpers (:func:`redact`, :func:`pop_options`, ...) are public in
:mod:`roomrouter.urls`; they are re-exported here for the modules that still import them
from this one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from . import _registry
from ._errors import ConfigurationError, MissingDependency, missing_module
from .urls import flag, pop_options, redact

if TYPE_CHECKING:
    from .brokers import Broker

__all__ = [
    "amqp_broker",
    "broker_from_url",
    "kafka_broker",
    "memory_broker",
    "pop_options",
    "pop_router_options",
    "redact",
    "redis_broker",
]

#: Query options of a broker URL that configure the router, not the broker.
_ROUTER_OPTIONS: tuple[tuple[str, Callable[[str], Any]], ...] = (("control_secret", str),)


def pop_router_options(url: str) -> tuple[str, dict[str, Any]]:
    """``url`` without the router's own query options, and those options. A URL without any
    comes back unchanged (its query is not re-encoded)."""
    parts = urlsplit(url) if isinstance(url, str) else None
    if parts is None or not parts.query:
        return url, {}
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    names = {key for key, _ in _ROUTER_OPTIONS}
    if not any(key in names for key, _ in pairs):
        return url, {}
    found = pop_options(url, dict(pairs), _ROUTER_OPTIONS)
    rest = [(key, value) for key, value in pairs if key not in names]
    return urlunsplit(parts._replace(query=urlencode(rest))), found


def _cluster_option(url: str) -> bool:
    """True if a ``redis://`` URL asks for Redis Cluster mode (``?cluster=1``)."""
    return flag(dict(parse_qsl(urlsplit(url).query)).get("cluster", ""))


def broker_from_url(url: str, **options: Any) -> Broker:
    """An unstarted broker for ``url``, made by the factory registered for its scheme;
    ``options`` are handed to that factory. Built in: ``memory://[name]``, ``redis://`` /
    ``rediss://`` (``?cluster=1``: Redis Cluster), ``amqp://`` / ``amqps://``,
    ``kafka://host:port[,host:port]``. An unknown scheme is a
    :class:`~roomrouter.ConfigurationError` listing the installed ones."""
    from .brokers import Broker

    if not isinstance(url, str):
        raise ConfigurationError(f"broker URL must be a str, not {type(url).__name__}")
    # One URL serves the router and the storage worker: the router's options are not the
    # broker's (the worker has no control plane to sign).
    url, _ = pop_router_options(url)
    factory = _registry.resolve(_registry.BROKER_GROUP, url)
    broker = factory(url, **options)
    if not isinstance(broker, Broker):
        raise ConfigurationError(
            f"the factory of {urlsplit(url).scheme}:// returned {type(broker).__name__}, "
            "not a roomrouter.brokers.Broker"
        )
    return broker


# -- roomrouter's own backends (entry points in pyproject.toml) -------------------------------


def memory_broker(url: str, **options: Any) -> Broker:
    """``memory://[name][?recent_size=1000&redelivery_after=30]``: nodes of one process."""
    from .brokers.memory import MemoryBroker

    broker = MemoryBroker.from_url(url)
    if not options:
        return broker
    settings = {"recent_size": broker.recent_size, "redelivery_after": broker.redelivery_after}
    return MemoryBroker(broker.hub, **{**settings, **options})


def redis_broker(url: str, **options: Any) -> Broker:
    """``redis://`` / ``rediss://``; ``?cluster=1`` for a Redis Cluster."""
    try:
        from .brokers.redis import RedisBroker
    except ImportError as exc:
        raise MissingDependency("redis", missing_module(exc, "redis")) from exc
    if _cluster_option(url):
        from .brokers.redis_cluster import RedisClusterBroker

        return RedisClusterBroker.from_url(url, **options)
    return RedisBroker.from_url(url, **options)


def amqp_broker(url: str, **options: Any) -> Broker:
    """``amqp://`` / ``amqps://``: RabbitMQ."""
    try:
        from .brokers.rabbitmq import RabbitMQBroker  # type: ignore[import-not-found,unused-ignore]
    except ImportError as exc:
        raise MissingDependency("rabbitmq", missing_module(exc, "aio_pika")) from exc
    broker: Broker = RabbitMQBroker.from_url(url, **options)
    return broker


def kafka_broker(url: str, **options: Any) -> Broker:
    """``kafka://host:port[,host:port]``."""
    try:
        from .brokers.kafka import KafkaBroker  # type: ignore[import-not-found,unused-ignore]
    except ImportError as exc:
        raise MissingDependency("kafka", missing_module(exc, "aiokafka")) from exc
    broker: Broker = KafkaBroker.from_url(url, **options)
    return broker


def nats_broker(url: str, **options: Any) -> Broker:
    """``nats://[user:pass@]host[:port][,host[:port]...]``: NATS with JetStream."""
    try:
        from .brokers.nats import NatsBroker
    except ImportError as exc:
        raise MissingDependency("nats", missing_module(exc, "nats")) from exc
    return NatsBroker.from_url(url, **options)
