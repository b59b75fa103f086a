"""Home Assistant MQTT discovery: configs built from the card, published retained over the real broker."""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import Mapping
from typing import Any, ClassVar

import pytest

from edgecoop.agents import register_handler
from edgecoop.agents.handlers.base import AgentContext, CallContext, Handler
from edgecoop.agents.hass import (
    discovery_messages,
    ha_state_payload,
    ha_status_payload,
    node_id,
    publish_ha_reading,
    removal_messages,
)
from edgecoop.connection import Connection
from edgecoop.errors import TopicError
from edgecoop.messages import CapabilityCard, Hardware, Location, Reading, SensorInfo, Status
from edgecoop.topics import Kind, ParsedTopic, Topics

HA_ID = re.compile(r"^[A-Za-z0-9_-]+$")
SENSORS = (
    SensorInfo("pm25", "pm25", "µg/m³", 1.0),
    SensorInfo("temp", "temperature", "°C", 0.0),
    SensorInfo("Bahnhof.Süd", "noise", "dB(A)", 0.01),
)


def card(agent_id: str = "air-07", sensors: tuple[SensorInfo, ...] = SENSORS) -> CapabilityCard:
    return CapabilityCard(
        agent_id=agent_id,
        epoch=42,
        location=Location("Market Square"),
        hardware=Hardware(cpu="Raspberry Pi 4 Model B Rev 1.5"),
        sensors=sensors,
    )


def configs(messages: list[tuple[str, bytes]]) -> dict[str, dict[str, Any]]:
    return {topic: json.loads(payload) for topic, payload in messages}


# -- building ------------------------------------------------------------------------------------------------
def test_topics_mirror_build_and_parse():
    t = Topics("edgecoop/v1")
    assert t.ha_state("air-07", "pm25") == "edgecoop/v1/agents/air-07/ha/pm25"
    assert t.ha_status("air-07") == "edgecoop/v1/agents/air-07/ha/status"
    assert t.parse(t.ha_state("air-07", "pm25")) == ParsedTopic(Kind.HA_STATE, "air-07", "pm25")
    assert t.parse(t.ha_status("air-07")) == ParsedTopic(Kind.HA_STATUS, "air-07")
    with pytest.raises(TopicError, match="reserved"):
        t.ha_state("air-07", "status")
    with pytest.raises(TopicError):
        t.ha_state("air/07", "pm25")


def test_node_ids_are_safe_and_unique():
    t = Topics("edgecoop/v1")
    assert node_id(t, "cam-01") == "edgecoop_v1_cam-01"
    ids = {node_id(t, a) for a in ["a.b", "a_b", "a b", "Bahnhof-Süd", "Bahnhof-Sud"]}
    assert len(ids) == 5 and all(HA_ID.match(i) for i in ids)
    assert node_id(Topics("site1/v1"), "cam-01") != node_id(t, "cam-01")


def test_discovery_configs_from_the_card():
    t = Topics("edgecoop/v1")
    messages = discovery_messages(card(), t)
    node = "edgecoop_v1_air-07"
    assert [topic for topic, _ in messages] == [f"homeassistant/device/{node}/config"], "one device config per agent"
    doc = json.loads(messages[0][1])
    assert set(doc) == {"device", "origin", "components"}
    assert doc["device"] == {
        "identifiers": [node],
        "name": "air-07",
        "manufacturer": "edgecoop",
        "model": "Raspberry Pi 4 Model B Rev 1.5",
        "sw_version": doc["device"]["sw_version"],
        "suggested_area": "Market Square",
    }
    assert doc["origin"]["name"] == "edgecoop"
    out = doc["components"]
    odd = next(key for key in out if "Bahnhof" in key)
    assert set(out) == {"pm25", "temp", odd, "status"}
    assert all(HA_ID.match(key) for key in out), out

    pm25 = out["pm25"]
    assert pm25["platform"] == "sensor" and pm25["name"] == "pm25"
    assert pm25["unique_id"] == f"{node}_pm25"
    assert pm25["state_topic"] == "edgecoop/v1/agents/air-07/ha/pm25"
    assert pm25["value_template"] == "{{ value_json.value }}"
    assert pm25["unit_of_measurement"] == "µg/m³" and pm25["device_class"] == "pm25"
    assert pm25["state_class"] == "measurement"
    assert pm25["availability_topic"] == "edgecoop/v1/agents/air-07/ha/status"
    assert pm25["availability_template"] == "{{ value_json.state }}"
    assert (pm25["payload_available"], pm25["payload_not_available"]) == ("online", "offline")
    assert pm25["expire_after"] == 60
    temp = out["temp"]
    assert temp["device_class"] == "temperature" and "expire_after" not in temp
    assert "device_class" not in out[odd], "a unit Home Assistant does not accept for the class: no device class"
    assert out[odd]["expire_after"] == 1000 and out[odd]["state_topic"].endswith("/ha/Bahnhof.Süd")

    conn = out["status"]
    assert conn["platform"] == "binary_sensor" and conn["device_class"] == "connectivity"
    assert conn["state_topic"] == pm25["availability_topic"] and "availability_topic" not in conn
    assert (conn["payload_on"], conn["payload_off"]) == ("online", "offline")
    assert len({c["unique_id"] for c in out.values()}) == len(out)


def test_sensor_named_status_is_not_exposed(caplog):
    ((_, payload),) = discovery_messages(card(sensors=(SensorInfo("status", "misc"),)), Topics())
    components = json.loads(payload)["components"]
    assert {k: c["platform"] for k, c in components.items()} == {"status": "binary_sensor"}
    assert "clashes" in caplog.text


def test_mirror_payloads_are_json():
    reading = Reading("air-07", "pm25", 14.5, "µg/m³", ts=1700000000.0)
    assert json.loads(ha_state_payload(reading)) == {
        "value": 14.5,
        "unit": "µg/m³",
        "ts": 1700000000.0,
        "agent_id": "air-07",
        "sensor": "pm25",
    }
    assert json.loads(ha_status_payload(Status("air-07", False, 7, 1.0)))["state"] == "offline"


# -- over the real broker ---------------------------------------------------------------------------------------
class FakeSensorHandler(Handler):
    """A sensor handler stand-in: declares sensors on the card and mirrors one reading for Home Assistant."""

    kind: ClassVar[str] = "test_ha_sensor"
    cooperation: ClassVar[str] = "data"

    def sensors(self) -> list[SensorInfo]:
        return [SensorInfo("pm25", "pm25", "µg/m³", 1.0), SensorInfo("temp", "temperature", "°C", 0.5)]

    async def handle(self, request_input: Mapping[str, Any], call: CallContext) -> Mapping[str, Any]:
        return {}

    async def run(self, ctx: AgentContext) -> None:
        self.ctx = ctx


register_handler(FakeSensorHandler.kind, FakeSensorHandler)


class Watcher:
    """A subscriber that records (retain flag, payload) per topic."""

    def __init__(self, settings, filters: list[str]) -> None:
        self.seen: dict[str, tuple[bool, bytes]] = {}
        self.changed = asyncio.Event()
        self.conn = Connection(
            settings,
            f"ha-{uuid.uuid4().hex[:8]}",
            subscriptions=[(f, 1) for f in filters],
            handler=self._on,
            clean_start=True,
        )

    async def __aenter__(self) -> Watcher:
        await self.conn.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.conn.__aexit__(*exc)

    def _on(self, message) -> None:
        self.seen[str(message.topic)] = (bool(message.retain), bytes(message.payload))
        self.changed.set()

    async def wait(self, predicate, timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate(self.seen):
                self.changed.clear()
                await self.changed.wait()


async def test_agent_publishes_retained_discovery_and_the_json_mirror(make_agent, settings, topics):
    node = node_id(topics, "air-ha")
    device_topic = f"homeassistant/device/{node}/config"
    filters = [f"homeassistant/+/{node}/#", f"{topics.prefix}/agents/air-ha/ha/#"]
    caps = [{"kind": "test_ha_sensor", "name": "air"}]
    # subscribe after the agent is up: what arrives then can only be retained
    async with (
        make_agent("air-ha", home_assistant=True, capabilities=caps, location={"name": "Market"}) as agent,
        Watcher(settings, filters) as watcher,
    ):
        expected = {device_topic, topics.ha_status("air-ha")}
        await watcher.wait(lambda seen: expected <= set(seen))
        assert all(watcher.seen[t][0] for t in expected), "discovery configs and the status mirror are retained"
        status = json.loads(watcher.seen[topics.ha_status("air-ha")][1])
        assert status == {"state": "online", "epoch": agent.epoch, "ts": status["ts"], "agent_id": "air-ha"}
        config = json.loads(watcher.seen[device_topic][1])
        assert set(config["components"]) == {"pm25", "temp", "status"}
        pm25 = config["components"]["pm25"]
        assert pm25["state_topic"] == topics.ha_state("air-ha", "pm25")
        assert pm25["availability_topic"] == topics.ha_status("air-ha")
        assert pm25["unit_of_measurement"] == "µg/m³" and config["device"]["suggested_area"] == "Market"
        assert config["device"]["identifiers"] == [node]

        # the sensor handler's integration point: mirror a reading as JSON
        handler = agent.handlers["air"]
        await publish_ha_reading(handler.ctx.conn, topics, Reading("air-ha", "pm25", 14.5, "µg/m³", ts=123.0))
        await watcher.wait(lambda seen: topics.ha_state("air-ha", "pm25") in seen)
        retained, payload = watcher.seen[topics.ha_state("air-ha", "pm25")]
        assert not retained and json.loads(payload)["value"] == 14.5  # what value_template reads

    # clean exit: Home Assistant sees the agent go offline
    async with Watcher(settings, filters) as watcher:
        await watcher.wait(lambda seen: topics.ha_status("air-ha") in seen)
        assert json.loads(watcher.seen[topics.ha_status("air-ha")][1])["state"] == "offline"

    # deregistration removes the entities (empty retained configs)
    async with make_agent("air-ha", home_assistant=True, capabilities=caps) as agent:
        await agent.deregister()
    async with Watcher(settings, filters) as watcher:
        probe = f"{topics.prefix}/agents/air-ha/ha/probe"
        await watcher.conn.publish(probe, b"{}", qos=1)  # retained state arrives before this live message
        await watcher.wait(lambda seen: probe in seen)
        assert set(watcher.seen) == {probe}, f"left behind: {sorted(set(watcher.seen) - {probe})}"


async def test_home_assistant_is_opt_in(make_agent, settings, topics):
    node = node_id(topics, "plain")
    async with (
        make_agent("plain", capabilities=[{"kind": "test_ha_sensor", "name": "air"}]),
        Watcher(settings, [f"homeassistant/+/{node}/#", f"{topics.prefix}/agents/plain/#"]) as watcher,
    ):
        await watcher.wait(lambda seen: topics.status("plain") in seen)
        await watcher.conn.publish(topics.ha_state("plain", "probe"), b"{}", qos=1)
        await watcher.wait(lambda seen: topics.ha_state("plain", "probe") in seen)
    assert set(watcher.seen) == {topics.card("plain"), topics.status("plain"), topics.ha_state("plain", "probe")}


def test_removal_messages_clear_configs_and_mirror():
    t = Topics()
    removal = removal_messages(card(), t)
    node = node_id(t, "air-07")
    legacy = {f"homeassistant/sensor/{node}/{s}/config" for s in ("pm25", "temp")}
    legacy |= {topic for topic, _ in removal if "Bahnhof" in topic}
    legacy |= {f"homeassistant/binary_sensor/{node}/status/config"}
    assert {topic for topic, _ in removal} == {topic for topic, _ in discovery_messages(card(), t)} | {
        t.ha_status("air-07")
    } | legacy, "the device, the mirror, and the per-entity configs of older versions"
    assert len(legacy) == 4 and all(payload == b"" for _, payload in removal)


async def test_real_sensor_handler_mirrors_its_readings_for_home_assistant(make_agent, settings, topics):
    caps = [{"kind": "sensor", "name": "air", "options": {"sensors": [
        {"name": "pm25", "modality": "pm25", "unit": "µg/m³", "rate_hz": 20.0, "pattern": "constant", "base": 9.0}]}}]  # fmt: skip
    async with (
        Watcher(settings, [topics.ha_state("air-real", "pm25")]) as watcher,
        make_agent("air-real", home_assistant=True, capabilities=caps),
    ):
        await watcher.wait(lambda seen: topics.ha_state("air-real", "pm25") in seen)
        assert json.loads(watcher.seen[topics.ha_state("air-real", "pm25")][1])["value"] == pytest.approx(9.0, abs=2)
