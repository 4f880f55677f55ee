"""Choose and configure a sink from a URL.

==================================  ===========================================================
``sqlite:///relative/path.db``      a file relative to the working directory
``sqlite:////absolute/path.db``     an absolute path (four slashes)
``sqlite://:memory:``               a private in-memory database (also ``sqlite:///:memory:``)
``postgresql://user@host:5432/db``  PostgreSQL through asyncpg (also ``postgres://``); the
                                    ``roomrouter[postgres]`` extra must be installed
``mysql://user:pw@host:3306/db``    MySQL or MariaDB through asyncmy (also ``mariadb://``); the
                                    ``roomrouter[mysql]`` extra must be installed
==================================  ===========================================================

All accept ``?table_prefix=name`` (default ``roomrouter``: the tables are ``<name>_messages``,
``<name>_meta`` and ``<name>_dead_letters``). Other query parameters of a PostgreSQL URL are
handed to asyncpg unchanged (``sslmode``, server settings, ...); a SQLite or MySQL URL accepts
no other. Error messages never repeat a password (URLs are shown redacted).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from .. import _registry
from .._errors import ConfigurationError, MissingDependency, missing_module
from ..urls import redact
from ._base import Sink

__all__ = ["mysql_sink", "postgres_sink", "sink_from_url", "sqlite_sink"]

_MEMORY_LOCATIONS = (":memory:", "/:memory:")


def sink_from_url(url: str, **options: Any) -> Sink:
    """Return an unstarted sink for ``url``, made by the factory registered for its scheme in
    the ``roomrouter.sinks`` entry-point group (``options`` are handed to it); raise
    ConfigurationError if the URL is not valid or its scheme unknown (the message lists the
    installed schemes).

    The PostgreSQL (MySQL) backend is imported only when a PostgreSQL (MySQL) URL is given; if
    asyncpg (asyncmy) is not installed this raises :class:`~roomrouter.MissingDependency`,
    which names the extra.
    """
    if not isinstance(url, str):
        raise ConfigurationError(f"a sink URL must be a str, not {type(url).__name__}")
    if "://" not in url:
        raise ConfigurationError(
            "a sink URL looks like sqlite:///path.db or postgresql://user@host:5432/db"
        )
    factory = _registry.resolve(_registry.SINK_GROUP, url)
    sink = factory(url, **options)
    if not isinstance(sink, Sink):
        raise ConfigurationError(
            f"the factory of {urlsplit(url).scheme}:// returned {type(sink).__name__}, "
            "not a roomrouter.storage.Sink"
        )
    return sink


# -- roomrouter's own sinks (entry points in pyproject.toml) ----------------------------------


def sqlite_sink(url: str, **options: Any) -> Sink:
    """``sqlite:///relative.db``, ``sqlite:////absolute.db``, ``sqlite://:memory:``."""
    return _sqlite(url, url.partition("://")[2], options)


def postgres_sink(url: str, **options: Any) -> Sink:
    """``postgresql://`` / ``postgres://``: PostgreSQL through asyncpg."""
    return _postgres(url, options)


def mysql_sink(url: str, **options: Any) -> Sink:
    """``mysql://`` / ``mariadb://``: MySQL or MariaDB through asyncmy."""
    return _mysql(url, options)


def _sqlite(url: str, rest: str, extra: dict[str, Any]) -> Sink:
    from .sqlite import SQLiteSink

    location, _, query = rest.partition("?")
    options = _query(query, url)
    unknown = options.keys() - {"table_prefix"}
    if unknown:
        raise ConfigurationError(
            f"unknown option(s) {sorted(unknown)} in SQLite URL {redact(url)!r}"
        )
    if location in _MEMORY_LOCATIONS:
        path = ":memory:"
    elif location.startswith("/") and len(location) > 1:
        # sqlite:///x.db -> "x.db", sqlite:////x.db -> "/x.db": the first slash ends the
        # (empty) host part, as in SQLAlchemy's URLs.
        path = unquote(location[1:])
    else:
        raise ConfigurationError(
            f"SQLite URL {redact(url)!r} names no file: use sqlite:///relative.db, "
            "sqlite:////absolute/path.db or sqlite://:memory:"
        )
    return SQLiteSink(path, **{**options, **extra})


def _postgres(url: str, extra: dict[str, Any]) -> Sink:
    try:  # here, so asyncpg is imported only when asked for
        from .postgres import PostgresSink
    except ImportError as exc:
        raise MissingDependency("postgres", missing_module(exc, "asyncpg")) from exc

    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - validates the port now instead of at connection time
    except ValueError as exc:
        raise ConfigurationError(f"PostgreSQL URL is not valid: {exc}") from exc
    options = _query(parts.query, "the PostgreSQL URL")
    table_prefix = options.pop("table_prefix", None)
    dsn = urlunsplit(parts._replace(query=urlencode(options)))
    if table_prefix is not None:
        extra = {"table_prefix": table_prefix, **extra}
    return PostgresSink(dsn, **extra)


def _mysql(url: str, extra: dict[str, Any]) -> Sink:
    try:  # here, so asyncmy is imported only when asked for
        from .mysql import MySQLSink
    except ImportError as exc:
        raise MissingDependency("mysql", missing_module(exc, "asyncmy")) from exc

    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise ConfigurationError(f"MySQL URL {redact(url)!r} is not valid: {exc}") from None
    options = _query(parts.query, "the MySQL URL")
    table_prefix = options.pop("table_prefix", None)
    if options:
        raise ConfigurationError(
            f"unknown option(s) {sorted(options)} in MySQL URL {redact(url)!r}: "
            "the only one is table_prefix"
        )
    base = urlunsplit(parts._replace(query=""))
    if table_prefix is not None:
        extra = {"table_prefix": table_prefix, **extra}
    return MySQLSink(base, **extra)


def _query(query: str, where: str) -> dict[str, str]:
    options: dict[str, str] = {}
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key in options:
            raise ConfigurationError(f"option {key!r} is given twice in {where}")
        options[key] = value
    return options
