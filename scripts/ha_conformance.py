"""Check edgecoop's Home Assistant discovery payloads with Home Assistant's own code (run by scripts/ha-conformance).

Runs in a separate venv with ``homeassistant`` installed (it pins its own dependencies and needs Python 3.13), reads
the payloads that ``scripts/ha_payloads.py`` wrote with the project's venv, and for each one does what Home
Assistant's MQTT integration does on receipt (homeassistant/components/mqtt/discovery.py):

1. the topic must match the integration's ``TOPIC_MATCHER`` and be a ``device`` discovery topic;
2. abbreviations expanded, then ``DEVICE_DISCOVERY_SCHEMA`` (device, origin, components with a platform, shared
   availability options) and the origin schema;
3. every component merged with the device, origin and shared options as ``async_start`` merges them, then checked
   with its platform's own ``DISCOVERY_SCHEMA`` (sensor, binary_sensor);
4. beyond the schemas: sensor device classes against ``DEVICE_CLASS_UNITS`` and ``DEVICE_CLASS_STATE_CLASSES``
   (2025.4 only warns on a unit mismatch; later releases reject it), unique ids unique across all agents;
5. every template rendered by Home Assistant's template engine against the JSON mirror payloads edgecoop publishes
   (value, availability, attributes), as the entities will render them.

Writes a JSON result (``--json``) and exits 1 if anything was rejected.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

import voluptuous as vol
from homeassistant.components.mqtt import discovery
from homeassistant.components.mqtt.binary_sensor import DISCOVERY_SCHEMA as BINARY_SENSOR_SCHEMA
from homeassistant.components.mqtt.const import CONF_COMPONENTS, CONF_ORIGIN
from homeassistant.components.mqtt.schemas import DEVICE_DISCOVERY_SCHEMA, MQTT_ORIGIN_INFO_SCHEMA
from homeassistant.components.mqtt.sensor import DISCOVERY_SCHEMA as SENSOR_SCHEMA
from homeassistant.components.sensor import DEVICE_CLASS_STATE_CLASSES, DEVICE_CLASS_UNITS
from homeassistant.const import CONF_DEVICE, CONF_PLATFORM
from homeassistant.const import __version__ as HA_VERSION
from homeassistant.core import HomeAssistant
from homeassistant.helpers import frame
from homeassistant.helpers.template import Template

PLATFORMS = {"sensor": SENSOR_SCHEMA, "binary_sensor": BINARY_SENSOR_SCHEMA}
TEMPLATES = ("value_template", "availability_template", "json_attributes_template")


def check_payload(item: dict[str, Any], problems: list[str], components: list[dict[str, Any]]) -> None:
    topic, raw = item["topic"], item["payload"]
    prefix, _, rest = topic.partition("/")
    match = discovery.TOPIC_MATCHER.match(rest)
    if prefix != "homeassistant" or match is None:
        problems.append(f"{topic}: not a discovery topic Home Assistant matches")
        return
    if match["component"] != "device":
        problems.append(f"{topic}: a per-entity discovery topic, not device discovery")
    payload = discovery.MQTTDiscoveryPayload(json.loads(raw))
    discovery._replace_all_abbreviations(payload)  # what _parse_device_payload does first
    try:
        DEVICE_DISCOVERY_SCHEMA(payload)
        MQTT_ORIGIN_INFO_SCHEMA(payload[CONF_ORIGIN])
    except vol.Invalid as exc:
        problems.append(f"{topic}: DEVICE_DISCOVERY_SCHEMA: {exc}")
        return
    for component_id, component in payload[CONF_COMPONENTS].items():
        config = dict(component)
        platform_name = config.pop(CONF_PLATFORM)
        schema = PLATFORMS.get(platform_name)
        where = f"{topic} components.{component_id} ({platform_name})"
        if schema is None:
            problems.append(f"{where}: a platform this check does not cover")
            continue
        merged = discovery.MQTTDiscoveryPayload(config)
        merged[CONF_DEVICE] = payload[CONF_DEVICE]
        merged[CONF_ORIGIN] = payload[CONF_ORIGIN]
        discovery._merge_common_device_options(merged, payload)
        try:
            validated = schema(dict(merged))
        except vol.Invalid as exc:
            problems.append(f"{where}: DISCOVERY_SCHEMA: {exc}")
            continue
        device_class = validated.get("device_class")
        if platform_name == "sensor" and device_class is not None:
            unit = validated.get("unit_of_measurement")
            if device_class in DEVICE_CLASS_UNITS and unit not in DEVICE_CLASS_UNITS[device_class]:
                problems.append(f"{where}: unit {unit!r} is not one Home Assistant accepts for {device_class}")
            state_class = validated.get("state_class")
            allowed = DEVICE_CLASS_STATE_CLASSES.get(device_class)
            if state_class is not None and allowed is not None and state_class not in allowed:
                problems.append(f"{where}: state class {state_class} is not allowed for {device_class}")
        components.append({"where": where, "platform": platform_name, "config": config, "source": item["source"]})


def render_templates(
    hass: HomeAssistant, components: list[dict[str, Any]], mirrors: dict[str, Any], problems: list[str]
) -> int:
    """Render each template with Home Assistant's engine against the mirror payload its topic carries."""
    rendered = 0
    for comp in components:
        config = comp["config"]
        checks = [
            ("value_template", config.get("state_topic")),
            ("availability_template", config.get("availability_topic")),
            ("json_attributes_template", config.get("json_attributes_topic")),
        ]
        for key, topic in checks:
            if key not in config or topic is None:
                continue
            samples = mirrors.get(topic)
            if not samples:
                problems.append(f"{comp['where']}: no mirror payload on {topic} to render {key} with")
                continue
            for sample in samples:
                template = Template(config[key], hass)
                try:
                    out = template.async_render_with_possible_json_value(sample["payload"], None)
                except Exception as exc:  # any rendering failure is a finding
                    problems.append(f"{comp['where']}: {key} failed on {sample['payload']}: {exc}")
                    continue
                rendered += 1
                want = sample.get(key)
                if key == "json_attributes_template":  # compared as JSON: tojson has its own spacing
                    out, want = json.loads(str(out)), json.loads(want)
                if want is not None and out != want and str(out) != str(want):
                    problems.append(f"{comp['where']}: {key} rendered {out!r}, expected {want!r}")
    return rendered


async def check_all(data: dict[str, Any]) -> tuple[list[str], list[dict[str, Any]], int]:
    """Inside a running Home Assistant core (its schemas render templates with it, as in the integration)."""
    problems: list[str] = []
    components: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as config_dir:
        hass = HomeAssistant(config_dir)
        frame.async_setup(hass)
        for item in data["discovery"]:
            check_payload(item, problems, components)
        unique: dict[str, str] = {}
        for comp in components:
            uid = comp["config"].get("unique_id")
            if uid in unique:
                problems.append(f"{comp['where']}: unique_id {uid} also used by {unique[uid]}")
            unique[uid] = comp["where"]
        rendered = render_templates(hass, components, data["mirrors"], problems)
        await hass.async_stop(force=True)
    return problems, components, rendered


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("payloads", help="the JSON file scripts/ha_payloads.py wrote")
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args()
    data = json.loads(Path(args.payloads).read_text(encoding="utf-8"))
    problems, components, rendered = asyncio.run(check_all(data))
    by_platform: dict[str, int] = {}
    for comp in components:
        by_platform[comp["platform"]] = by_platform.get(comp["platform"], 0) + 1
    result = {
        "benchmark": "ha_discovery",
        "homeassistant": HA_VERSION,
        "python": platform.python_version(),
        "edgecoop_commit": data.get("commit", ""),
        "agents": len(data["discovery"]),
        "sources": sorted({item["source"] for item in data["discovery"]}),
        "payloads": len(data["discovery"]),
        "components": len(components),
        "components_by_platform": by_platform,
        "templates_rendered": rendered,
        "rejected": len(problems),
        "problems": problems,
        "machine": {
            "system": f"{platform.system()} {platform.release()}",
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "loadavg_1m": round(os.getloadavg()[0], 2),
        },
        "checks": [
            "discovery.TOPIC_MATCHER (device discovery topic)",
            "schemas.DEVICE_DISCOVERY_SCHEMA + MQTT_ORIGIN_INFO_SCHEMA after abbreviation expansion",
            "sensor.DISCOVERY_SCHEMA / binary_sensor.DISCOVERY_SCHEMA per component, merged as async_start merges",
            "sensor.DEVICE_CLASS_UNITS and DEVICE_CLASS_STATE_CLASSES",
            "unique_id unique across agents",
            "helpers.template.Template rendering against the JSON mirror payloads",
        ],
    }
    text = json.dumps(result, indent=2, ensure_ascii=False) + "\n"
    if args.json:
        Path(args.json).write_text(text, encoding="utf-8")
    print(text if problems else f"Home Assistant {HA_VERSION}: {len(components)} components in "
          f"{len(data['discovery'])} device payloads accepted, {rendered} template renderings as expected")  # fmt: skip
    for p in problems:
        print("REJECTED:", p, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
