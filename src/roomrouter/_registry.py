"""The backend registry: URL schemes resolved through entry points.

A broker backend registers its URL scheme in the ``roomrouter.brokers`` entry-point group, a
sink in ``roomrouter.sinks``; the entry point's name is the scheme, its object a callable
``factory(url: str, **options)`` that returns an unstarted :class:`~roomrouter.Broker`
(:class:`~roomrouter.storage.Sink`). roomrouter's own backends register the same way (see
pyproject.toml). Only the chosen backend is imported, when its scheme is used: a missing
optional dependency costs nothing until then, and its factory raises
:class:`~roomrouter.MissingDependency` naming the extra.

The entry points are read once per ``sys.path`` (a test that puts a distribution on the
path sees it) and read again before a scheme is declared unknown (a package installed while
the process runs is found).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Final

from ._errors import ConfigurationError, MissingDependency
from .urls import redact, url_scheme

__all__ = ["BROKER_GROUP", "SINK_GROUP", "installed_schemes", "resolve"]

BROKER_GROUP: Final = "roomrouter.brokers"
SINK_GROUP: Final = "roomrouter.sinks"

_WHAT: Final = {BROKER_GROUP: "broker", SINK_GROUP: "sink"}

# (group, sys.path snapshot) -> scheme -> the entry points registering it.
_cache: dict[tuple[str, tuple[str, ...]], dict[str, list[EntryPoint]]] = {}


def _scan(group: str, *, fresh: bool = False) -> dict[str, list[EntryPoint]]:
    key = (group, tuple(sys.path))
    found = None if fresh else _cache.get(key)
    if found is None:
        found = {}
        seen: set[tuple[str, str]] = set()
        for ep in entry_points(group=group):
            # The same distribution can be visible twice (an editable install and a path
            # entry): one registration, not a conflict.
            if (ep.name.lower(), ep.value) in seen:
                continue
            seen.add((ep.name.lower(), ep.value))
            found.setdefault(ep.name.lower(), []).append(ep)
        _cache.clear()  # one snapshot per group is enough: sys.path rarely changes
        _cache[key] = found
    return found


def installed_schemes(group: str) -> list[str]:
    """The URL schemes registered in ``group`` (``roomrouter.brokers``/``roomrouter.sinks``)."""
    return sorted(_scan(group, fresh=True))


def _origin(ep: EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    name = getattr(dist, "name", None) if dist is not None else None
    return f"{ep.value} (from {name})" if name else ep.value


def resolve(group: str, url: str) -> Callable[..., Any]:
    """The factory registered in ``group`` for ``url``'s scheme, imported.

    Raises :class:`~roomrouter.ConfigurationError` for an unknown scheme (listing the
    installed ones), for a scheme two distributions claim, and for a factory that cannot be
    imported; :class:`~roomrouter.MissingDependency` passes through.
    """
    what = _WHAT[group]
    scheme = url_scheme(url)
    if not scheme:
        raise ConfigurationError(
            f"a {what} URL needs a scheme (scheme://...): {redact(url)!r}; installed: "
            + _listing(group)
        )
    candidates = _scan(group).get(scheme) or _scan(group, fresh=True).get(scheme)
    if not candidates:
        raise ConfigurationError(
            f"unknown {what} URL scheme {scheme!r} in {redact(url)!r}: installed are "
            + _listing(group)
            + f" (a backend registers its scheme in the {group!r} entry-point group)"
        )
    if len(candidates) > 1:
        raise ConfigurationError(
            f"the {what} URL scheme {scheme!r} is registered more than once: "
            + ", ".join(_origin(ep) for ep in candidates)
        )
    [ep] = candidates
    try:
        factory = ep.load()
    except MissingDependency:
        raise
    except ImportError as exc:
        raise ConfigurationError(
            f"the {what} backend of {scheme}:// cannot be imported ({_origin(ep)}): {exc}"
        ) from exc
    except AttributeError as exc:
        raise ConfigurationError(
            f"the {what} backend of {scheme}:// names no such object ({_origin(ep)}): {exc}"
        ) from exc
    if not callable(factory):
        raise ConfigurationError(
            f"the {what} backend of {scheme}:// is not callable ({_origin(ep)})"
        )
    return factory  # type: ignore[no-any-return]


def _listing(group: str) -> str:
    schemes = installed_schemes(group)
    return ", ".join(f"{s}://" for s in schemes) if schemes else "none"
