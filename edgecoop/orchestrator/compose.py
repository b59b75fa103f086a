"""Turns step results into the task's answer: a sentence, plus structured value/decision/sources to check."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Answer", "fmt", "judge", "rule_text"]


@dataclass
class Answer:
    text: str
    value: float | None = None
    decision: str | None = None
    sources: list[str] = field(default_factory=list)
    confidence: float = 0.9
    facts: str = ""
    options: list[str] = field(default_factory=list)  # with decision "clarify": what the user may choose
    values: dict[str, float] = field(default_factory=dict)  # per place or per modality, for several targets
    #: set when an SLM agent wrote the text: its model, the added ms and the faithfulness gate's verdict
    writer: dict[str, Any] = field(default_factory=dict)
    #: the answer is the edge's best while the cloud tier is unreachable (a public open question)
    degraded: bool = False

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"answer": self.text, "value": self.value, "decision": self.decision, "sources": self.sources,
             "confidence": round(self.confidence, 3)}  # fmt: skip
        if self.options:
            d["options"] = self.options
        if self.values:
            d["values"] = self.values
        if self.writer:
            d["writer"] = self.writer
        if self.degraded:
            d["degraded"] = True
        return d


def judge(value: float, rule: Mapping[str, Any]) -> str:
    """'above', 'below' or 'within' a rule's limits (max, min or range)."""
    high = rule.get("high", rule.get("value") if rule.get("kind", "max") == "max" else None)
    low = rule.get("low", rule.get("value") if rule.get("kind") == "min" else None)
    if high is not None and value > float(high):
        return "above"
    if low is not None and value < float(low):
        return "below"
    return "within"


def fmt(v: float) -> str:
    return f"{v:.0f}" if abs(v) >= 100 or float(v).is_integer() else f"{v:.1f}"


def rule_text(rule: Mapping[str, Any]) -> str:
    if "low" in rule and "high" in rule:
        return f"{fmt(rule['low'])}–{fmt(rule['high'])} {rule.get('unit', '')}".strip()
    return f"{fmt(rule['value'])} {rule.get('unit', '')}".strip()
