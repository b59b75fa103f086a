"""What a task can ask for: the intents the Classifier Engine recognises and what each one needs.

An intent fixes the cooperation types, the collaboration shape and whether the edge can serve it at all.
Slots (place, quantity, aggregation) are filled per task by the classifier.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["INTENTS", "QUANTITIES", "Intent", "IntentSpec"]


class Intent(enum.StrEnum):
    COUNT_VEHICLES = "count_vehicles"  # camera -> vision
    CONGESTION = "congestion"  # camera -> vision -> rule -> (slm summary)
    READING = "reading"  # one sensor, latest or window aggregate
    READING_CHECK = "reading_check"  # sensor + limit from knowledge -> decision
    AREA_READING = "area_reading"  # fan-out to every sensor of a quantity, aggregate
    VITALS_SUMMARY = "vitals_summary"  # fan-out over every vital sign -> (slm summary)
    KNOWLEDGE = "knowledge"  # ask a knowledge agent
    OPEN = "open"  # general question: beyond the edge


@dataclass(frozen=True, slots=True)
class IntentSpec:
    cooperation: tuple[str, ...]
    shape: str  # single | sequential | parallel
    edge_capable: bool
    difficulty: str


INTENTS: dict[Intent, IntentSpec] = {
    Intent.COUNT_VEHICLES: IntentSpec(("data", "computation"), "sequential", True, "medium"),
    Intent.CONGESTION: IntentSpec(("data", "computation", "knowledge"), "sequential", True, "hard"),
    Intent.READING: IntentSpec(("data",), "single", True, "easy"),
    Intent.READING_CHECK: IntentSpec(("data", "knowledge"), "parallel", True, "medium"),
    Intent.AREA_READING: IntentSpec(("data",), "parallel", True, "medium"),
    Intent.VITALS_SUMMARY: IntentSpec(("data", "computation"), "parallel", True, "medium"),
    Intent.KNOWLEDGE: IntentSpec(("knowledge",), "single", True, "easy"),
    Intent.OPEN: IntentSpec(("computation",), "single", False, "hard"),
}


@dataclass(frozen=True, slots=True)
class Quantity:
    modality: str
    unit: str
    domain: str
    words: tuple[str, ...]
    #: key of the limit rule in the knowledge base, for checks against limits
    rule: str = ""
    label: str = ""


#: Measurable quantities, their sensor modality and the words people use for them.
QUANTITIES: dict[str, Quantity] = {
    "pm25": Quantity(
        "pm25",
        "µg/m³",
        "air",
        ("pm2.5", "pm25", "pm 2.5", "fine particles", "fine dust", "particulate"),
        "pm25_daily_limit",
        label="PM2.5",
    ),
    "no2": Quantity("no2", "µg/m³", "air", ("no2", "nitrogen dioxide", "nitrogen"), "no2_daily_limit", label="NO2"),
    "traffic_flow": Quantity(
        "traffic_flow",
        "vehicles/min",
        "traffic",
        ("traffic flow", "flow of traffic", "vehicles per minute"),
        label="traffic flow",
    ),
    "bus_occupancy": Quantity(
        "bus_occupancy", "%", "transit", ("occupancy", "crowded", "full", "passengers", "seats"), label="bus occupancy"
    ),
    "heart_rate": Quantity(
        "heart_rate",
        "bpm",
        "health",
        ("heart rate", "pulse", "heartbeat", "bpm", "heart"),
        "heart_rate_range",
        label="heart rate",
    ),
    "spo2": Quantity("spo2", "%", "health", ("spo2", "oxygen", "saturation", "o2"), "spo2_min", label="SpO2"),
    "temperature": Quantity(
        "temperature", "°C", "health", ("temperature", "fever", "temp"), "fever_threshold", label="body temperature"
    ),
}
