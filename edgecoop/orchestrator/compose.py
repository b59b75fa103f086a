"""Turns step results into the task's answer: a sentence, plus structured value/decision/sources to check."""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from edgecoop.orchestrator.classifier import Classification
from edgecoop.orchestrator.intents import QUANTITIES, Intent
from edgecoop.orchestrator.plans import VITALS

__all__ = ["Answer", "compose", "judge"]


@dataclass
class Answer:
    text: str
    value: float | None = None
    decision: str | None = None
    sources: list[str] = field(default_factory=list)
    confidence: float = 0.9
    facts: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"answer": self.text, "value": self.value, "decision": self.decision, "sources": self.sources,
                "confidence": round(self.confidence, 3)}  # fmt: skip


def judge(value: float, rule: Mapping[str, Any]) -> str:
    """'above', 'below' or 'within' a rule's limits (max, min or range)."""
    high = rule.get("high", rule.get("value") if rule.get("kind", "max") == "max" else None)
    low = rule.get("low", rule.get("value") if rule.get("kind") == "min" else None)
    if high is not None and value > float(high):
        return "above"
    if low is not None and value < float(low):
        return "below"
    return "within"


def _label(quantity: str | None) -> str:
    q = QUANTITIES.get(quantity or "")
    return (q.label or q.modality.replace("_", " ")) if q else (quantity or "value").replace("_", " ")


def _fmt(v: float) -> str:
    return f"{v:.0f}" if abs(v) >= 100 or float(v).is_integer() else f"{v:.1f}"


def _rule_text(rule: Mapping[str, Any]) -> str:
    if "low" in rule and "high" in rule:
        return f"{_fmt(rule['low'])}–{_fmt(rule['high'])} {rule.get('unit', '')}".strip()
    return f"{_fmt(rule['value'])} {rule.get('unit', '')}".strip()


def compose(c: Classification, results: Mapping[str, Any], question: str) -> Answer:
    place = c.place or "the requested place"
    match c.intent:
        case Intent.COUNT_VEHICLES | Intent.CONGESTION:
            vision = results["vision"]
            count = float(vision["count"])
            conf = float(vision.get("confidence", 0.8))
            text = f"{_fmt(count)} vehicles passed the camera at {place} in the last clip"
            if c.intent is Intent.COUNT_VEHICLES:
                return Answer(text + ".", count, None, [], conf, text)
            rule = results["rule"]
            congested = count >= float(rule["value"])
            decision = "reroute" if congested else "keep"
            advice = "congestion: reroute buses" if congested else "no congestion: keep bus routes"
            facts = f"{text}; the congestion threshold is {_fmt(rule['value'])} vehicles per clip, so {advice}."
            summary = results.get("summary", {}).get("text", "").strip()
            return Answer(facts + (f" Summary: {summary}" if summary else ""), count, decision,
                          [str(rule.get("source", ""))], conf, facts)  # fmt: skip
        case Intent.READING:
            r = results["reading"]
            where = f" at {place}" if c.place else ""
            what = _label(c.quantity) if c.quantity else r.get("sensor", "")
            agg = "" if r.get("n", 1) <= 1 or c.agg == "latest" else f" ({c.agg} of {r['n']} readings)"
            text = f"The {what}{where} is {_fmt(float(r['value']))} {r.get('unit', '')}{agg}.".replace(" .", ".")
            return Answer(text, float(r["value"]), None, [], 0.95, text)
        case Intent.READING_CHECK:
            r, rule = results["reading"], results["rule"]
            value = float(r["value"])
            decision = judge(value, rule)
            what = _label(c.quantity)
            where = f" at {place}" if c.place else ""
            kind = "range" if rule.get("kind") == "range" else "limit"
            text = (f"The {what}{where} is {_fmt(value)} {r.get('unit', '')}, {decision} the {kind} of {_rule_text(rule)}"
                    f" ({rule.get('source', 'knowledge base')}).")  # fmt: skip

            return Answer(text, value, decision, [str(rule.get("source", ""))], 0.95, text)
        case Intent.AREA_READING:
            rows = [(a, float(r["value"])) for a, r in results["readings"]]
            values = [v for _, v in rows]
            agg = c.agg if c.agg in ("max", "min") else "mean"
            value = max(values) if agg == "max" else min(values) if agg == "min" else statistics.fmean(values)
            unit = results["readings"][0][1].get("unit", "")
            per = ", ".join(f"{a}: {_fmt(v)}" for a, v in sorted(rows))
            text = f"The {agg} {_label(c.quantity)} across {len(rows)} stations is {_fmt(value)} {unit} ({per})."
            return Answer(text, value, None, [], 0.95 if len(rows) > 1 else 0.6, text)
        case Intent.VITALS_SUMMARY:
            parts, flags = [], []
            for v in VITALS:
                r = results.get(f"vital:{v}")
                if not r:
                    continue
                rule = results.get(f"rule:{v}")
                d = judge(float(r["value"]), rule) if rule else "within"
                parts.append(f"{_label(v)} {_fmt(float(r['value']))} {r.get('unit', '')}".strip())
                if d != "within":
                    flags.append(f"{_label(v)} is {d} the guideline range")
            decision = "attention" if flags else "normal"
            facts = (
                "Vitals: "
                + ", ".join(parts)
                + ". "
                + ("; ".join(flags) + "." if flags else "All within guideline ranges.")
            )
            summary = results.get("summary", {}).get("text", "").strip()
            return Answer(facts + (f" Summary: {summary}" if summary else ""), None, decision, [], 0.9, facts)
        case Intent.KNOWLEDGE:
            k = results["knowledge"]
            passages = k.get("passages", [])
            sources = [str(p.get("doc", "")) for p in passages]
            text = str(k.get("answer") or (passages[0]["text"] if passages else "No passage found."))
            conf = float(k.get("confidence", 0.7 if passages else 0.1))
            return Answer(text, None, None, sources, conf, text)
        case _:
            r = results.get("cloud") or results.get("slm") or {}
            text = str(r.get("text", "")).strip() or "(no answer)"
            # an unaided 135M-parameter model's open answer is a guess; the cloud tier is trusted
            conf = 0.95 if "cloud" in results else 0.3
            return Answer(text, None, None, [], conf, text)
