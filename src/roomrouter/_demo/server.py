"""Serving the demo app with uvicorn: ``roomrouter demo`` calls :func:`run`."""

from __future__ import annotations

import logging
import os
import socket

import anyio
import uvicorn

from .._errors import ConfigurationError, RoomRouterError
from .._urls import broker_from_url, redact
from ..brokers._base import BrokerContext
from ..presence import presence_from_url
from ..storage import SQLiteSink, sink_from_url
from .app import DemoSettings, create_app, startup_error

__all__ = ["bind", "run", "server_for"]


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (``port=0``: a free one; read it back with
    ``getsockname()``). Bound here rather than by uvicorn so the caller knows the real port
    before the server starts, and can hand it to a test or print it. Raises
    :class:`~roomrouter.ConfigurationError` for a port outside 0..65535 (the socket layer would
    take it modulo 65536)."""
    if not isinstance(port, int) or not 0 <= port <= 65535:
        raise ConfigurationError(f"port must be 1 to 65535 (or 0: a free port), not {port!r}")
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


async def check_services(settings: DemoSettings) -> None:
    """Connect to the broker and open the sink once, then close both; raise the
    :class:`~roomrouter.RoomRouterError` that says why if either fails.

    ``run`` calls it before serving: a failure inside uvicorn's lifespan is reported by uvicorn
    as a page of traceback (and the process would carry on to exit 0), while here it is one
    error the command prints in one line.
    """
    broker = broker_from_url(settings.broker)
    async with anyio.create_task_group() as tg:
        context = BrokerContext(
            node_id=f"demo-check-{os.getpid()}",
            namespace=settings.namespace,
            on_data=lambda room, frame: None,
            on_control=lambda frame: None,
            on_reconnect=lambda: None,
            task_group=tg,
        )
        try:
            await broker.start(context)
        finally:
            with anyio.CancelScope(shield=True):
                await broker.aclose()
        tg.cancel_scope.cancel()
    async with sink_from_url(settings.sink):
        pass
    if isinstance(settings.presence, str):  # else presence is kept by the broker's server
        presence = presence_from_url(settings.presence)
        async with anyio.create_task_group() as tg:
            try:
                await presence.start(
                    settings.namespace, f"demo-check-{os.getpid()}", ttl=5.0, task_group=tg
                )
            finally:
                with anyio.CancelScope(shield=True):
                    await presence.aclose()
            tg.cancel_scope.cancel()


class _QuietStartupFailure(logging.Filter):
    """Drops uvicorn's error records (a traceback of the lifespan) once the app has recorded
    why it could not start: ``run`` raises that error instead, for one line."""

    def __init__(self, app: object) -> None:
        super().__init__()
        self.app = app

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR or startup_error(self.app) is None


def run(settings: DemoSettings, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve the demo on ``host:port`` until SIGINT or SIGTERM; print where to point a browser.

    Raises :class:`~roomrouter.RoomRouterError` if it cannot start (bad setting, port taken,
    broker or sink unreachable); nothing is printed then."""
    server = server_for(settings)  # first: a bad setting fails before anything is printed
    anyio.run(check_services, settings)
    try:
        sock = bind(host, port)
    except OSError as exc:
        raise ConfigurationError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    port = sock.getsockname()[1]
    url_host = f"[{host}]" if ":" in host else host
    print(
        f"roomrouter demo on http://{url_host}:{port}  (broker {redact(settings.broker)}, "
        f"history in {_where(settings.sink)})\nopen it in two browser tabs; Ctrl-C stops",
        flush=True,
    )
    server.config.host, server.config.port = host, port  # for uvicorn's own startup line
    quiet = _QuietStartupFailure(server.config.app)
    uvicorn_log = logging.getLogger("uvicorn.error")
    uvicorn_log.addFilter(quiet)
    try:
        server.run(sockets=[sock])
    except SystemExit:  # uvicorn's exit(3) when the lifespan failed
        pass
    finally:
        uvicorn_log.removeFilter(quiet)
        sock.close()  # uvicorn closes it only after serving
    if not server.started:  # the services failed between the check and the lifespan
        error = startup_error(server.config.app)
        if error is not None:
            raise error
        raise RoomRouterError("the demo server did not start; uvicorn's log above says why")
