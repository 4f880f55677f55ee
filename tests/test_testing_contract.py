"""The conformance suite's own tests: :class:`roomrouter.testing.BrokerContract` fails a broker
that loses publishes, one that reorders them and one that leaks subscriptions, and passes the
same broker without the fault. Each suite runs as a third party would run it: a test module
of its own in a fresh directory, collected by pytest (``pytester``), with nothing from this
repository's conftest."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

FAULTY_BROKERS = '''
from collections import defaultdict

from roomrouter.brokers import Broker
from roomrouter.brokers.memory import MemoryBroker
from roomrouter.testing import BrokerContract


class Wrapper(Broker):
    """Delegates everything to a memory broker; the subclasses break one guarantee."""

    name = "wrapper"

    def __init__(self, inner):
        self.inner = inner

    async def start(self, context):
        await self.inner.start(context)

    async def aclose(self):
        await self.inner.aclose()

    async def subscribe(self, rooms):
        await self.inner.subscribe(rooms)

    async def unsubscribe(self, rooms):
        await self.inner.unsubscribe(rooms)

    async def publish(self, room, frame, *, to=None):
        await self.inner.publish(room, frame)

    async def publish_control(self, frame, *, to=None):
        return await self.inner.publish_control(frame, to=to)

    async def broker_subscriptions(self):
        return await self.inner.broker_subscriptions()


class Lossy(Wrapper):
    """Drops one publish in ten (accepted, never sent)."""

    calls = 0

    async def publish(self, room, frame, *, to=None):
        self.calls += 1
        if self.calls % 10 == 3:
            return
        await super().publish(room, frame)


class Reordering(Wrapper):
    """Swaps each pair of publishes to one room: holds the first, sends it after the second."""

    def __init__(self, inner):
        super().__init__(inner)
        self.held = {}

    async def publish(self, room, frame, *, to=None):
        if room not in self.held:
            self.held[room] = frame
            return
        first = self.held.pop(room)
        await super().publish(room, frame)
        await super().publish(room, first)


class Leaky(Wrapper):
    """Never unsubscribes at the broker, and says it did."""

    def __init__(self, inner):
        super().__init__(inner)
        self.said = defaultdict(int)

    async def subscribe(self, rooms):
        await super().subscribe(rooms)
        for room in rooms:
            self.said[room] = 1

    async def unsubscribe(self, rooms):
        for room in rooms:
            self.said.pop(room, None)

    async def broker_subscriptions(self):
        return frozenset(self.said)


class Suite(BrokerContract):
    broker_url = "memory://faulty"
    delivery_timeout = 2.0
    fault = Wrapper

    def make_broker(self):
        return self.fault(MemoryBroker("faulty-" + self.fault.__name__))


class TestHonest(Suite):
    fault = Wrapper


class TestLossy(Suite):
    fault = Lossy


class TestReordering(Suite):
    fault = Reordering


class TestLeaky(Suite):
    fault = Leaky
'''

#: Tests each faulty broker must fail (a lossy broker fails others too: any lost frame does).
CAUGHT = {
    "Lossy": [
        "test_broker_subscribe_then_publish_is_delivered",
        "test_broker_keeps_per_publisher_order",
        "test_broker_delivers_once_and_only_subscribed_rooms",
        "test_per_publisher_order_under_concurrency",
        "test_no_leak_and_no_duplicate",
    ],
    "Reordering": [
        "test_broker_keeps_per_publisher_order",
        "test_per_publisher_order_under_concurrency",
    ],
    "Leaky": [
        "test_broker_unsubscribe_stops_delivery",
        "test_last_leave_unsubscribes_at_the_broker",
    ],
}

_SELECTED = sorted({name for names in CAUGHT.values() for name in names})


def _run(pytester: pytest.Pytester, cls: str) -> pytest.RunResult:
    pytester.makepyfile(test_faulty=FAULTY_BROKERS)
    return pytester.runpytest_subprocess(
        "-p",
        "no:cacheprovider",
        "-p",
        "no:randomly",
        "-q",
        "-k",
        f"{cls} and ({' or '.join(_SELECTED)})",
    )


@pytest.mark.parametrize("fault", sorted(CAUGHT))
def test_the_suite_catches_a_faulty_broker(pytester: pytest.Pytester, fault: str) -> None:
    result = _run(pytester, f"Test{fault}")
    failed = {
        line.split("::")[-1].split(" ")[0] for line in result.outlines if line.startswith("FAILED ")
    }
    assert set(CAUGHT[fault]) <= failed, (failed, result.stdout.str()[-3000:])


def test_the_same_wrapper_without_a_fault_passes(pytester: pytest.Pytester) -> None:
    result = _run(pytester, "TestHonest")
    result.assert_outcomes(passed=len(_SELECTED))


def test_the_whole_suite_passes_on_the_honest_wrapper(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_faulty=FAULTY_BROKERS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q", "-k", "TestHonest")
    outcomes = result.parseoutcomes()
    assert outcomes.get("failed", 0) == 0 and outcomes.get("errors", 0) == 0, result.stdout.str()
    assert outcomes["passed"] >= 20, outcomes  # all but the reconnect tests (no hook)


FAULTY_SINKS = '''
from roomrouter.storage import SQLiteSink, Sink
from roomrouter.testing import SinkContract


class Wrapper(Sink):
    name = "wrapper"

    def __init__(self, inner):
        self.inner = inner

    async def start(self):
        await self.inner.start()

    async def aclose(self):
        await self.inner.aclose()

    async def write(self, envelopes):
        return await self.inner.write(envelopes)

    async def history(self, room, *, before=None, after=None, limit=50):
        return await self.inner.history(room, before=before, after=after, limit=limit)

    async def count(self, room=None):
        return await self.inner.count(room)

    async def latest_id(self, room):
        return await self.inner.latest_id(room)


class CountsEveryRow(Wrapper):
    """Says every row of a batch was new, duplicates included."""

    async def write(self, envelopes):
        await self.inner.write(envelopes)
        return len(envelopes)


class Unordered(Wrapper):
    """Returns a page newest first."""

    async def history(self, room, **kwargs):
        return (await super().history(room, **kwargs))[::-1]


class NotAtomic(Wrapper):
    """Writes a batch row by row: a failure leaves the rows before it."""

    async def write(self, envelopes):
        return sum([await self.inner.write([e]) for e in envelopes])


class Suite(SinkContract):
    fault = Wrapper

    def make_sink(self):
        return self.fault(SQLiteSink(self.path))

    sink_url = "sqlite://unused"


import pytest


@pytest.fixture(autouse=True)
def _path(request, tmp_path):
    request.instance.path = tmp_path / "sink.db"


class TestHonest(Suite):
    fault = Wrapper


class TestCountsEveryRow(Suite):
    fault = CountsEveryRow


class TestUnordered(Suite):
    fault = Unordered


class TestNotAtomic(Suite):
    fault = NotAtomic
'''

SINK_CAUGHT = {
    "CountsEveryRow": [
        "test_write_is_idempotent_by_id",
        "test_concurrent_writes_store_each_id_once",
    ],
    "Unordered": [
        "test_history_is_in_id_order_whatever_the_write_order",
        "test_walk_a_room_backwards_and_forwards",
        "test_ids_compare_as_code_points_not_by_locale",
    ],
    "NotAtomic": ["test_a_failing_batch_writes_nothing"],
}


@pytest.mark.parametrize("fault", [*sorted(SINK_CAUGHT), "Honest"])
def test_the_sink_suite_catches_a_faulty_sink(pytester: pytest.Pytester, fault: str) -> None:
    pytester.makepyfile(test_faulty_sinks=FAULTY_SINKS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q", "-k", f"Test{fault}")
    failed = {
        line.split("::")[-1].split(" ")[0] for line in result.outlines if line.startswith("FAILED ")
    }
    if fault == "Honest":
        outcomes = result.parseoutcomes()
        assert failed == set() and outcomes["passed"] >= 30, result.stdout.str()[-3000:]
    else:
        assert set(SINK_CAUGHT[fault]) <= failed, (failed, result.stdout.str()[-3000:])
