"""The edge writer: an SLM agent writes the final answer from the structured facts, and the gate decides.

The deterministic answer (an f-string over computed values) is always built first. Where an SLM agent exists,
:class:`AnswerWriter` asks it for one sentence from those facts (values, places, limits, decision) or, for a
knowledge answer, from the retrieved passages, numbered so the text can cite them. The faithfulness gate
(:mod:`.faithful`) checks the text; a text that fails is never sent: the deterministic answer is, and the failure
is counted (``AnswerWriter.counters``).
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from edgecoop.orchestrator.compose import Answer
from edgecoop.orchestrator.faithful import Facts, Verdict, check
from edgecoop.orchestrator.operations import best_passages
from edgecoop.orchestrator.plans import Plan, Step

__all__ = ["AnswerWriter", "Draft", "WriterCounters"]

log = logging.getLogger(__name__)

FACTS_SYSTEM = ("You write the answer for an operator in one short sentence. Use only the facts given. Copy every "
                "number, unit and place exactly as written. Add nothing else.")  # fmt: skip
PASSAGES_SYSTEM = ("Answer the question in one or two sentences using only the passages given, and cite the passage "
                   "you used like [1]. Add nothing else.")  # fmt: skip
MAX_TOKENS = 64
MAX_PASSAGES = 3
MAX_PASSAGE_CHARS = 400
STEP_TIMEOUT_S = 20.0
#: answers the writer leaves alone: refusals, questions back, and texts a model wrote already
_NOT_WRITTEN = frozenset({"refused", "clarify"})
_CITE = re.compile(r"\[(\d+)\]")


@dataclass
class WriterCounters:
    drafts: int = 0  # texts asked of an SLM agent
    passed: int = 0  # written texts the gate let through (sent)
    failed: int = 0  # written texts the gate stopped (the deterministic answer was sent)
    no_text: int = 0  # the SLM agent failed or answered nothing (the deterministic answer was sent)

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclass(frozen=True, slots=True)
class Draft:
    """What one answer's writing needs: the SLM step and the facts its text is checked against."""

    plan: Plan
    facts: Facts
    sources: tuple[str, ...] = ()  # the cited passages' documents, [1]..[n]
    summary: str = ""  # an SLM summary already in the deterministic text (the summarize option): gated too
    started: float = field(default_factory=time.monotonic)


def _passages(results: Mapping[str, Any], question: str) -> list[Mapping[str, Any]]:
    k = best_passages(results, question)
    return list((k or {}).get("passages") or [])[:MAX_PASSAGES]


class AnswerWriter:
    """Drafts the SLM step for an answer and accepts the written text only through the gate."""

    def __init__(self) -> None:
        self.counters = WriterCounters()

    def wants(self, answer: Answer, results: Mapping[str, Any]) -> bool:
        if answer.decision in _NOT_WRITTEN or not answer.facts.strip():
            return False
        return not ({"slm", "cloud"} & results.keys())  # an open answer is a model's text already

    def draft(self, question: str, answer: Answer, results: Mapping[str, Any], known_places: Iterable[str], *,
              agent: str | None = None, timeout_s: float = STEP_TIMEOUT_S) -> Draft:  # fmt: skip
        """``agent``: the SLM agent the planner chose (modelchoice.py), None = any; ``timeout_s``: the most the
        writing may add to the task (past it the deterministic answer is sent)."""
        passages = _passages(results, question) if answer.sources and "knowledge" in results else []
        if passages:
            listed = "\n".join(f"[{i}] {p.get('title', '')}: {str(p.get('text', ''))[:MAX_PASSAGE_CHARS]}"
                               for i, p in enumerate(passages, 1))  # fmt: skip
            inp = {"system": PASSAGES_SYSTEM, "prompt": f"Passages:\n{listed}\n\nAnswer from the passages, citing "
                   f"them like [1]: {question}\nAnswer:",
                   "max_tokens": MAX_TOKENS}  # fmt: skip
            facts = Facts.build("\n".join(str(p.get("text", "")) for p in passages) + "\n" + answer.facts,
                                known_places=known_places, citations=len(passages), question=question)  # fmt: skip
            sources = tuple(str(p.get("doc", "")) for p in passages)
        else:
            lines = [answer.facts]
            if answer.decision:
                lines.append(f"Decision: {answer.decision}.")
            # facts first, then the task: asked the question first, a small model answers it from its own priors
            inp = {"system": FACTS_SYSTEM, "prompt": f"Facts: {' '.join(lines)}\n\nRewrite these facts as one "
                   f"sentence for the operator who asked: {question}\nSentence:", "max_tokens": MAX_TOKENS}  # fmt: skip
            values = [v for v in (answer.value, *answer.values.values()) if v is not None]
            facts = Facts.build(" ".join(lines), values=values, decision=answer.decision, main_value=answer.value,
                                known_places=known_places, question=question)  # fmt: skip
            sources = ()
        step = Step("writer", "slm", inp, need="write an answer from facts", optional=True, timeout_s=timeout_s,
                    agent=agent)  # fmt: skip
        summary = str((results.get("summary") or {}).get("text", "")).strip()
        return Draft(Plan(((step,),), "single", "edge"), facts, sources, summary)

    def accept(self, answer: Answer, draft: Draft, result: Mapping[str, Any] | None) -> Answer:
        """The written answer when it passes the gate; otherwise the deterministic one. Both cite their passages."""
        self.counters.drafts += 1
        text = _first_paragraph(str((result or {}).get("text", "")))
        model = str((result or {}).get("model", ""))
        if not text:
            self.counters.no_text += 1
            verdict = Verdict(False, "the SLM agent wrote nothing")
        else:
            verdict = check(text, draft.facts)
        ms = round((time.monotonic() - draft.started) * 1000, 2)
        info = {"model": model, "ms": ms, "gate": "passed" if verdict.ok else f"failed: {verdict.reason}"}
        if verdict.ok:
            self.counters.passed += 1
            # what it replaced stays auditable: the deterministic answer from the same facts
            return dataclasses.replace(
                answer, text=_cited(text, draft.sources), writer=info | {"replaced": answer.text}
            )
        if text:
            self.counters.failed += 1
            log.info("faithfulness gate stopped %s's text (%s): %r", model or "the SLM", verdict.reason, text)
        fallback = answer.text
        if draft.summary and not check(draft.summary, draft.facts).ok:
            fallback = answer.facts  # the summary a model wrote is not sent unchecked either
        if draft.sources:
            fallback = _cited(f"{answer.text} [1]", draft.sources)
        return dataclasses.replace(answer, text=fallback, writer=info)


def _first_paragraph(text: str) -> str:
    """A base model continues past its answer: keep the first non-empty line."""
    return next((line.strip() for line in text.strip().splitlines() if line.strip()), "")


def _cited(text: str, sources: Sequence[str]) -> str:
    """``text`` with the documents its [n] markers cite named after it."""
    cited = sorted({int(n) for n in _CITE.findall(text) if 1 <= int(n) <= len(sources)})
    if not cited:
        return text
    return f"{text} (" + "; ".join(f"[{n}] {sources[n - 1]}" for n in cited) + ")"
