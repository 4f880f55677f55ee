"""The conformance suites a backend runs: :class:`BrokerContract` for a broker,
:class:`SinkContract` for a persistence sink (docs/backends.md).

Subclass one in a test module, under a name pytest collects, and set its URL::

    from roomrouter.testing import BrokerContract, SinkContract

    class TestMyBroker(BrokerContract):
        broker_url = "mybroker://127.0.0.1:1234"

    class TestMySink(SinkContract):
        sink_url = "mysink:///tmp/contract.db"

The tests run on anyio's pytest plugin; they need pytest and anyio only. roomrouter's own
backends pass through the same classes (tests/test_contract.py, tests/storage/).
"""

import pytest

# The suites' asserts explain themselves when they fail (pytest rewrites them, as in a test
# module); registered before the modules are imported.
pytest.register_assert_rewrite(
    "roomrouter.testing._broker_tests",
    "roomrouter.testing._router_tests",
    "roomrouter.testing._hooks",
    "roomrouter.testing.sink",
)

from ._hooks import BrokerHooks  # noqa: E402
from ._support import Node, Recorder, drain, eventually, numbered_frame, receive_n, seq_of  # noqa: E402
from .broker import BrokerContract  # noqa: E402
from .sink import SinkContract  # noqa: E402

__all__ = [
    "BrokerContract",
    "BrokerHooks",
    "Node",
    "Recorder",
    "SinkContract",
    "drain",
    "eventually",
    "numbered_frame",
    "receive_n",
    "seq_of",
]
