"""Integrations with other libraries. Each submodule imports its library on import and raises
:class:`~roomrouter.MissingDependency` (with the ``pip install`` line) when it is missing, so
``import roomrouter`` never pulls any of them in."""

__all__: list[str] = []
