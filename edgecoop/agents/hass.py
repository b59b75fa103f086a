"""Home Assistant MQTT discovery for agents (opt-in: ``home_assistant = true`` under ``[agent]``).

Home Assistant cannot read msgpack, so an agent with the option on also publishes a JSON mirror::

    <p>/agents/<id>/ha/<sensor>   {"value", "unit", "ts", "agent_id", "sensor"}   one per reading, not retained
    <p>/agents/<id>/ha/status     {"state": "online"|"offline", "epoch", "ts", "agent_id"}   retained

and, on every connect, one retained *device discovery* config (JSON) per agent::

    homeassistant/device/<node_id>/config   {"device", "origin", "components": {<sensor>: sensor, "status": binary_sensor}}

one ``sensor`` component per SensorInfo of the card (available while the mirror says ``online``) and a
``connectivity`` binary_sensor on the status mirror. ``scripts/ha-conformance`` validates these payloads with Home
Assistant's own schemas (docs/interop.md).

``node_id`` is ``<prefix levels>_<agent id>`` joined with ``_`` (``edgecoop_v1_cam-01``); characters Home
Assistant does not accept in ids (``[a-zA-Z0-9_-]`` only) become ``_`` plus a short hash, so ids stay unique.

Limitation: the MQTT Last Will is the msgpack status (one will per connection), so after a *crash* Home
Assistant learns that the agent is gone only through ``expire_after`` on sensors that declare a rate; a clean
exit publishes ``offline`` on the mirror. Deregistration removes the device (an empty retained config).

Integration point for sensor handlers: after publishing a :class:`~edgecoop.messages.Reading` on the data topic
(``SensorHandler._publish``, inside its ``try``), ``if ctx.config.home_assistant: await publish_ha_reading(ctx.conn,
ctx.topics, reading)`` (or publish :func:`ha_state_payload` on :meth:`Topics.ha_state` yourself).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import time
from typing import TYPE_CHECKING, Any

from edgecoop.errors import TopicError
from edgecoop.messages import CapabilityCard, Reading, SensorInfo, Status

if TYPE_CHECKING:
    from edgecoop.connection import Connection, Session
    from edgecoop.topics import Topics

__all__ = [
    "DISCOVERY_PREFIX",
    "discovery_config",
    "discovery_messages",
    "discovery_topic",
    "ha_state_payload",
    "ha_status_payload",
    "node_id",
    "publish_discovery",
    "publish_ha_offline",
    "publish_ha_reading",
    "publish_removal",
    "removal_messages",
]

log = logging.getLogger(__name__)

#: Home Assistant's default discovery prefix.
DISCOVERY_PREFIX = "homeassistant"
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
#: Home Assistant sensor device classes by our sensor modality, with the units each class accepts. A device
#: class is only set when the unit fits (Home Assistant rejects statistics for a class with a foreign unit).
_DEVICE_CLASSES: dict[str, tuple[str, frozenset[str]]] = {
    "temperature": ("temperature", frozenset({"°C", "°F", "K"})),
    "humidity": ("humidity", frozenset({"%"})),
    "pm25": ("pm25", frozenset({"µg/m³"})),
    "pm10": ("pm10", frozenset({"µg/m³"})),
    "pm1": ("pm1", frozenset({"µg/m³"})),
    "co2": ("carbon_dioxide", frozenset({"ppm"})),
    "co": ("carbon_monoxide", frozenset({"ppm"})),
    "no2": ("nitrogen_dioxide", frozenset({"µg/m³"})),
    "ozone": ("ozone", frozenset({"µg/m³"})),
    "o3": ("ozone", frozenset({"µg/m³"})),
    "voc": ("volatile_organic_compounds", frozenset({"µg/m³"})),
    "pressure": ("pressure", frozenset({"Pa", "hPa", "kPa", "bar", "mbar", "psi", "inHg", "mmHg"})),
    "illuminance": ("illuminance", frozenset({"lx"})),
    "light": ("illuminance", frozenset({"lx"})),
    "battery": ("battery", frozenset({"%"})),
    "voltage": ("voltage", frozenset({"V", "mV"})),
    "current": ("current", frozenset({"A", "mA"})),
    "power": ("power", frozenset({"W", "kW"})),
    "energy": ("energy", frozenset({"Wh", "kWh", "MWh"})),
    "noise": ("sound_pressure", frozenset({"dB", "dBA"})),
    "sound_pressure": ("sound_pressure", frozenset({"dB", "dBA"})),
}


def _slug(text: str) -> str:
    slug = _UNSAFE.sub("_", text)
    if slug != text:  # keep ids unique: "a.b" and "a_b" must not collide
        slug += "_" + hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()[:6]
    return slug


def _json(data: dict[str, Any]) -> bytes:
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def node_id(topics: Topics, agent_id: str) -> str:
    """Home Assistant node id of an agent: prefix levels and agent id, made safe (``edgecoop_v1_cam-01``)."""
    return "_".join(_slug(level) for level in [*topics.prefix.split("/"), agent_id])


def _version() -> str:
    from edgecoop import __version__

    return __version__


def _device(card: CapabilityCard, node: str) -> dict[str, Any]:
    device: dict[str, Any] = {
        "identifiers": [node],
        "name": card.agent_id,
        "manufacturer": "edgecoop",
        "model": card.hardware.cpu or "edgecoop agent",
        "sw_version": _version(),
    }
    if card.location.name:
        device["suggested_area"] = card.location.name
    return device


def _origin() -> dict[str, Any]:
    return {"name": "edgecoop", "sw_version": _version()}


def _sensor_config(card: CapabilityCard, sensor: SensorInfo, topics: Topics, node: str) -> dict[str, Any]:
    config: dict[str, Any] = {
        "platform": "sensor",
        "name": sensor.name,
        "unique_id": f"{node}_{_slug(sensor.name)}",
        "state_topic": topics.ha_state(card.agent_id, sensor.name),
        "value_template": "{{ value_json.value }}",
        "state_class": "measurement",
        "json_attributes_topic": topics.ha_state(card.agent_id, sensor.name),
        "json_attributes_template": "{{ {'ts': value_json.ts} | tojson }}",
        # availability per sensor, not shared by the device: the connectivity entity must stay available to
        # show "disconnected"
        "availability_topic": topics.ha_status(card.agent_id),
        "availability_template": "{{ value_json.state }}",
        "payload_available": "online",
        "payload_not_available": "offline",
    }
    if sensor.unit:
        config["unit_of_measurement"] = sensor.unit
    device_class = _DEVICE_CLASSES.get(sensor.modality.lower())
    if device_class and sensor.unit in device_class[1]:
        config["device_class"] = device_class[0]
    if sensor.rate_hz > 0:
        # no reading for 10 periods (at least a minute): the value is stale; also how a crashed agent shows up
        config["expire_after"] = max(60, math.ceil(10 / sensor.rate_hz))
    return config


def _connectivity_config(card: CapabilityCard, topics: Topics, node: str) -> dict[str, Any]:
    return {
        "platform": "binary_sensor",
        "name": "Connectivity",
        "unique_id": f"{node}_status",
        "state_topic": topics.ha_status(card.agent_id),
        "value_template": "{{ value_json.state }}",
        "payload_on": "online",
        "payload_off": "offline",
        "device_class": "connectivity",
        "entity_category": "diagnostic",
        "json_attributes_topic": topics.ha_status(card.agent_id),
        "json_attributes_template": "{{ {'epoch': value_json.epoch, 'ts': value_json.ts} | tojson }}",
    }


def discovery_topic(topics: Topics, agent_id: str, *, discovery_prefix: str = DISCOVERY_PREFIX) -> str:
    """The device discovery topic of an agent: ``<discovery prefix>/device/<node_id>/config``."""
    return f"{discovery_prefix}/device/{node_id(topics, agent_id)}/config"


def discovery_config(card: CapabilityCard, topics: Topics) -> dict[str, Any]:
    """The device discovery payload of an agent: the device, the origin, and its components (``cmps``): one sensor
    per :class:`~edgecoop.messages.SensorInfo` of the card (object id = sensor name, made safe) and a connectivity
    binary_sensor (object id ``status``)."""
    node = node_id(topics, card.agent_id)
    components: dict[str, dict[str, Any]] = {}
    for sensor in card.sensors:
        if sensor.name == "status":
            log.warning("%s: sensor 'status' clashes with the Home Assistant status mirror; not exposed", card.agent_id)
            continue
        try:
            components[_slug(sensor.name)] = _sensor_config(card, sensor, topics, node)
        except TopicError as exc:
            log.warning("%s: sensor not exposed to Home Assistant: %s", card.agent_id, exc)
    components["status"] = _connectivity_config(card, topics, node)
    return {"device": _device(card, node), "origin": _origin(), "components": components}


def _legacy_topics(card: CapabilityCard, topics: Topics, discovery_prefix: str) -> list[str]:
    """The per-entity config topics edgecoop used before device discovery (cleared on deregistration)."""
    node = node_id(topics, card.agent_id)
    out = [f"{discovery_prefix}/sensor/{node}/{_slug(s.name)}/config" for s in card.sensors if s.name != "status"]
    return [*out, f"{discovery_prefix}/binary_sensor/{node}/status/config"]


def discovery_messages(
    card: CapabilityCard, topics: Topics, *, discovery_prefix: str = DISCOVERY_PREFIX
) -> list[tuple[str, bytes]]:
    """The retained device discovery config (topic, JSON) of ``card``: one message for the whole agent."""
    topic = discovery_topic(topics, card.agent_id, discovery_prefix=discovery_prefix)
    return [(topic, _json(discovery_config(card, topics)))]


def removal_messages(
    card: CapabilityCard, topics: Topics, *, discovery_prefix: str = DISCOVERY_PREFIX
) -> list[tuple[str, bytes]]:
    """Empty retained payloads that remove the agent's device from Home Assistant and clear the mirror (and the
    per-entity configs of edgecoop versions before device discovery, if any are still retained)."""
    topic = discovery_topic(topics, card.agent_id, discovery_prefix=discovery_prefix)
    legacy = [(t, b"") for t in _legacy_topics(card, topics, discovery_prefix)]
    return [(topic, b""), *legacy, (topics.ha_status(card.agent_id), b"")]


def ha_state_payload(reading: Reading) -> bytes:
    """The JSON mirror of one reading, published on :meth:`Topics.ha_state` (not retained)."""
    return _json(
        {
            "value": reading.value,
            "unit": reading.unit,
            "ts": reading.ts,
            "agent_id": reading.agent_id,
            "sensor": reading.sensor,
        }
    )


def ha_status_payload(status: Status) -> bytes:
    """The JSON mirror of a status, published retained on :meth:`Topics.ha_status`."""
    return _json(
        {
            "state": "online" if status.online else "offline",
            "epoch": status.epoch,
            "ts": status.ts,
            "agent_id": status.agent_id,
        }
    )


async def publish_discovery(
    client: Session, card: CapabilityCard, topics: Topics, *, discovery_prefix: str = DISCOVERY_PREFIX
) -> None:
    """From an agent's ``on_connect``: retained configs first, then the retained ``online`` mirror."""
    for topic, payload in discovery_messages(card, topics, discovery_prefix=discovery_prefix):
        await client.publish(topic, payload, qos=1, retain=True)
    online = Status(card.agent_id, True, card.epoch, time.time())
    await client.publish(topics.ha_status(card.agent_id), ha_status_payload(online), qos=1, retain=True)


async def publish_ha_offline(conn: Connection, topics: Topics, agent_id: str, epoch: int) -> None:
    """On a clean exit: the retained ``offline`` mirror."""
    offline = Status(agent_id, False, epoch, time.time())
    await conn.publish(topics.ha_status(agent_id), ha_status_payload(offline), qos=1, retain=True)


async def publish_removal(
    conn: Connection, card: CapabilityCard, topics: Topics, *, discovery_prefix: str = DISCOVERY_PREFIX
) -> None:
    """On deregistration: remove the entities from Home Assistant."""
    for topic, payload in removal_messages(card, topics, discovery_prefix=discovery_prefix):
        await conn.publish(topic, payload, qos=1, retain=True)


async def publish_ha_reading(conn: Connection, topics: Topics, reading: Reading, *, wait: float | None = 0) -> None:
    """For sensor handlers: mirror one reading as JSON, with the data topic's policy (QoS 0; by default not waiting
    for a connection, so a reading is dropped rather than queued: :class:`~edgecoop.errors.BrokerError` then)."""
    await conn.publish(topics.ha_state(reading.agent_id, reading.sensor), ha_state_payload(reading), qos=0, wait=wait)
