"""roomrouter.integrations.prometheus: the collector on a running router and worker, and the
error when prometheus_client is missing. (The demo's /metrics is scraped over HTTP in
tests/test_demo.py.)"""

from __future__ import annotations

import subprocess
import sys
import uuid

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from roomrouter import RoomRouter
from roomrouter.integrations.prometheus import GAUGES, RoomRouterCollector
from roomrouter.storage import StorageWorker

pytestmark = pytest.mark.anyio


async def test_counters_and_gauges_follow_the_router_and_worker() -> None:
    url = f"memory://prom-{uuid.uuid4().hex[:8]}"
    # As prometheus_client's global REGISTRY: it asks collectors to describe themselves at
    # registration, before the router exists here.
    registry = CollectorRegistry(auto_describe=True)
    current: list[RoomRouter] = []
    worker = StorageWorker.from_urls(url, "prom", "sqlite:///:memory:", name="w1")
    registry.register(RoomRouterCollector(lambda: current[0] if current else None, worker=worker))
    # Before the router exists: only the worker, labelled with its name.
    families = {
        f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())
    }
    assert "roomrouter_published" not in families
    assert families["roomrouter_worker_acked"].samples[0].labels == {"node": "w1"}

    async with RoomRouter.from_url(url, namespace="prom", linger=0.0) as router:
        current.append(router)
        member = router.member()
        await member.join("room")
        await router.publish("room", b"x", persist=True)
        text = generate_latest(registry).decode()
        families = {f.name: f for f in text_string_to_metric_families(text)}
        for stat, value in router.stats().items():
            family = families[f"roomrouter_{stat}"]
            assert family.type == ("gauge" if stat in GAUGES else "counter"), stat
            (sample,) = family.samples
            suffix = "" if stat in GAUGES else "_total"
            assert sample.name == f"roomrouter_{stat}{suffix}"
            assert (sample.labels, sample.value) == ({"node": router.node_id}, value)
        assert families["roomrouter_members"].samples[0].value == 1
        assert families["roomrouter_published"].samples[0].value == 1
        assert families["roomrouter_worker_acked"].samples[0].labels == {"node": router.node_id}
        # A stalled worker (issue 19) is visible to alerting, not only in its log.
        assert families["roomrouter_worker_stalls"].type == "counter"
        await member.close()
        families = {
            f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())
        }
        assert families["roomrouter_members"].samples[0].value == 0  # a gauge goes down


def test_without_prometheus_client_the_error_names_the_extra() -> None:
    code = (
        "import sys; sys.modules['prometheus_client'] = None\n"
        "try:\n    import roomrouter.integrations.prometheus\n"
        "except Exception as exc:\n    print(type(exc).__name__, exc)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.startswith("MissingDependency"), result
    assert 'pip install "roomrouter[prometheus]"' in result.stdout
