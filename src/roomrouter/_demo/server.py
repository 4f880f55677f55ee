"""Serving the demo app with uvicorn: ``roomrouter demo`` calls :func:`run`."""

from __future__ import annotations

import os
import socket

import uvicorn

from .._errors import ConfigurationError
from ..storage import SQLiteSink, sink_from_url
from .app import DemoSettings, create_app

__all__ = ["bind", "run", "server_for"]


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (``port=0``: a free one; read it back with
    ``getsockname()``). Bound here rather than by uvicorn so the caller knows the real port
    before the server starts, and can hand it to a test or print it."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        # A restarted demo can take its port back at once (as uvicorn's own bind does).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock


def server_for(settings: DemoSettings, *, log_level: str = "info") -> uvicorn.Server:
    """A uvicorn server of the demo app; ``await server.serve(sockets=[bind(...)])`` runs it in
    the current asyncio event loop until ``server.should_exit`` is set (or SIGINT/SIGTERM)."""
    config = uvicorn.Config(
        create_app(settings),
        # The sans-I/O protocol on `websockets` (the "auto" choice of older uvicorn versions is
        # its deprecated legacy implementation).
        ws="websockets-sansio",
        # Far above max_payload, so that an oversize message reaches the app, which answers it
        # with a PayloadTooLarge error frame and keeps the connection; only a frame beyond this
        # (64 x, 1 MiB by default: a bound on what one frame may cost the server) is refused
        # by the transport with close code 1009. The page checks the size before sending.
        ws_max_size=64 * settings.max_payload + 4096,
        lifespan="on",
        access_log=False,
        log_level=log_level,
    )
    return uvicorn.Server(config)


def _where(sink_url: str) -> str:
    sink = sink_from_url(sink_url)  # unstarted: opens nothing
    if isinstance(sink, SQLiteSink):
        return f"the SQLite file {os.path.abspath(sink.path)}"
    return sink.name  # never the URL: it may hold a password


def run(settings: DemoSettings, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve the demo on ``host:port`` until SIGINT or SIGTERM; print where to point a browser."""
    server = server_for(settings)  # first: a bad setting fails before anything is printed
    try:
        sock = bind(host, port)
    except OSError as exc:
        raise ConfigurationError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    port = sock.getsockname()[1]
    url_host = f"[{host}]" if ":" in host else host
    print(
        f"roomrouter demo on http://{url_host}:{port}  (broker {settings.broker}, history in "
        f"{_where(settings.sink)})\nopen it in two browser tabs; Ctrl-C stops",
        flush=True,
    )
    server.config.host, server.config.port = host, port  # for uvicorn's own startup line
    server.run(sockets=[sock])
