"""Plans: which steps a task needs, in which order (sequential stages) and which run side by side (parallel).

A plan is a list of stages; the steps of one stage run in parallel, stages run one after the other, and a
step's input may be computed from the results of earlier stages (a pipeline).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Plan", "Step", "cloud_plan", "slm_plan"]

Results = Mapping[str, Any]


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
    place: str | None = None  # data about a named place comes from agents at that place only
    private_only: bool = False  # the asker's own data: only agents whose card is not public
    agent: str | None = None  # this agent and no other (a look-up routed to the best-matching knowledge agent)

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


def cloud_plan(question: str, context: str = "") -> Plan:
    prompt = f"{context}\n\nQuestion: {question}" if context else question
    s = Step("cloud", "cloud", {"prompt": prompt, "max_tokens": 160}, timeout_s=60)
    return Plan(((s,),), "single", "cloud")


def slm_plan(question: str) -> Plan:
    s = Step("slm", "slm", {"prompt": question, "max_tokens": 64}, need=question, timeout_s=30)
    return Plan(((s,),), "single", "edge")
