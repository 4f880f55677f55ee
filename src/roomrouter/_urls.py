"""Broker selection by URL. Each backend is imported only when its scheme is used, so a missing
optional dependency costs nothing until it is needed, and then says what to install.

:func:`redact` is the one way a URL is shown to a person: every message, banner, log line and
``repr`` that names a broker or sink URL passes it through, so a password never leaves."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ._errors import ConfigurationError, MissingDependency
from .brokers._base import Broker

__all__ = ["broker_from_url", "pop_router_options", "redact"]

_EXTRA_MODULE = {"redis": "redis", "rabbitmq": "aio_pika", "kafka": "aiokafka", "nats": "nats"}


# Query options that carry a secret (libpq's ``password``, Kafka SASL settings and the like).
_SECRET_OPTION = re.compile(r"(?i)((?:^|&)[^=&]*(?:password|passwd|pwd|secret|token)[^=&]*=)[^&]*")


def pop_options(
    url: str, query: dict[str, str], options: Iterable[tuple[str, Callable[[str], Any]]]
) -> dict[str, Any]:
    """Take each of ``options`` out of ``query`` (a URL's parsed query string) and convert it;
    a value that does not convert is a :class:`ConfigurationError` naming the (redacted) URL."""
    found: dict[str, Any] = {}
    for key, convert in options:
        if key in query:
            try:
                found[key] = convert(query.pop(key))
            except ValueError as exc:
                raise ConfigurationError(f"bad {key} in {redact(url)!r}") from exc
    return found


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


def redact(url: str) -> str:
    """``url`` with the password of its user info and any secret query option replaced by
    ``***``; anything that is not such a URL comes back unchanged."""
    if not isinstance(url, str):
        return repr(url)
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    end = min((i for i in map(rest.find, "/?#") if i >= 0), default=len(rest))
    netloc, after = rest[:end], rest[end:]
    if "@" in netloc:
        userinfo, _, hosts = netloc.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        netloc = f"{user}{':***' if colon else ''}@{hosts}"
    path, question, query = after.partition("?")
    if question:
        query = _SECRET_OPTION.sub(r"\1***", query)
    return f"{scheme}{sep}{netloc}{path}{question}{query}"


def _cluster_option(url: str) -> bool:
    """True if a ``redis://`` URL asks for Redis Cluster mode (``?cluster=1``)."""
    query = dict(parse_qsl(urlsplit(url).query))
    return query.get("cluster", "").lower() in ("1", "true", "yes", "on")


def _missing(extra: str, exc: ImportError) -> MissingDependency:
    return MissingDependency(extra, _EXTRA_MODULE[extra])


def broker_from_url(url: str) -> Broker:
    """``memory://[name]``, ``redis://`` / ``rediss://`` / ``unix://`` (``?cluster=1``: Redis
    Cluster), ``amqp://`` / ``amqps://``, ``kafka://host:port[,host:port]``."""
    if not isinstance(url, str):
        raise ConfigurationError(f"broker URL must be a str, not {type(url).__name__}")
    # One URL serves the router and the storage worker: the router's options are not the
    # broker's (the worker has no control plane to sign).
    url, _ = pop_router_options(url)
    scheme = urlsplit(url).scheme.lower()
    if scheme == "memory":
        from .brokers.memory import MemoryBroker

        return MemoryBroker.from_url(url)
    if scheme in ("redis", "rediss"):
        try:
            from .brokers.redis import RedisBroker
        except ImportError as exc:
            raise _missing("redis", exc) from exc
        if _cluster_option(url):
            from .brokers.redis_cluster import RedisClusterBroker

            return RedisClusterBroker.from_url(url)
        return RedisBroker.from_url(url)
    if scheme in ("amqp", "amqps"):
        try:
            from .brokers.rabbitmq import RabbitMQBroker  # type: ignore[import-not-found,unused-ignore]
        except ImportError as exc:
            raise _missing("rabbitmq", exc) from exc
        broker: Broker = RabbitMQBroker.from_url(url)
        return broker
    if scheme == "kafka":
        try:
            from .brokers.kafka import KafkaBroker  # type: ignore[import-not-found,unused-ignore]
        except ImportError as exc:
            raise _missing("kafka", exc) from exc
        kafka: Broker = KafkaBroker.from_url(url)
        return kafka
    elif scheme == "nats":
        try:
            from .brokers.nats import NatsBroker
        except ImportError as exc:
            raise _missing("nats", exc) from exc
        return NatsBroker.from_url(url)
    raise ConfigurationError(
        f"unknown broker URL scheme {scheme!r} in {redact(url)!r}: "
        "use memory://, redis://, rediss://, amqp://, amqps:// or kafka://"
    )
