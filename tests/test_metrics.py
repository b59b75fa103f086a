"""Prometheus metrics: the exposition format checked by prometheus-client's own parser, and a headless agent's
``--metrics-port`` scraped over HTTP while it serves requests. The dashboard's ``/metrics`` is in test_dashboard."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import urllib.request
from collections import Counter

import pytest
from prometheus_client.parser import text_string_to_metric_families

from edgecoop.errors import ConfigError
from edgecoop.metrics import Metrics, numbers
from edgecoop.settings import resolve_metrics


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_counters_and_gauges_are_exported_with_their_types():
    counts: Counter[str] = Counter(served=3, rejected_client_rate=1)
    m = Metrics()
    m.add("agent", "cam-1", counters=lambda: counts, gauges=lambda: {"inflight": 2, "nested": {"peak": 5}, "on": True})
    m.add("agent", "cam-2", counters=lambda: {"served": 7, "note": "text is left out"})
    families = {f.name: f for f in text_string_to_metric_families(m.exposition().decode())}
    assert families["edgecoop_agent_served"].type == "counter"
    assert families["edgecoop_agent_inflight"].type == "gauge"
    got = samples(m.exposition().decode())
    assert got[("edgecoop_agent_served_total", (("id", "cam-1"),))] == 3
    assert got[("edgecoop_agent_served_total", (("id", "cam-2"),))] == 7, "one family, a sample per component"
    assert got[("edgecoop_agent_nested_peak", (("id", "cam-1"),))] == 5
    assert not any("note" in name or "_on" in name for name, _ in got)
    counts["served"] += 1
    counts["timeouts"] += 1  # a new counter appears without touching the exporter
    got = samples(m.exposition().decode())
    assert got[("edgecoop_agent_served_total", (("id", "cam-1"),))] == 4
    assert got[("edgecoop_agent_timeouts_total", (("id", "cam-1"),))] == 1
    m.remove("cam-2")
    assert ("edgecoop_agent_served_total", (("id", "cam-2"),)) not in samples(m.exposition().decode())


def test_a_counter_that_grows_on_another_thread_is_read_without_error():
    grow: dict[str, int] = {}
    stop = threading.Event()

    def writer() -> None:
        i = 0
        while not stop.is_set():
            grow[f"k{i % 5000}"] = i
            i += 1
            if i % 5000 == 0:
                grow.clear()

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    try:
        for _ in range(200):
            assert all(isinstance(v, float) for v in numbers(grow).values())
    finally:
        stop.set()
        t.join()


def test_metrics_port_comes_from_the_flag_or_the_environment():
    assert resolve_metrics(None, env={}) is None
    assert resolve_metrics(9100, env={}) == ("127.0.0.1", 9100)
    assert resolve_metrics(None, env={"EDGECOOP_METRICS_PORT": "9200", "EDGECOOP_METRICS_HOST": "0.0.0.0"}) == (  # noqa: S104
        "0.0.0.0",  # noqa: S104
        9200,
    )
    with pytest.raises(ConfigError, match="EDGECOOP_METRICS_PORT"):
        resolve_metrics(None, env={"EDGECOOP_METRICS_PORT": "ninety"})
    with pytest.raises(ConfigError, match=r"0\.\.65535"):
        resolve_metrics(70000, env={})


async def scrape(url: str) -> str:
    def get() -> str:
        with urllib.request.urlopen(url, timeout=5) as r:  # noqa: S310 (our own loopback endpoint)
            assert r.headers["Content-Type"].startswith("text/plain; version=")
            return str(r.read().decode())

    return await asyncio.to_thread(get)


@pytest.mark.timeout(60)
async def test_headless_agent_serves_its_counters_on_metrics_port(settings, topics, tmp_path, client):
    conf = tmp_path / "echo.toml"
    conf.write_text(f'[agent]\nid = "echo-metrics"\n[broker]\nprefix = "{topics.prefix}"\n'
                    '[[capabilities]]\nname = "echo"\nkind = "echo"\n')  # fmt: skip
    env = {**os.environ, "EDGECOOP_METRICS_PORT": "", "EDGECOOP_METRICS_HOST": ""}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "edgecoop.cli", "agent", str(conf), "--broker", settings.url, "--metrics-port", "0",
        stdout=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        url = ""
        async with asyncio.timeout(30):
            while not url:
                line = (await proc.stdout.readline()).decode()
                assert line, "the agent exited before serving metrics"
                if line.startswith("metrics on "):
                    url = line.split()[-1]
        key = (("id", "echo-metrics"),)
        before = samples(await scrape(url))
        assert before[("edgecoop_agent_births_total", key)] == 1
        assert before[("edgecoop_mqtt_connects_total", (("component", "agent"), ("id", "echo-metrics")))] == 1
        assert before[("edgecoop_mqtt_connected", (("component", "agent"), ("id", "echo-metrics")))] == 1
        assert before.get(("edgecoop_agent_served_total", key), 0) == 0
        for i in range(3):
            await client.req.request("echo-metrics", "echo", {"i": i}, timeout=10)
        after = samples(await scrape(url))
        assert after[("edgecoop_agent_served_total", key)] == 3
        assert after[("edgecoop_agent_inflight", key)] == 0
    finally:
        proc.terminate()
        await proc.wait()


async def test_orchestrator_registers_its_counters_requester_mirror_and_connection(settings, topics, make_agent):
    from edgecoop.orchestrator import Orchestrator
    from edgecoop.orchestrator.metrics import register_orchestrator

    async with make_agent("echo-m"), Orchestrator(settings, topics=topics, orchestrator_id="orch-m") as orch:
        await orch.mirror.wait_for(lambda s: s.count(online=True) == 1, timeout=10)
        m = Metrics()
        register_orchestrator(m, orch)
        r = await orch.submit("Is it raining on Mars?", timeout=10)
        got = samples(m.exposition().decode())
    me = (("id", "orch-m"),)
    assert got[(f"edgecoop_orchestrator_{r['state']}_total", me)] == 1, "the task's outcome is counted"
    assert got[(f"edgecoop_orchestrator_tier_{r['tier']}_total", me)] == 1
    assert ("edgecoop_requester_resent_total", me) in got and ("edgecoop_requester_late_replies_total", me) in got
    assert got[("edgecoop_orchestrator_requests_outstanding", me)] == 0
    assert any(name.startswith("edgecoop_orchestrator_admission_") for name, _ in got), "admission gauges"
    assert got[("edgecoop_cms_store_applied_total", (("id", "orch-m-cms"),))] >= 2, "the agent's card and status"
    assert got[("edgecoop_mqtt_connects_total", (("component", "orchestrator"), *me))] == 1
