"""URL helpers for backend authors: how a broker or sink URL is shown, and how its query and
host list are read, the same way for every backend (built in or a third party's).

* :func:`redact` is the one way a URL is shown to a person: every message, banner, log line
  and ``repr`` that names a broker or sink URL passes it through, so a password never leaves.
* :func:`pop_options` takes a backend's options out of a URL's query, converted, and names the
  (redacted) URL when a value does not convert.
* :func:`flag` converts a boolean option (``?sharded=1``, ``?cluster=true``).
* :func:`parse_hosts` reads a ``host[:port][,host[:port]...]`` list (seed nodes, bootstrap
  servers).
* :func:`describe` is the one way a client library's exception is named in a message (the
  network failure in words, else its class and message; never its ``repr``, which may carry
  a URL): what every built-in backend says in its errors, for a third party's to say alike.

These depend on nothing but :mod:`roomrouter`'s errors, so a backend module may import them
at its top without an import cycle.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any, Final
from urllib.parse import urlsplit

from ._errors import ConfigurationError, describe

__all__ = [
    "TRUE_WORDS",
    "describe",
    "flag",
    "parse_hosts",
    "pop_options",
    "redact",
    "url_scheme",
]

#: The words :func:`flag` reads as true (case-insensitive); anything else is false.
TRUE_WORDS: Final = frozenset({"1", "true", "yes", "on"})

# Query options that carry a secret (libpq's ``password``, Kafka SASL settings and the like).
_SECRET_OPTION: Final = re.compile(
    r"(?i)((?:^|&)[^=&]*(?:password|passwd|pwd|secret|token)[^=&]*=)[^&]*"
)


def redact(url: str) -> str:
    """``url`` with the password of its user info and any secret query option replaced by
    ``***``; anything that is not such a URL comes back unchanged (a non-str as its repr)."""
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


def url_scheme(url: str) -> str:
    """The scheme of ``url``, lower-cased (``""`` if it has none)."""
    scheme, sep, _ = url.partition("://")
    return scheme.lower() if sep else urlsplit(url).scheme.lower()


def pop_options(
    url: str, query: dict[str, str], options: Iterable[tuple[str, Callable[[str], Any]]]
) -> dict[str, Any]:
    """Take each of ``options`` (``(name, convert)`` pairs) out of ``query`` (a URL's parsed
    query string, modified in place) and convert it; a value whose conversion raises
    ``ValueError`` is a :class:`~roomrouter.ConfigurationError` naming the redacted URL."""
    found: dict[str, Any] = {}
    for key, convert in options:
        if key in query:
            try:
                found[key] = convert(query.pop(key))
            except ValueError as exc:
                raise ConfigurationError(f"bad {key} in {redact(url)!r}") from exc
    return found


def flag(value: str) -> bool:
    """A boolean URL option: ``1``, ``true``, ``yes`` or ``on`` (any case) is true."""
    return value.strip().lower() in TRUE_WORDS


def parse_hosts(hosts: str, default_port: int, *, url: str | None = None) -> list[tuple[str, int]]:
    """``"h1:p1,h2,[::1]:p3"`` as ``[("h1", p1), ("h2", default_port), ("::1", p3)]``.

    Empty items are skipped; an IPv6 address needs brackets to carry a port. A bad port or an
    empty host is a :class:`~roomrouter.ConfigurationError` naming ``url`` (redacted) if given.
    """
    where = f" in {redact(url)!r}" if url is not None else ""
    found: list[tuple[str, int]] = []
    for item in hosts.split(","):
        item = item.strip()
        if not item:
            continue
        host, colon, port = item.rpartition(":")
        if not colon or host.endswith(":") or (item.startswith("[") and not host.endswith("]")):
            host, port = item, str(default_port)  # no port (an IPv6 address needs brackets)
        host = host.strip("[]")
        try:
            number = int(port)
        except ValueError:
            raise ConfigurationError(f"bad host {item!r}{where}") from None
        if not host or not 0 < number < 65536:
            raise ConfigurationError(f"bad host {item!r}{where}")
        found.append((host, number))
    if not found:
        raise ConfigurationError(f"no host{where}")
    return found
