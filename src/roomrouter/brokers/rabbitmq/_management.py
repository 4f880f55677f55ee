"""The RabbitMQ management HTTP API, through aiohttp: the bindings of a node's queue read back
(``broker_subscriptions``, ``roomrouter inspect``) and the storage queue's unacknowledged count
(``pending``). AMQP 0-9-1 has no method for either."""

from __future__ import annotations

import base64
import json
from typing import Any

import aiohttp

from ..._errors import BrokerUnavailable, describe
from ..._urls import redact

__all__ = ["request_json"]


async def request_json(method: str, url: str, user: str, password: str) -> Any:
    """One request returning the decoded JSON answer (``None`` for an empty one). A session per
    request: these are rare, and a broker that is never started holds nothing to close. Basic
    auth by header (``aiohttp.BasicAuth`` is deprecated from aiohttp 3.14 on). The caller
    bounds the time."""
    credentials = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
    headers = {"Accept": "application/json", "Authorization": f"Basic {credentials}"}
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.request(method, url, headers=headers) as response,
        ):
            if response.status // 100 != 2:
                raise BrokerUnavailable(
                    f"RabbitMQ management API at {redact(url)}: HTTP {response.status} "
                    f"{response.reason or ''}".rstrip()
                )
            body = await response.read()
    except (aiohttp.ClientError, OSError) as exc:
        raise BrokerUnavailable(
            f"RabbitMQ management API at {redact(url)} failed: {describe(exc)}"
        ) from exc
    if not body:
        return None
    try:
        return json.loads(body)
    except ValueError as exc:
        raise BrokerUnavailable(f"RabbitMQ management API sent bad JSON for {redact(url)}") from exc
