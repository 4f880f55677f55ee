"""The demo chat server behind ``roomrouter demo``: a Starlette app with one
:class:`~roomrouter.Member` per WebSocket, a static page, history and recovery.

It lives in the package (not only in ``examples/``) so that the command works from an
installed package (examples/chat/README.md, "Why it ships in the wheel"); nothing but the
command imports it. It needs the ``roomrouter[demo]`` extra (Starlette, uvicorn, websockets,
prometheus_client for ``/metrics``).
"""

from __future__ import annotations

from .app import DemoSettings, create_app
from .server import bind, run, server_for

__all__ = ["DemoSettings", "bind", "create_app", "run", "server_for"]
