"""One small object per operation: the plan it needs from the discovered capabilities, and the answer it writes.

Plans name capability kinds, modalities, places and (for look-ups) the chosen knowledge agent; the engine finds
the agents in the CMS. Limits come from rulebooks by the modality they declare they bind to, so a new limit is a
line in a rulebook, not code.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from edgecoop.orchestrator.compose import Answer, fmt, judge, rule_text
from edgecoop.orchestrator.plans import Plan, Results, Step
from edgecoop.orchestrator.spec import Operation, Target, TaskSpec
from edgecoop.orchestrator.text import similar, tokens
from edgecoop.orchestrator.vocabulary import Vocabulary, lexicon

__all__ = ["OPERATIONS", "OperationKind", "UnservableError"]


class UnservableError(ValueError):
    """The results do not let the edge answer (no limit bound to the modality, nothing measured)."""


def _sensor_input(t: Target) -> dict[str, Any]:
    if t.agg == "latest" and not t.window_s:
        return {"op": "latest", "modality": t.modality}
    return {"op": "window", "modality": t.modality, "seconds": t.window_s or 60,
            "agg": t.agg if t.agg != "latest" else "mean"}  # fmt: skip


def _is_object(t: Target) -> bool:
    return t.modality in lexicon().objects


def _read_steps(spec: TaskSpec, question: str) -> tuple[Step, ...]:
    return tuple(
        Step(f"read:{i}", "sensor", _sensor_input(t), modality=t.modality, need=f"{t.place or ''} {question}".strip(),
             timeout_s=5, place=t.place, private_only=spec.personal and t.place is None)
        for i, t in enumerate(spec.targets)
    )  # fmt: skip


def _count_stages(t: Target, question: str, key: str = "") -> list[tuple[Step, ...]]:
    """The camera's stream, then a vision agent's count of it; ``key`` tells several cameras' steps apart."""
    op = lexicon().objects[t.modality][0]

    def vision_input(results: Results) -> dict[str, Any]:
        stream = dict(results[f"camera{key}"])
        stream.pop("location", None)
        return {"op": op, **stream}

    camera = Step(f"camera{key}", "camera", {"op": "stream"}, modality="camera", need=f"{t.place} {question}",
                  timeout_s=5, place=t.place)  # fmt: skip
    vision = Step(f"vision{key}", "vision", vision_input, need=f"{op.replace('_', ' ')} camera video", timeout_s=15)
    return [(camera,), (vision,)]


def _confident_count(v: Mapping[str, Any]) -> float:
    if float(v.get("confidence", 0.0)) < MIN_VISION_CONFIDENCE:
        raise UnservableError(f"the vision agent is not confident of its count ({v.get('confidence')}); "
                              "no answer is better than a wrong one")  # fmt: skip
    return float(v["count"])


def _rule_step(modality: str, name: str = "rule", *, optional: bool = False) -> Step:
    # every rulebook is asked for the limits bound to the modality; the answer keeps the ones for this data
    return Step(name, "rulebook", {"op": "limits", "modality": modality}, fanout=True, timeout_s=5, optional=optional)


def _summary_step() -> Step:
    def prompt(results: Results) -> dict[str, Any]:
        return {"system": "You are a concise assistant. Summarise the facts for an operator in one sentence.",
                "prompt": f"Facts: {results.get('_facts', '')}\nOne-sentence summary:", "max_tokens": 40}  # fmt: skip

    return Step("summary", "slm", prompt, optional=True, timeout_s=20)


def _value(r: Mapping[str, Any]) -> float:
    if r.get("value") is None:
        raise UnservableError(f"the agent returned no value ({r.get('error') or 'no samples yet'})")
    return float(r["value"])


def _pick_rule(rules: Sequence[tuple[str, Mapping[str, Any]]], domains: set[str] | None) -> Mapping[str, Any] | None:
    """The default rule bound to the data's domain (or to no domain), from every rulebook's answer."""
    found = [r for _agent, res in rules for r in res.get("rules", [])]
    fitting = [r for r in found if domains is None or not r.get("domain") or r.get("domain") in domains]
    fitting.sort(key=lambda r: not r.get("default", False))
    return fitting[0] if fitting else None


class OperationKind:
    operation: ClassVar[Operation]

    def plan(self, spec: TaskSpec, question: str, *, summarize: bool = False) -> Plan:
        raise NotImplementedError

    def answer(self, spec: TaskSpec, results: Results, vocab: Vocabulary) -> Answer:
        raise NotImplementedError


class Read(OperationKind):
    operation = Operation.READ

    def plan(self, spec: TaskSpec, question: str, *, summarize: bool = False) -> Plan:
        return Plan((_read_steps(spec, question),), "single" if len(spec.targets) == 1 else "parallel", "edge")

    def answer(self, spec: TaskSpec, results: Results, vocab: Vocabulary) -> Answer:
        parts, values = [], {}
        for i, t in enumerate(spec.targets):
            r = results[f"read:{i}"]
            v = _value(r)
            q = vocab.quantities.get(t.modality)
            label = q.label_at(t.place) if q else t.modality
            agg = (
                ""
                if t.agg == "latest" and not t.window_s
                else f" ({t.agg} over {r.get('seconds', t.window_s or 60)} s)"
            )
            where = t.place or r.get("location") or "your device"
            parts.append(f"the {label} at {where} is {fmt(v)} {r.get('unit', '')}{agg}".replace(" )", ")").strip())
            values[f"{t.modality}@{t.place}"] = v
        text = "; ".join(parts)
        text = text[0].upper() + text[1:] + "."
        first = next(iter(values.values()))
        return Answer(text, first, None, [], 0.95, text, values=values if len(values) > 1 else {})


class Check(OperationKind):
    operation = Operation.CHECK

    def plan(self, spec: TaskSpec, question: str, *, summarize: bool = False) -> Plan:
        t = spec.targets[0]
        # with the user's number the rulebook still says which way the quantity's bound points ("PM2.5 under 10?"
        # is an upper bound of 10, "SpO2 below 93?" a lower one); the words decide only where no rule exists
        rule = (_rule_step(t.modality, optional=spec.limit is not None),)  # the user's number needs no rulebook
        if _is_object(t):
            stages = _count_stages(t, question)
            stages[1] += rule
            if summarize:
                stages.append((_summary_step(),))
            return Plan(tuple(stages), "sequential", "edge")
        return Plan(((*_read_steps(spec, question)[:1], *rule),), "parallel", "edge")

    def answer(self, spec: TaskSpec, results: Results, vocab: Vocabulary) -> Answer:
        t = spec.targets[0]
        if _is_object(t):
            value = float(results["vision"]["count"])
            what, unit = t.modality, ""
            domains: set[str] | None = None  # a rule bound to a counted object applies to every camera
        else:
            r = results["read:0"]
            value = _value(r)
            q = vocab.quantities.get(t.modality)
            what, unit = (q.label_at(t.place) if q else t.modality), str(r.get("unit", ""))
            domains = q.place_domains.get(t.place or str(r.get("location", "")), set()) if q else set()
        if spec.limit is not None:
            bound = _pick_rule(results.get("rule", []), domains)
            kind = str(bound.get("kind")) if bound is not None and bound.get("kind") in ("max", "min") else None
            rule: Mapping[str, Any] = {"kind": kind or spec.limit.kind, "value": spec.limit.value, "unit": unit,
                                       "source": "your limit"}  # fmt: skip
        else:
            picked = _pick_rule(results.get("rule", []), domains)
            if picked is None:
                if _is_object(t):
                    raise UnservableError(f"no rulebook states a threshold for {what}; ask with your own limit")
                # the value is a fact; the judgement needs a limit nobody stated: say so instead of judging
                text = (f"The {what} at {t.place or results['read:0'].get('location', 'your device')} is {fmt(value)} "
                        f"{unit}; no rulebook at the edge states a limit for it (ask with your own, e.g. "
                        f"'above {fmt(value)}?').")  # fmt: skip
                return Answer(text, value, "no_limit", [], 0.9, text)
            rule = picked
        verdict = judge(value, rule)
        decision = str(rule.get(verdict, verdict))
        kind = {"range": "range", "min": "minimum"}.get(str(rule.get("kind")), "limit")
        verdict_text = "above" if verdict == "within" and kind == "minimum" else verdict
        source = str(rule.get("source", "knowledge base"))
        if _is_object(t):
            facts = (f"{fmt(value)} {what} passed the camera at {t.place} in the last clip; the threshold is "
                     f"{rule_text(rule)}, so: {decision}.")  # fmt: skip
        else:
            where = t.place or results["read:0"].get("location") or "your device"
            facts = (f"The {what} at {where} is {fmt(value)} {unit}, {verdict_text} the {kind} of {rule_text(rule)} "
                     f"({source}).")  # fmt: skip
        summary = str(results.get("summary", {}).get("text", "")).strip()
        text = facts + (f" Summary: {summary}" if summary else "")
        return Answer(text, value, decision, [source], 0.95, facts)


class Aggregate(OperationKind):
    operation = Operation.AGGREGATE

    def plan(self, spec: TaskSpec, question: str, *, summarize: bool = False) -> Plan:
        t = spec.targets[0]
        inp = _sensor_input(Target(t.modality, None, "latest" if t.agg in ("max", "min", "mean") and not t.window_s
                                   else t.agg, t.window_s))  # fmt: skip
        s = Step("readings", "sensor", inp, modality=t.modality, fanout=True, timeout_s=5)
        return Plan(((s,),), "parallel", "edge")

    def answer(self, spec: TaskSpec, results: Results, vocab: Vocabulary) -> Answer:
        t = spec.targets[0]
        q = vocab.quantities.get(t.modality)
        rows: list[tuple[str, float, str]] = []
        for agent, r in results["readings"]:
            if r.get("value") is None:
                continue
            rows.append((str(r.get("location") or agent), float(r["value"]), str(r.get("unit", ""))))
        if not rows:
            raise UnservableError("no agent returned a value")
        values = [v for _, v, _ in rows]
        unit = rows[0][2]
        label = q.name if q else t.modality
        per = ", ".join(f"{p}: {fmt(v)}" for p, v, _ in sorted(rows))
        if t.agg in ("max", "min"):
            where, value, _u = (max if t.agg == "max" else min)(rows, key=lambda r: r[1])
            word = "highest" if t.agg == "max" else "lowest"
            text = f"The {word} {label} is at {where}: {fmt(value)} {unit} ({per})."
        else:
            value = statistics.fmean(values)
            text = f"The mean {label} across {len(rows)} places is {fmt(value)} {unit} ({per})."
        return Answer(text, value, None, [], 0.95 if len(rows) > 1 else 0.6, text,
                      values={p: v for p, v, _ in rows})  # fmt: skip


class Compare(OperationKind):
    operation = Operation.COMPARE

    def plan(self, spec: TaskSpec, question: str, *, summarize: bool = False) -> Plan:
        if _is_object(spec.targets[0]):  # every camera's stream at once, then every count at once
            per = [_count_stages(t, question, f":{i}") for i, t in enumerate(spec.targets)]
            return Plan((tuple(p[0][0] for p in per), tuple(p[1][0] for p in per)), "parallel", "edge")
        return Plan((_read_steps(spec, question),), "parallel", "edge")

    def answer(self, spec: TaskSpec, results: Results, vocab: Vocabulary) -> Answer:
        if _is_object(spec.targets[0]):
            rows = [(t.place or "", _confident_count(results[f"vision:{i}"]), "") for i, t in enumerate(spec.targets)]
            label = f"number of {spec.targets[0].modality} seen by the camera"
        else:
            rows = [(t.place or "", _value(results[f"read:{i}"]), str(results[f"read:{i}"].get("unit", "")))
                    for i, t in enumerate(spec.targets)]  # fmt: skip
            q = vocab.quantities.get(spec.targets[0].modality)
            label = q.name if q else spec.targets[0].modality
        hi = max(rows, key=lambda r: r[1])
        lo = min(rows, key=lambda r: r[1])
        per = ", ".join(f"{p} {fmt(v)} {u}".strip() for p, v, u in rows)
        if hi[1] == lo[1]:
            text = f"The {label} is the same at {' and '.join(p for p, _, _ in rows)}: {per}."
        else:
            text = f"The {label} is higher at {hi[0]} than at {lo[0]}: {per}."
        return Answer(text, hi[1], hi[0], [], 0.95, text, values={p: v for p, v, _ in rows})


class Count(OperationKind):
    operation = Operation.COUNT

    def plan(self, spec: TaskSpec, question: str, *, summarize: bool = False) -> Plan:
        stages = _count_stages(spec.targets[0], question)
        if summarize:
            stages.append((_summary_step(),))
        return Plan(tuple(stages), "sequential", "edge")

    def answer(self, spec: TaskSpec, results: Results, vocab: Vocabulary) -> Answer:
        t = spec.targets[0]
        v = results["vision"]
        count = _confident_count(v)
        text = f"{fmt(count)} {t.modality} passed the camera at {t.place} in the last clip."
        if t.modality != "vehicles":
            text = f"{fmt(count)} {t.modality} seen by the camera at {t.place} in the last clip."
        return Answer(text, count, None, [], float(v.get("confidence", 0.8)), text)


class Summarise(OperationKind):
    operation = Operation.SUMMARISE

    def plan(self, spec: TaskSpec, question: str, *, summarize: bool = False) -> Plan:
        reads = _read_steps(spec, question)
        rules = tuple(_rule_step(t.modality, f"rule:{t.modality}") for t in spec.targets)
        rules = tuple(Step(r.name, r.kind, r.input, fanout=True, optional=True, timeout_s=5) for r in rules)
        stages: list[tuple[Step, ...]] = [reads + rules]
        if summarize:
            stages.append((_summary_step(),))
        return Plan(tuple(stages), "parallel", "edge")

    def answer(self, spec: TaskSpec, results: Results, vocab: Vocabulary) -> Answer:
        parts, flags = [], []
        for i, t in enumerate(spec.targets):
            r = results.get(f"read:{i}")
            if not r or r.get("value") is None:
                continue
            q = vocab.quantities.get(t.modality)
            label = q.label_at(t.place) if q else t.modality
            value = float(r["value"])
            rule = _pick_rule(
                results.get(f"rule:{t.modality}", []),
                q.place_domains.get(t.place or str(r.get("location", "")), set()) if q else set(),
            )
            parts.append(f"{label} {fmt(value)} {r.get('unit', '')}".strip())
            if rule and judge(value, rule) != "within":
                flags.append(
                    f"{label} is {judge(value, rule)} the guideline {'range' if rule.get('kind') == 'range' else 'limit'} ({rule_text(rule)})"
                )
        if not parts:
            raise UnservableError("no vital sign could be read")
        decision = "attention" if flags else "normal"
        facts = (
            "Vitals: " + ", ".join(parts) + ". " + ("; ".join(flags) + "." if flags else "All within guideline ranges.")
        )
        summary = str(results.get("summary", {}).get("text", "")).strip()
        return Answer(facts + (f" Summary: {summary}" if summary else ""), None, decision, [], 0.9, facts)


#: below this a camera count is not given as an answer
MIN_VISION_CONFIDENCE = 0.5
#: a fanned-out look-up answers only from a passage holding at least this share of the question's content words
MIN_SUPPORT = 0.5
#: an open question is answered from the edge's documents only with stronger support than a look-up needs
MIN_SUPPORT_OPEN = 0.75
#: the agent the parser chose must still hold a third of the question's content words in its top passage: its
#: retrieval always returns something, and a passage about something else is a wrong answer, not an answer
MIN_SUPPORT_NAMED = 0.34


def knowledge_step(question: str, agent: str | None, *, optional: bool = False) -> Step:
    """One named knowledge agent, or (``agent`` None) every knowledge agent in parallel."""
    return Step(
        "knowledge",
        "knowledge",
        {"question": question, "k": 3},
        need=question if agent else "",
        agent=agent,
        fanout=agent is None,
        optional=optional,
    )


def support(question: str, result: Mapping[str, Any], *, two_words: bool = True) -> float:
    """The share of the question's content words found in the top passage (its title and text): agents' own
    retrieval scores are not comparable across agents, and a passage sharing one word is no answer."""
    lex = lexicon()
    content = {w for w in tokens(question) if w not in lex.stopwords and len(w) > 2}
    passages = result.get("passages") or []
    if not content or not passages:
        return 0.0
    top = passages[0]
    words = set(tokens(f"{top.get('title', '')} {top.get('text', '')} {Path(str(top.get('doc', ''))).stem}"))
    found = {w for w in content if any(similar(w, t) for t in words)}
    if two_words and len(content) >= 2 and len(found) < 2:
        return 0.0
    return len(found) / len(content)


def best_passages(
    results: Results, question: str = "", *, min_support: float = MIN_SUPPORT
) -> Mapping[str, Any] | None:
    """The knowledge result to answer from: the named agent's, or the best-supported of a fan-out."""
    k = results.get("knowledge")
    if k is None:
        return None
    if isinstance(k, list):  # fan-out: (agent, result) pairs
        scored = sorted(((support(question, r), float(r.get("confidence", 0.0)), i) for i, (_a, r) in enumerate(k)),
                        reverse=True)  # fmt: skip
        if not scored or scored[0][0] < min_support:
            return None
        best: Mapping[str, Any] = k[scored[0][2]][1]
        return best
    found: Mapping[str, Any] = k
    if not found.get("passages"):
        return None
    if question and support(question, found, two_words=False) < min(min_support, MIN_SUPPORT_NAMED):
        return None
    return found


class Lookup(OperationKind):
    operation = Operation.LOOKUP

    def plan(self, spec: TaskSpec, question: str, *, summarize: bool = False) -> Plan:
        return Plan(((knowledge_step(question, spec.knowledge_agent),),), "single", "edge")

    def answer(self, spec: TaskSpec, results: Results, vocab: Vocabulary) -> Answer:
        k = best_passages(results, str(results.get("_question", "")))
        if k is None:
            raise UnservableError("no knowledge agent found a passage that answers this")
        passages = k.get("passages", [])
        if not passages:
            raise UnservableError(f"{spec.knowledge_agent} found no passage that answers this")
        sources = [str(p.get("doc", "")) for p in passages]
        text = str(k.get("answer") or passages[0]["text"])
        return Answer(text, None, None, sources, float(k.get("confidence", 0.7)), text)


class Open(OperationKind):
    operation = Operation.OPEN

    def answer(self, spec: TaskSpec, results: Results, vocab: Vocabulary) -> Answer:
        r = results.get("cloud") or results.get("slm") or {}
        text = str(r.get("text", "")).strip() or "(no answer)"
        # an unaided 135M-parameter model's open answer is a guess; the cloud tier is the strong model
        return Answer(text, None, None, [], 0.95 if "cloud" in results else 0.3, text)


OPERATIONS: dict[Operation, OperationKind] = {
    k.operation: k() for k in (Read, Check, Aggregate, Compare, Count, Summarise, Lookup, Open)
}
