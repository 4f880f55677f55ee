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

from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from .._errors import ConfigurationError
from .._urls import redact
from ._base import Sink
from .sqlite import SQLiteSink

__all__ = ["sink_from_url"]

_MEMORY_LOCATIONS = (":memory:", "/:memory:")


def sink_from_url(url: str) -> Sink:
    """Return an unstarted sink for ``url``; raise ConfigurationError if the URL is not valid.

    The PostgreSQL (MySQL) backend is imported only when a PostgreSQL (MySQL) URL is given; if
    asyncpg (asyncmy) is not installed this raises :class:`~roomrouter.MissingDependency`,
    which names the extra.
    """
    if not isinstance(url, str):
        raise ConfigurationError(f"a sink URL must be a str, not {type(url).__name__}")
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep:
        raise ConfigurationError(
            "a sink URL looks like sqlite:///path.db or postgresql://user@host:5432/db"
        )
    if scheme == "sqlite":
        return _sqlite(url, rest)
    if scheme in ("postgresql", "postgres"):
        return _postgres(url)
    if scheme in ("mysql", "mariadb"):
        return _mysql(url)
    raise ConfigurationError(
        f"unknown sink URL scheme {scheme!r}: use sqlite://, postgresql:// (or postgres://) "
        "or mysql:// (or mariadb://)"
    )


def _sqlite(url: str, rest: str) -> Sink:
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
    if "table_prefix" in options:
        return SQLiteSink(path, table_prefix=options["table_prefix"])
    return SQLiteSink(path)


def _postgres(url: str) -> Sink:
    from .postgres import PostgresSink  # here, so asyncpg is imported only when asked for

    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - validates the port now instead of at connection time
    except ValueError as exc:
        raise ConfigurationError(f"PostgreSQL URL is not valid: {exc}") from exc
    options = _query(parts.query, "the PostgreSQL URL")
    table_prefix = options.pop("table_prefix", None)
    dsn = urlunsplit(parts._replace(query=urlencode(options)))
    if table_prefix is None:
        return PostgresSink(dsn)
    return PostgresSink(dsn, table_prefix=table_prefix)


def _mysql(url: str) -> Sink:
    from .mysql import MySQLSink  # here, so asyncmy is imported only when asked for

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
    if table_prefix is None:
        return MySQLSink(base)
    return MySQLSink(base, table_prefix=table_prefix)


def _query(query: str, where: str) -> dict[str, str]:
    options: dict[str, str] = {}
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key in options:
            raise ConfigurationError(f"option {key!r} is given twice in {where}")
        options[key] = value
    return options
