"""Capability cards, status with epochs, deregistration and the CMS mirror, over a real Mosquitto."""

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edgecoop.cms import DiscoveryQuery
from edgecoop.cms.mirror import CmsMirror
from edgecoop.connection import Connection
from edgecoop.messages import CapabilityCard, Status
from edgecoop.wire import encode


async def test_card_appears_in_the_mirror_with_all_fields(make_agent, settings, topics):
    agent = make_agent(
        "cam-01", site="district-1", description="Traffic camera at the central station",
        domains=["traffic"], privacy="site", location={"name": "Central Station", "lat": 52.5, "lon": 13.4},
    )  # fmt: skip
    async with CmsMirror(settings, topics=topics) as mirror, agent:
        await mirror.wait_for(lambda s: s.status("cam-01") == (True, agent.epoch))
        card = await mirror.query(lambda s: s.card("cam-01"))
    assert isinstance(card, CapabilityCard)
    assert card.site == "district-1" and card.privacy == "site"
    assert card.location.name == "Central Station"
    assert card.hardware.cores >= 1 and card.hardware.ram_mb > 0
    assert [c.kind for c in card.capabilities] == ["echo"]
    assert card.epoch == agent.epoch


async def test_clean_exit_marks_offline_and_keeps_the_card(make_agent, settings, topics):
    async with CmsMirror(settings, topics=topics) as mirror:
        async with make_agent("a1") as agent:
            await mirror.wait_for(lambda s: s.status("a1") == (True, agent.epoch))
        await mirror.wait_for(lambda s: s.status("a1") == (False, agent.epoch))
        assert await mirror.query(lambda s: s.card("a1")) is not None
        assert await mirror.discover(DiscoveryQuery()) == []  # offline agents are not offered
        assert [m.agent_id for m in await mirror.discover(DiscoveryQuery(online_only=False))] == ["a1"]


async def test_stale_offline_never_overrides_a_newer_online(make_agent, settings, topics):
    async with CmsMirror(settings, topics=topics) as mirror, make_agent("a1") as agent:
        await mirror.wait_for(lambda s: s.status("a1") == (True, agent.epoch))
        # a will from an older connection arrives late
        stale = encode(Status("a1", False, agent.epoch - 1).to_dict())
        await agent.conn.publish(topics.status("a1"), stale, retain=True)
        await mirror.sync()
        assert await mirror.query(lambda s: s.status("a1")) == (True, agent.epoch)
        assert mirror.counters["fenced"] >= 1


async def test_deregistration_removes_card_and_status(make_agent, settings, topics):
    async with CmsMirror(settings, topics=topics) as mirror, make_agent("gone") as agent:
        await mirror.wait_for(lambda s: s.card("gone") is not None)
        await agent.deregister()
        await mirror.wait_for(lambda s: s.card("gone") is None and s.status("gone") is None)
    # and a late joiner sees nothing of it either
    async with CmsMirror(settings, topics=topics) as late:
        await late.sync()
        assert await late.snapshot() == {}


async def test_late_joiner_gets_the_full_view(make_agent, settings, topics):
    agents = [make_agent(f"ag-{i:02d}", site=f"s{i % 3}") for i in range(20)]
    for a in agents:
        await a.__aenter__()
    try:
        async with CmsMirror(settings, topics=topics) as live:
            await live.wait_for(lambda s: s.count(online=True) == 20)
            async with CmsMirror(settings, topics=topics) as late:
                await late.sync()
                late_view, live_view = await late.snapshot(), await live.snapshot()
        assert set(late_view) == {a.agent_id for a in agents}
        strip = lambda v: {k: {f: x for f, x in c.items() if f not in ("load", "ts")} for k, c in v.items()}  # noqa: E731
        assert strip(late_view) == strip(live_view)
    finally:
        for a in agents:
            await a.__aexit__(None, None, None)


@pytest.mark.allow_error_logs
async def test_card_whose_agent_id_differs_from_topic_is_rejected_and_counted(settings, topics):
    async with CmsMirror(settings, topics=topics) as mirror, Connection(settings, "intruder") as conn:
        forged = CapabilityCard(agent_id="victim", epoch=1).to_dict()
        await conn.publish(topics.card("intruder"), encode(forged), retain=True)
        await conn.publish(topics.card("junk"), b"\xc1not msgpack", retain=True)
        await conn.publish(topics.card("junk2"), encode({"agent_id": "junk2"}), retain=True)  # missing epoch
        await mirror.sync()
        assert await mirror.snapshot() == {}
        assert mirror.counters["rejected_mismatch"] == 1
        assert mirror.counters["bad_payload"] == 2
        for a in ("intruder", "junk", "junk2"):
            await conn.publish(topics.card(a), b"", retain=True)


async def test_discovery_ranks_need_against_card_text(make_agent, settings, topics):
    specs = {
        "cam-station": "Traffic camera counting vehicles and pedestrians near the central station",
        "air-park": "Air quality station measuring PM2.5 and NO2 in the city park",
        "kb-city": "City knowledge base: traffic regulations, bus rerouting procedures",
    }
    agents = [make_agent(a, description=d) for a, d in specs.items()]
    for a in agents:
        await a.__aenter__()
    try:
        async with CmsMirror(settings, topics=topics) as mirror:
            await mirror.wait_for(lambda s: s.count(online=True) == 3)
            best = await mirror.discover(DiscoveryQuery(need="count vehicles near the station"))
            assert best[0].agent_id == "cam-station"
            best = await mirror.discover(DiscoveryQuery(need="is the PM2.5 air pollution too high?"))
            assert best[0].agent_id == "air-park"
            best = await mirror.discover(DiscoveryQuery(need="rules for rerouting buses"))
            assert best[0].agent_id == "kb-city"
            none = await mirror.discover(DiscoveryQuery(need="x"))  # no usable terms: filters only
            assert len(none) == 3
            # the need ranks but never filters: no shared word still leaves every candidate, ranked ones first
            ranked = await mirror.discover(DiscoveryQuery(need="zebra crossing camera"))
            assert ranked[0].agent_id == "cam-station" and len(ranked) == 3
    finally:
        for a in agents:
            await a.__aexit__(None, None, None)


async def test_load_is_republished_at_a_bounded_rate(make_agent, settings, topics, client):
    agent = make_agent("busy", load_interval_s=0.2, capabilities=[{"kind": "echo", "max_concurrency": 1}])
    async with CmsMirror(settings, topics=topics) as mirror, agent:
        await mirror.wait_for(lambda s: s.card("busy") is not None)
        calls = [client.req.request("busy", "echo", {"delay_s": 0.3}, timeout=10) for _ in range(4)]
        gathered = asyncio.gather(*calls)
        await mirror.wait_for(lambda s: s.card("busy").load.queue >= 1, timeout=5)
        await gathered
        await mirror.wait_for(lambda s: s.card("busy").load.queue == 0 and not s.card("busy").load.busy)
    # 8 load changes, at most one card per 0.2 s during ~1.2 s of work
    assert agent.counters["load_updates"] <= 9


AGENT_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    from edgecoop.agents import Agent
    from edgecoop.agents.config import config_from_dict
    from edgecoop.connection import BrokerSettings
    cfg = config_from_dict({"agent": {"id": "victim"}, "capabilities": [{"kind": "echo"}]},
                           broker=BrokerSettings(port=int(sys.argv[1]), keepalive=2), prefix=sys.argv[2])
    async def main():
        async with Agent(cfg) as a:
            print(a.epoch, flush=True)
            await a.serve_forever()
    asyncio.run(main())
    """
)


async def test_killed_agent_is_marked_offline_by_its_last_will(settings, topics):
    proc = subprocess.Popen(
        [sys.executable, "-c", AGENT_SCRIPT, str(settings.port), topics.prefix], stdout=subprocess.PIPE, text=True
    )
    try:
        epoch = int(await asyncio.to_thread(proc.stdout.readline))
        async with CmsMirror(settings, topics=topics) as mirror:
            await mirror.wait_for(lambda s: s.status("victim") == (True, epoch))
            os.kill(proc.pid, signal.SIGKILL)
            start = time.monotonic()
            # SIGKILL closes the socket: the broker sends the will at once
            await mirror.wait_for(lambda s: s.status("victim") == (False, epoch), timeout=15)
            assert time.monotonic() - start < 15
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def test_mosquitto_sub_shows_cards(broker):
    """What the README promises: mosquitto_sub on the card filter shows retained cards."""
    c = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    c.connect("127.0.0.1", broker.port)
    c.loop_start()
    card = CapabilityCard(agent_id="shown", epoch=1)
    c.publish("readme/v1/agents/shown/card", encode(card.to_dict()), qos=1, retain=True).wait_for_publish(5)
    out = subprocess.run(
        ["mosquitto_sub", "-V", "5", "-p", str(broker.port), "-t", "readme/v1/agents/+/card", "-v", "-C", "1", "-W", "5"],
        capture_output=True, timeout=10, check=True,
    )  # fmt: skip
    assert out.stdout.startswith(b"readme/v1/agents/shown/card ")
    c.publish("readme/v1/agents/shown/card", b"", qos=1, retain=True).wait_for_publish(5)
    c.loop_stop()
    c.disconnect()
