"""Integrations with other libraries and frameworks.

Each submodule imports its library only when it is imported itself, and raises
:class:`~roomrouter.MissingDependency` (with the ``pip install`` line) when it is missing, so
``import roomrouter`` never pulls any of them in: ``roomrouter.integrations.socketio`` needs the
``socketio`` extra, ``roomrouter.integrations.prometheus`` the ``prometheus`` extra.
"""

__all__: list[str] = []
