"""Prometheus metrics of a router and a storage worker, through a custom collector.

::

    from prometheus_client import REGISTRY
    from roomrouter.integrations.prometheus import RoomRouterCollector

    REGISTRY.register(RoomRouterCollector(router, worker=worker))

The collector reads :meth:`RoomRouter.stats` and :attr:`StorageWorker.stats` at scrape time,
so it costs nothing between scrapes and never drifts from them. Monotonic counters become
Prometheus counters ``roomrouter_<stat>_total`` (``roomrouter_worker_<stat>_total`` for the
worker); levels (:data:`GAUGES`: members, rooms, live nodes) become gauges. Every sample has a
``node`` label (the router's node id; a worker without a router is labelled with its name), so
the nodes of one cluster scraped into one Prometheus stay apart.

Needs the ``roomrouter[prometheus]`` extra; importing this module without it raises
:class:`~roomrouter.MissingDependency`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

from .._errors import MissingDependency
from .._router import RoomRouter
from ..storage.worker import StorageWorker

try:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
    from prometheus_client.registry import Collector
except ImportError as exc:  # pragma: no cover - exercised by a subprocess test
    raise MissingDependency("prometheus", "prometheus_client") from exc

__all__ = ["GAUGES", "RoomRouterCollector"]

#: Stats of :meth:`RoomRouter.stats` that are levels (they go down as well as up): gauges.
#: Every other stat, and every field of ``WorkerStats``, only ever grows: counters.
GAUGES = frozenset({"members", "local_rooms", "subscribed_rooms", "live_nodes"})


def _current(source: object) -> object:
    return source() if callable(source) else source


class RoomRouterCollector(Collector):
    """Collects ``router`` (and ``worker``, if given) at every scrape.

    Either may be given as a zero-argument function returning the current object or ``None``
    (then its metrics are left out of that scrape), so the collector can be registered once
    at import time for a router that starts later, or for a worker that is restarted.
    """

    def __init__(
        self,
        router: RoomRouter | Callable[[], RoomRouter | None] | None,
        *,
        worker: StorageWorker | Callable[[], StorageWorker | None] | None = None,
    ) -> None:
        self._router = router
        self._worker = worker

    def collect(self) -> Iterator[Metric]:
        router = _current(self._router)
        worker = _current(self._worker)
        node: str | None = None
        if isinstance(router, RoomRouter):
            node = router.node_id
            for stat, value in sorted(router.stats().items()):
                yield _family(f"roomrouter_{stat}", stat in GAUGES, f"router stat {stat}", node,
                              value)  # fmt: skip
        if isinstance(worker, StorageWorker):
            label = node if node is not None else worker.name
            for stat, value in sorted(dataclasses.asdict(worker.stats).items()):
                yield _family(f"roomrouter_worker_{stat}", False, f"storage worker stat {stat}",
                              label, value)  # fmt: skip

    def describe(self) -> Iterator[Metric]:
        # Names depend on the router's stats, which are read only at scrape time: describing
        # nothing tells the registry not to call collect() at registration (the router may not
        # be running yet) and not to check these names against other collectors'.
        return iter(())


def _family(name: str, gauge: bool, documentation: str, node: str, value: int) -> Metric:
    family: CounterMetricFamily | GaugeMetricFamily
    if gauge:
        family = GaugeMetricFamily(name, documentation, labels=["node"])
    else:
        # prometheus_client appends `_total` to a counter's sample name.
        family = CounterMetricFamily(name, documentation, labels=["node"])
    family.add_metric([node], value)
    return family
