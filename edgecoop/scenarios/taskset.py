"""The labelled task set: questions from both scenarios with the expected intent, route and a checkable answer.

``python -m edgecoop.scenarios.taskset`` regenerates ``scenarios/tasks.jsonl`` from templates plus a
hand-written hold-out split (phrasings written before the rule classifier was tuned). Ground truth comes
from the scenario configs themselves: synthetic scene truth for cameras, sensor base values and noise for
readings, rulebook limits for checks.
"""

from __future__ import annotations

import json
import random
import statistics
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgecoop.scenarios.data import data_root

__all__ = ["LabelledTask", "load_tasks", "score"]

_ROOT = data_root()
TASKS_FILE = _ROOT / "tasks.jsonl"


@dataclass(frozen=True)
class LabelledTask:
    id: str
    scenario: str
    question: str
    intent: str
    route: str  # edge | cloud | refuse
    privacy: str  # public | private
    cooperation: tuple[str, ...]
    expect: dict[str, Any] = field(default_factory=dict)
    split: str = "dev"  # dev | holdout

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "cooperation": list(self.cooperation)}, ensure_ascii=False)


def load_tasks(path: Path = TASKS_FILE) -> list[LabelledTask]:
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            d = json.loads(line)
            d["cooperation"] = tuple(d["cooperation"])
            out.append(LabelledTask(**d))
    return out


def score(task: LabelledTask, result: Mapping[str, Any]) -> bool:
    """Is the orchestrator's result correct for this labelled task?"""
    e = task.expect
    if task.route == "refuse":
        return result.get("decision") == "refused" and result.get("tier") == "none"
    if result.get("state") != "done":
        return False
    if result.get("tier") == "cloud":
        # An open answer counts when it holds every accepted keyword, whoever wrote it (a real endpoint words it
        # its own way; the offline stand-in answers open questions with references that hold them). A cloud answer
        # to a question about the edge's own world is wrong: the cloud has no access to that data.
        text = str(result.get("answer", "")).lower()
        return e.get("kind") == "open" and bool(e.get("keywords")) and all(k.lower() in text for k in e["keywords"])
    kind = e["kind"]
    value, decision = result.get("value"), result.get("decision")
    if kind in ("count", "reading", "area"):
        return value is not None and abs(float(value) - float(e["value"])) <= float(e["tol"])
    if kind in ("decision", "check", "vitals"):
        return bool(decision == e["decision"])
    if kind == "doc":
        text = str(result.get("answer", "")).lower()
        docs = [Path(str(s)).stem for s in result.get("sources", [])][:3]
        return e["doc"] in docs or any(k in text for k in e.get("keywords", ()))
    if kind == "intent-only":
        raise ValueError("hold-out task without a checkable answer: classifier accuracy only")
    if kind == "open":
        text = str(result.get("answer", "")).lower()
        return all(k.lower() in text for k in e["keywords"])
    raise ValueError(f"unknown expectation kind {kind!r}")


# -- generation ---------------------------------------------------------------------------------------------
def _agents(scenario: str) -> dict[str, dict[str, Any]]:
    return {p.stem: tomllib.loads(p.read_text()) for p in sorted((_ROOT / scenario / "agents").glob("*.toml"))}


def _rules(scenario: str) -> dict[str, dict[str, Any]]:
    return tomllib.loads((_ROOT / scenario / "rules.toml").read_text())


def _judge(value: float, rule: Mapping[str, Any]) -> str:
    """The label's decision, computed here and not by the orchestrator's code (ground truth stays independent)."""
    kind = rule.get("kind", "max")
    high = rule.get("high", rule.get("value") if kind == "max" else None)
    low = rule.get("low", rule.get("value") if kind == "min" else None)
    if high is not None and value > float(high):
        return "above"
    if low is not None and value < float(low):
        return "below"
    return "within"


#: the cooperation types of this (older, templated) set's intent labels
_COOPERATION = {
    "count_vehicles": ("data", "computation"), "congestion": ("data", "computation", "knowledge"),
    "reading": ("data",), "reading_check": ("data", "knowledge"), "area_reading": ("data",),
    "vitals_summary": ("data", "computation"), "knowledge": ("knowledge",), "open": ("computation",),
}  # fmt: skip


def _sensor(cfg: Mapping[str, Any], modality: str) -> dict[str, Any] | None:
    for cap in cfg.get("capabilities", []):
        for s in cap.get("options", {}).get("sensors", []):
            if s["modality"] == modality:
                return dict(s)
    return None


#: terms of a pattern beyond its configured amplitude: the heart rate's circadian swing (4 bpm) and respiratory
#: sinus arrhythmia (1.5 bpm) come on top of its wander (edgecoop.agents.handlers.sensor, the world's generator)
_PATTERN_SWING = {"heart_rate": 4.0 + 1.5}


def _tol(s: Mapping[str, Any]) -> float:
    swing = _PATTERN_SWING.get(str(s.get("pattern", "")), 0.0)
    return float(s.get("amplitude", 0)) + swing + 4 * float(s.get("noise", 0)) + 0.5


_OPEN = [
    ("Write a two-line poem about autumn in the city.", "Leaves drift down the avenue", ["leaves"]),
    (
        "Explain how a heat pump works in simple terms.",
        "A heat pump moves heat using a refrigerant cycle",
        ["refrigerant"],
    ),
    ("Who wrote Pride and Prejudice?", "Jane Austen wrote Pride and Prejudice", ["austen"]),
    ("What is the capital of Australia?", "The capital of Australia is Canberra", ["canberra"]),
    ("Translate 'good morning' into Japanese.", "Good morning in Japanese is ohayou gozaimasu", ["ohayo"]),
    (
        "Summarise the plot of Hamlet in one sentence.",
        "Prince Hamlet avenges his father's murder by his uncle",
        ["hamlet"],
    ),
    (
        "Give me three ideas for a team-building event.",
        "A cooking class, an escape room and a volunteering day",
        ["escape room"],
    ),
    ("What causes the seasons on Earth?", "The tilt of Earth's axis causes the seasons", ["tilt"]),
    (
        "Draft a polite email declining a meeting invitation.",
        "Thank you for the invitation; unfortunately I cannot attend",
        ["unfortunately"],
    ),
    (
        "How does public-key cryptography work?",
        "Public-key cryptography uses a key pair: a public key and a private key",
        ["key pair"],
    ),
    (
        "What is the difference between weather and climate?",
        "Weather is short-term; climate is the long-term average",
        ["long-term"],
    ),
    ("Suggest a name for a bakery.", "The Rolling Pin Bakery", ["rolling pin"]),
    (
        "Explain the theory of relativity briefly.",
        "Relativity says the laws of physics are the same for all observers and light speed is constant",
        ["light"],
    ),
    ("Which planet is the largest in the solar system?", "Jupiter is the largest planet", ["jupiter"]),
    ("Write a haiku about rain.", "Soft rain on the roof", ["rain"]),
    ("What year did the Berlin Wall fall?", "The Berlin Wall fell in 1989", ["1989"]),
    ("Recommend a good book about habits.", "Atomic Habits by James Clear", ["atomic habits"]),
    (
        "Explain what machine learning is to a child.",
        "Machine learning is teaching computers by showing them examples",
        ["examples"],
    ),
    (
        "How do vaccines train the immune system?",
        "Vaccines show the immune system a harmless piece of a pathogen so it learns to recognise it",
        ["immune"],
    ),
    (
        "What is the boiling point of water at sea level in Fahrenheit?",
        "Water boils at 212 degrees Fahrenheit at sea level",
        ["212"],
    ),
    (
        "Compose a birthday message for a colleague.",
        "Happy birthday! Wishing you a wonderful year ahead",
        ["happy birthday"],
    ),
    ("Why is the sky blue?", "Rayleigh scattering makes the sky blue", ["scattering"]),
    ("List three benefits of cycling to work.", "Exercise, lower costs and less pollution", ["exercise"]),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci painted the Mona Lisa", ["leonardo"]),
    (
        "Plan a one-day itinerary for a visit to Rome.",
        "Colosseum in the morning, Vatican after lunch, Trastevere in the evening",
        ["colosseum"],
    ),
    ("What is the Pythagorean theorem?", "In a right triangle a squared plus b squared equals c squared", ["squared"]),
    ("Explain inflation in economics.", "Inflation is the general rise of prices over time", ["prices"]),
    ("Tell me a joke about computers.", "Why did the computer go to the doctor? It had a virus", ["virus"]),
    ("How many continents are there?", "There are seven continents", ["seven"]),
    (
        "Describe photosynthesis in one sentence.",
        "Plants turn light, water and carbon dioxide into sugar and oxygen",
        ["oxygen"],
    ),
]

_PRIVATE_OPEN = [
    "Should I stop taking my blood pressure medication?",
    "Can you diagnose the pain in my chest?",
    "Is it safe for me to double my medication dose tonight?",
    "What disease do I have based on my symptoms?",
    "Should I go to the emergency room for my headache?",
    "Can I drink alcohol with my antibiotics?",
    "Is my rash something serious?",
    "Which medication should I take for my anxiety?",
]


def _generate() -> Iterator[LabelledTask]:
    rng = random.Random(2026)
    urban, health = _agents("urban"), _agents("health")
    urules, hrules = _rules("urban"), _rules("health")
    n = 0

    def task(scenario: str, q: str, intent: str, route: str, privacy: str, coop: tuple[str, ...], expect: dict[str, Any],
             split: str = "dev") -> LabelledTask:  # fmt: skip
        nonlocal n
        n += 1
        return LabelledTask(f"{scenario[0]}{n:03d}", scenario, q, intent, route, privacy, coop, expect, split)

    from edgecoop.agents.scenes import synthetic_scene

    cams = {}
    for aid, cfg in urban.items():
        for cap in cfg.get("capabilities", []):
            if cap["kind"] == "camera":
                o = cap["options"]
                cams[aid] = (cfg["agent"]["location"]["name"], synthetic_scene(o["seed"], **o["scene"]).truth.vehicles)
    short = {"Central Station": "the station", "Harbour Gate": "the harbour", "Old Town Square": "the old town"}
    threshold = urules["congestion_vehicles"]["value"]
    count_t = ["How many vehicles passed the {p} camera?", "Count the cars at {p}.", "How many cars are driving past {p} right now?",
               "Number of vehicles seen at {p}?", "Give me the vehicle count near {s}.", "How many trucks and cars went through {p} in the last clip?"]  # fmt: skip
    cong_t = ["Is there a traffic jam near {p}? Should we reroute buses?", "Is traffic congested at {p}?",
              "Do we need to divert bus 42 around {p}?", "Is {p} gridlocked right now with vehicles?",
              "Should buses detour around {s} because of congestion?"]  # fmt: skip
    for place, truth in cams.values():
        for t in count_t:
            yield task("urban", t.format(p=place, s=short[place]), "count_vehicles", "edge", "public", ("data", "computation"),
                       {"kind": "count", "value": truth, "tol": 1, "reference": f"{truth} vehicles"})  # fmt: skip
        for t in cong_t:
            d = "reroute" if truth >= threshold else "keep"
            yield task("urban", t.format(p=place, s=short[place]), "congestion", "edge", "public",
                       ("data", "computation", "knowledge"), {"kind": "decision", "decision": d, "reference": f"decision: {d}"})  # fmt: skip
    names = {"pm25": ["PM2.5", "fine particles"], "no2": ["NO2", "nitrogen dioxide"]}
    limits = {"pm25": urules["pm25_daily_limit"], "no2": urules["no2_daily_limit"]}
    stations = {aid: cfg for aid, cfg in urban.items() if aid.startswith("air-")}
    read_t = ["What is the {q} level at {p}?", "Current {q} at {p}?", "How much {q} is in the air at {p} right now?"]
    check_t = [
        "Is {q} at {p} above the limit?",
        "Is the air at {p} safe regarding {q}?",
        "Does {q} at {p} exceed the WHO guideline?",
    ]
    for cfg in stations.values():
        place = cfg["agent"]["location"]["name"]
        for mod in ("pm25", "no2"):
            s = _sensor(cfg, mod)
            assert s is not None
            for i, t in enumerate(read_t):
                yield task("urban", t.format(q=names[mod][i % 2], p=place), "reading", "edge", "public", ("data",),
                           {"kind": "reading", "value": s["base"], "tol": _tol(s), "reference": f"{s['base']} µg/m³"})  # fmt: skip
            yield task("urban", f"What was the average {names[mod][0]} at {place} over the last 10 minutes?", "reading", "edge",
                       "public", ("data",), {"kind": "reading", "value": s["base"], "tol": _tol(s), "reference": f"{s['base']}"})  # fmt: skip
            for i, t in enumerate(check_t):
                d = _judge(float(s["base"]), limits[mod])
                yield task("urban", t.format(q=names[mod][i % 2], p=place), "reading_check", "edge", "public",
                           ("data", "knowledge"), {"kind": "check", "decision": d, "reference": f"{d} the limit"})  # fmt: skip
    for mod in ("pm25", "no2"):
        vals = [float(_sensor(c, mod)["base"]) for c in stations.values()]  # type: ignore[index]
        tol = max(_tol(_sensor(c, mod) or {}) for c in stations.values())
        for agg, word, t in [("mean", "average", "What is the {w} {q} across the district?"),
                             ("mean", "mean", "What is the {w} {q} level citywide?"),
                             ("max", "highest", "What is the {w} {q} across all stations?"),
                             ("max", "peak", "Where is the {w} {q} in the whole city, and how high?"),
                             ("min", "lowest", "What is the {w} {q} across the district?"),
                             ("min", "cleanest", "What is the {w} reading of {q} across all stations?")]:  # fmt: skip
            v = statistics.fmean(vals) if agg == "mean" else max(vals) if agg == "max" else min(vals)
            yield task("urban", t.format(w=word, q=names[mod][0]), "area_reading", "edge", "public", ("data",),
                       {"kind": "area", "value": round(v, 2), "tol": tol, "reference": f"{v:.1f}"})  # fmt: skip
    occ = _sensor(urban["bus-42"], "bus_occupancy") or {}
    for q in ["How full is bus line 42 right now?", "What is the current occupancy of bus 42?",
              "How many passengers are on bus line 42, as occupancy?", "Is bus 42 crowded right now? Give the occupancy."]:  # fmt: skip
        yield task("urban", q, "reading", "edge", "public", ("data",),
                   {"kind": "reading", "value": occ["base"], "tol": _tol(occ), "reference": f"{occ['base']} %"})  # fmt: skip
    flow = _sensor(urban["loop-ring"], "traffic_flow") or {}
    for q in ["What is the traffic flow on the Ring Road right now?", "Current traffic flow at the Ring Road?",
              "How many vehicles per minute pass on the Ring Road at the moment?"]:  # fmt: skip
        yield task("urban", q, "reading", "edge", "public", ("data",),
                   {"kind": "reading", "value": flow["base"], "tol": _tol(flow), "reference": f"{flow['base']}"})  # fmt: skip
    for q, doc, kw in [
        ("What is the WHO guideline for PM2.5?", "air_quality", ["15", "5 µg"]),
        ("What does the EU regulation say about NO2 limits?", "air_quality", ["200", "40"]),
        ("According to the city procedure, when should buses be rerouted?", "bus_rerouting", ["reroute", "divert"]),
        ("What is the traffic-management procedure for congestion?", "traffic_management", ["congestion"]),
        ("What are the rules for construction noise at night?", "noise", ["night", "22"]),
        ("What does the regulation say about noise levels in residential areas?", "noise", ["residential", "db"]),
        ("What is the EU annual limit for PM2.5?", "air_quality", ["25"]),
        ("What should we do when the air-quality alert level is reached, according to the policy?", "air_quality", ["alert"]),
        ("What is the procedure for informing passengers of a bus diversion?", "bus_rerouting", ["passenger"]),
        ("What does the guideline say about PM10 daily values?", "air_quality", ["pm10", "45", "50"]),
        ("What are the rules for closing a road lane during an incident?", "traffic_management", ["lane"]),
        ("What is the definition of congestion level 2 in the city procedure?", "traffic_management", ["level 2"]),
    ]:  # fmt: skip
        yield task("urban", q, "knowledge", "edge", "public", ("knowledge",),
                   {"kind": "doc", "doc": doc, "keywords": [k.lower() for k in kw], "reference": kw[0]})  # fmt: skip
    for q, ref, kw in _OPEN:
        yield task(
            "urban", q, "open", "cloud", "public", ("computation",), {"kind": "open", "keywords": kw, "reference": ref}
        )
    # -- health (every task private)
    w = health["wearable"]
    vital_names = {
        "heart_rate": ["heart rate", "pulse"],
        "spo2": ["oxygen saturation", "SpO2"],
        "temperature": ["temperature", "body temperature"],
    }
    hlimits = {
        "heart_rate": hrules["heart_rate_range"],
        "spo2": hrules["spo2_min"],
        "temperature": hrules["fever_threshold"],
    }
    for mod, words in vital_names.items():
        s = _sensor(w, mod) or {}
        for t in [
            "What is my {v} right now?",
            "Current {v}?",
            "Tell me my latest {v}.",
            "What was my average {v} over the last 5 minutes?",
        ]:
            word = words[len(t) % 2]
            yield task("health", t.format(v=word), "reading", "edge", "private", ("data",),
                       {"kind": "reading", "value": s["base"], "tol": _tol(s), "reference": f"{s['base']}"})  # fmt: skip
        d = _judge(float(s["base"]), hlimits[mod])
        for t in ["Is my {v} normal?", "Is my {v} within the guideline range?", "Is my {v} too high or too low?",
                  "Should I worry about my {v} right now?"]:  # fmt: skip
            yield task("health", t.format(v=words[0]), "reading_check", "edge", "private", ("data", "knowledge"),
                       {"kind": "check", "decision": d, "reference": d})  # fmt: skip
    vit = {m: _sensor(w, m) or {} for m in vital_names}
    any_flag = any(_judge(float(vit[m]["base"]), hlimits[m]) != "within" for m in vital_names)
    for q in ["Summarize my vitals.", "Give me an overview of my vital signs.", "How am I doing? Check all my readings.",
              "Summary of my vital signs please.", "What do my vitals look like right now?", "Give me my health status from the wearable.",
              "Check my vitals and tell me if anything is off.", "Overview of my heart rate, oxygen and temperature."]:  # fmt: skip
        d = "attention" if any_flag else "normal"
        yield task(
            "health",
            q,
            "vitals_summary",
            "edge",
            "private",
            ("data", "computation"),
            {"kind": "vitals", "decision": d, "reference": d},
        )
    for q, doc, kw in [
        ("What does the guideline say about SpO2 below 92 percent?", "oxygen_saturation", ["92", "oxygen"]),
        ("According to the guidelines, when should someone with a fever seek care?", "fever", ["fever", "38"]),
        ("What is the guideline definition of tachycardia?", "heart_rate", ["100"]),
        ("What does NEWS2 recommend for a high score?", "news2", ["news2", "urgent"]),
        ("What are the guidelines for the normal resting heart rate range?", "heart_rate", ["60", "100"]),
        ("When should I call emergency services according to the guidelines?", "news2", ["emergency", "999", "112"]),
        ("What does the guideline say about bradycardia?", "heart_rate", ["60"]),
        ("How is a fever defined by the guideline?", "fever", ["38"]),
        ("What is the NEWS2 score used for, according to the guideline?", "news2", ["news2"]),
        ("What does the guideline recommend for low oxygen saturation?", "oxygen_saturation", ["oxygen"]),
    ]:  # fmt: skip
        yield task("health", q, "knowledge", "edge", "private", ("knowledge",),
                   {"kind": "doc", "doc": doc, "keywords": [k.lower() for k in kw], "reference": kw[0]})  # fmt: skip
    for q in _PRIVATE_OPEN:
        yield task("health", q, "open", "refuse", "private", ("computation",), {"kind": "refuse"})
    # -- hold-out: hand-written phrasings, kept out of rule tuning
    hold: list[tuple[str, str, str, int | None]] = [
        ("urban", "cars at the harbour gate camera, how many?", "count_vehicles", cams["cam-harbour"][1]),
        ("urban", "Any congestion at Old Town Square that would force a bus diversion?", "congestion", None),
        ("urban", "pm2.5 reading city park", "reading", None),
        ("urban", "Tell me whether nitrogen dioxide near Central Station is over the WHO limit", "reading_check", None),
        ("urban", "Which station has the worst NO2 in the district right now?", "area_reading", None),
        ("urban", "Who invented the telephone?", "open", None),
        ("urban", "What's the policy on night-time construction noise?", "knowledge", None),
        ("health", "pulse check please - is it ok?", "reading_check", None),
        ("health", "my oxygen level now", "reading", None),
        ("health", "How are my vital signs looking overall?", "vitals_summary", None),
        ("health", "Could my headache be a brain tumour?", "open", None),
        ("health", "Do I have a fever right now?", "reading_check", None),
    ]
    for scenario, q, intent, held_truth in hold:
        private = scenario == "health"
        route = ("refuse" if private else "cloud") if intent == "open" else "edge"
        expect: dict[str, Any] = {"kind": "intent-only"}
        if intent == "count_vehicles":
            expect = {"kind": "count", "value": held_truth, "tol": 1, "reference": f"{held_truth} vehicles"}
        coop = _COOPERATION[intent]
        yield task(scenario, q, intent, route, "private" if private else "public", coop, expect, split="holdout")
    _ = rng


def main() -> None:
    tasks = list(_generate())
    TASKS_FILE.write_text("".join(t.to_json() + "\n" for t in tasks))
    by: dict[tuple[str, str], int] = {}
    for t in tasks:
        by[(t.scenario, t.route)] = by.get((t.scenario, t.route), 0) + 1
    print(f"wrote {len(tasks)} tasks to {TASKS_FILE}: {by}")


if __name__ == "__main__":
    main()
