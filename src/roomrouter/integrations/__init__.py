"""Integrations of roomrouter with application frameworks.

Each integration is a submodule that imports its framework only when it is imported itself, so
``import roomrouter`` never pulls a framework in: ``roomrouter.integrations.socketio`` needs the
``socketio`` extra (``pip install "roomrouter[socketio]"``).
"""

__all__: list[str] = []
