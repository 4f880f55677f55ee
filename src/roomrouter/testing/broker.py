"""``BrokerContract``: the conformance suite of a broker backend.

Subclass it in a test module under a name pytest collects (``Test...``) and set
:attr:`~BrokerContract.broker_url`::

    from roomrouter.testing import BrokerContract

    class TestEchoBroker(BrokerContract):
        broker_url = "echo://local"

pytest then runs every test of the suite against brokers built from that URL (through the
entry-point registry), on anyio's pytest plugin: nothing but pytest and anyio is needed. The
hooks (:class:`BrokerHooks`) adapt it: ``available`` (skip when the server is down),
``cleanup``, ``break_connection`` (the reconnect tests), ``check_subscriptions``.

What it checks, by the guarantees of :mod:`roomrouter.brokers` (docs/backends.md): a
subscription holds when ``subscribe`` returns (1), exact filtering, no leak, no duplicate and
``unsubscribe`` stops delivery (2), per-publisher order of data and control frames (3),
recovery after a cut connection (5), room names taken literally, any bytes carried
unchanged; and end to end through routers: join-then-publish across nodes, dynamic
subscription read back from the broker (``broker_subscriptions``), bypass, garbage frames.
"""

from __future__ import annotations

import pytest

from ._broker_tests import BrokerTests
from ._hooks import BrokerHooks
from ._router_tests import RouterTests

__all__ = ["BrokerContract", "BrokerHooks"]


@pytest.mark.anyio
class BrokerContract(BrokerTests, RouterTests):
    """The broker conformance suite; see the module docstring."""
