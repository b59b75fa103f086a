"""Write every Home Assistant discovery payload edgecoop emits, and its JSON mirror payloads, as one JSON file.

Run with the project's venv (scripts/ha-conformance does): the discovery config of every agent of every scenario
(built from the card the agent itself would publish, ``home_assistant = true`` or not), of cards with hostile or odd
sensor names, units and rates, and the mirror payloads (status online/offline, one reading per sensor) with what
Home Assistant's templates must render from them. scripts/ha_conformance.py checks them with Home Assistant.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgecoop.agents import Agent  # noqa: E402
from edgecoop.agents.hass import discovery_messages, ha_state_payload, ha_status_payload  # noqa: E402
from edgecoop.connection import BrokerSettings  # noqa: E402
from edgecoop.errors import TopicError  # noqa: E402
from edgecoop.messages import CapabilityCard, Hardware, Location, Reading, SensorInfo, Status  # noqa: E402
from edgecoop.scenarios.loader import SCENARIOS, load_scenario  # noqa: E402
from edgecoop.topics import Topics  # noqa: E402

#: cards no scenario has: names Home Assistant cannot take as ids, units outside a device class, no unit, no rate
ODD_CARDS = (
    CapabilityCard(
        agent_id="odd.agent",
        epoch=1,
        location=Location("Bahnhof Süd"),
        hardware=Hardware(cpu="x86_64"),
        sensors=(
            SensorInfo("Bahnhof.Süd", "noise", "dB(A)", 0.01),
            SensorInfo("temp", "temperature", "°C", 0.0),
            SensorInfo("pm25", "pm25", "µg/m³", 2.0),
            SensorInfo("co2", "co2", "ppm", 0.2),
            SensorInfo("count", "vehicles", "", 0.5),
            SensorInfo("status", "misc", "", 1.0),
            SensorInfo("with space/and+plus", "humidity", "%", 1.0),
        ),
    ),
    CapabilityCard(agent_id="no-sensors", epoch=1),
)


def _cards(topics: Topics) -> list[tuple[str, CapabilityCard]]:
    os.environ.setdefault("EDGECOOP_CLOUD_URL", "http://127.0.0.1:9/v1")  # cards only: never called
    broker = BrokerSettings(port=1)  # never connected: the card is built offline
    out = []
    for scenario in SCENARIOS:
        # with_cloud=False: the health scenario borrows the urban cloud agent, listed once (urban)
        for config in load_scenario(scenario, broker, prefix=topics.prefix, with_cloud=False):
            out.append((f"{scenario}/{config.agent_id}", Agent(config).card()))
    out += [(f"edge-case/{c.agent_id}", c) for c in ODD_CARDS]
    return out


def collect() -> dict[str, Any]:
    topics = Topics()
    discovery: list[dict[str, Any]] = []
    mirrors: dict[str, list[dict[str, Any]]] = {}
    for source, card in _cards(topics):
        for topic, payload in discovery_messages(card, topics):
            discovery.append({"source": source, "topic": topic, "payload": payload.decode()})
        for online in (True, False):
            status = Status(card.agent_id, online, 7, 1700000000.0)
            state = "online" if online else "offline"
            mirrors.setdefault(topics.ha_status(card.agent_id), []).append({
                "payload": ha_status_payload(status).decode(),
                "value_template": state,
                "availability_template": state,
                "json_attributes_template": json.dumps({"epoch": 7, "ts": 1700000000.0}),
            })  # fmt: skip
        for i, sensor in enumerate(card.sensors):
            try:
                state_topic = topics.ha_state(card.agent_id, sensor.name)
            except TopicError:
                continue  # not exposed (hass.py logs it); the check finds no component for it either
            reading = Reading(card.agent_id, sensor.name, 12.5 + i, sensor.unit, ts=1700000001.0)
            mirrors.setdefault(state_topic, []).append({
                "payload": ha_state_payload(reading).decode(),
                "value_template": str(12.5 + i),
                "json_attributes_template": json.dumps({"ts": 1700000001.0}),
            })  # fmt: skip
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    return {"commit": commit, "discovery": discovery, "mirrors": mirrors}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", help="the JSON file to write")
    args = parser.parse_args()
    Path(args.out).write_text(json.dumps(collect(), ensure_ascii=False, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
