"""Plans: which steps a task needs, in which order (sequential stages) and which run side by side (parallel).

A plan is a list of stages; the steps of one stage run in parallel, stages run one after the other, and a
step's input may be computed from the results of earlier stages (a pipeline).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from edgecoop.orchestrator.classifier import Classification
from edgecoop.orchestrator.intents import QUANTITIES, Intent

__all__ = ["VITALS", "Plan", "Step", "build_plan", "cloud_plan"]

Results = Mapping[str, Any]
VITALS = ("heart_rate", "spo2", "temperature")


@dataclass(frozen=True)
class Step:
    name: str  # key of its result
    kind: str  # capability kind to discover
    input: Mapping[str, Any] | Callable[[Results], Mapping[str, Any]] = field(default_factory=dict)
    modality: str | None = None
    domain: str | None = None
    need: str = ""  # text for the semantic ranker (place, question)
    fanout: bool = False  # parallel collaboration: every matching agent
    optional: bool = False  # a failure does not fail the task (e.g. a summary)
    timeout_s: float = 8.0

    def make_input(self, results: Results) -> dict[str, Any]:
        return dict(self.input(results) if callable(self.input) else self.input)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "modality": self.modality, "fanout": self.fanout}


@dataclass(frozen=True)
class Plan:
    stages: tuple[tuple[Step, ...], ...]
    shape: str
    tier: str

    def steps(self) -> list[Step]:
        return [s for stage in self.stages for s in stage]


def _sensor_input(c: Classification, quantity: str | None = None) -> dict[str, Any]:
    q = quantity or c.quantity or ""
    op = "window" if c.window_s or c.agg != "latest" else "latest"
    d: dict[str, Any] = {"op": op, "modality": q}
    if op == "window":
        d |= {"seconds": c.window_s or 60, "agg": c.agg if c.agg != "latest" else "mean"}
    return d


def _vision_input(results: Results) -> dict[str, Any]:
    stream = dict(results["camera"])
    stream.pop("location", None)
    return {"op": "count_vehicles", **stream}


def _summary_prompt(results: Results) -> dict[str, Any]:
    facts = results.get("_facts", "")
    return {
        "system": "You are a concise assistant. Summarise the facts for an operator in one sentence.",
        "prompt": f"Facts: {facts}\nOne-sentence summary:",
        "max_tokens": 40,
    }


def build_plan(c: Classification, question: str, *, summarize: bool = False) -> Plan:
    """The edge plan for a classified task."""
    place = c.place or ""
    need = f"{place} {question}".strip()
    qspec = QUANTITIES.get(c.quantity or "")
    match c.intent:
        case Intent.COUNT_VEHICLES | Intent.CONGESTION:
            stages: list[tuple[Step, ...]] = [
                (Step("camera", "camera", {"op": "stream"}, modality="camera", need=need, timeout_s=5),),
                (Step("vision", "vision", _vision_input, need="count vehicles camera video", timeout_s=15),),
            ]
            if c.intent is Intent.CONGESTION:
                stages[1] += (Step("rule", "rulebook", {"op": "rule", "key": "congestion_vehicles"}, domain="traffic",
                                   need="congestion traffic rerouting buses"),)  # fmt: skip
                if summarize:
                    stages.append((Step("summary", "slm", _summary_prompt, optional=True, timeout_s=20),))
            return Plan(tuple(stages), "sequential", "edge")
        case Intent.READING:
            s = Step("reading", "sensor", _sensor_input(c), modality=c.quantity, need=need, timeout_s=5)
            return Plan(((s,),), "single", "edge")
        case Intent.READING_CHECK:
            assert qspec is not None
            reading = Step("reading", "sensor", _sensor_input(c), modality=c.quantity, need=need, timeout_s=5)
            rule = Step("rule", "rulebook", {"op": "rule", "key": qspec.rule}, domain=qspec.domain,
                        need=f"{qspec.domain} limits {c.quantity}")  # fmt: skip
            return Plan(((reading, rule),), "parallel", "edge")
        case Intent.AREA_READING:
            s = Step("readings", "sensor", _sensor_input(c), modality=c.quantity, fanout=True, timeout_s=5)
            return Plan(((s,),), "parallel", "edge")
        case Intent.VITALS_SUMMARY:
            fan = tuple(
                Step(f"vital:{v}", "sensor", _sensor_input(c, v), modality=v, need=need, timeout_s=5) for v in VITALS
            )
            rules = tuple(
                Step(f"rule:{v}", "rulebook", {"op": "rule", "key": QUANTITIES[v].rule}, domain="health",
                     need=f"health limits {v}", optional=True)
                for v in VITALS
            )  # fmt: skip
            stages = [fan + rules]
            if summarize:
                stages.append((Step("summary", "slm", _summary_prompt, optional=True, timeout_s=20),))
            return Plan(tuple(stages), "parallel", "edge")
        case Intent.KNOWLEDGE:
            s = Step("knowledge", "knowledge", {"question": question, "k": 3}, domain=c.domain if c.domain != "general" else None,
                     need=question)  # fmt: skip
            return Plan(((s,),), "single", "edge")
        case _:
            s = Step("slm", "slm", {"prompt": question, "max_tokens": 64}, need=question, timeout_s=30)
            return Plan(((s,),), "single", "edge")


def cloud_plan(question: str, context: str = "") -> Plan:
    prompt = f"{context}\n\nQuestion: {question}" if context else question
    s = Step("cloud", "cloud", {"prompt": prompt, "max_tokens": 160}, timeout_s=60)
    return Plan(((s,),), "single", "cloud")
