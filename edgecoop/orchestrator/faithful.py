"""The faithfulness gate: a text a model wrote may be sent only when what it states comes from the facts.

The facts are what the cooperation produced (values, places, limits, decisions, cited passages) and the
deterministic answer built from them. A written text passes when

* every number in it is one of the facts' numbers (or a rounding of one: 23 for 23.4, never 23.5),
* every place of the edge it names is a place the facts are about,
* every verdict word it uses (above, below, within, exceeds) is the facts' verdict, never negated, and the
  facts' decision, when there is one, is stated,
* the facts' main value is stated,
* cited passages exist ([n] within the passages given) and a passage answer cites at least one, and
* most of its content words occur in the facts (no invented claims in prose).

It is a pure function over text; the writer (:mod:`.writer`) sends the deterministic answer when it fails.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = ["Facts", "Verdict", "check", "numbers_in"]

_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?")
_WORD = re.compile(r"[a-z][a-z'-]*")
_CITE = re.compile(r"\[(\d+)\]")
_NUMBER_WORDS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
                 "sixteen seventeen eighteen nineteen twenty")  # fmt: skip
_WORD_NUMBERS = {w: float(i) for i, w in enumerate(_NUMBER_WORDS.split())}
#: verdict words and the verdict they state; a text may only use the facts' own
_VERDICTS = {"above": "above", "exceeds": "above", "exceeded": "above", "exceeding": "above", "exceed": "above",
             "below": "below", "within": "within"}  # fmt: skip
_NEGATIONS = frozenset({"not", "no", "never", "isn't", "aren't", "wasn't", "doesn't", "didn't", "nor"})
#: words that carry no claim; everything else a text says must occur in the facts (or the question)
_FILLER_WORDS = (
    "the a an and or of in on at to is are was were be been it its this that these those for with from as by "
    "there their which what who has have had than then so currently now right current level levels value "
    "reading readings measured reports reported shows according about approximately around just data latest "
    "here today passage passages source sources answer question"
)
_FILLER = frozenset(_FILLER_WORDS.split())
#: share of a text's content words that must occur in the facts
MIN_SUPPORT = 0.7


@dataclass(frozen=True, slots=True)
class Facts:
    """What a written answer may state. ``text``: the deterministic answer (and any cited passages' text)."""

    text: str
    numbers: frozenset[float]
    places: frozenset[str]  # lower case: places the facts are about
    known_places: frozenset[str]  # lower case: every place the edge knows (naming another one is invented)
    verdicts: frozenset[str]  # above / below / within the facts state
    decision: str | None = None
    main_value: float | None = None
    citations: int = 0  # passages numbered [1]..[n] in the prompt; a passage answer must cite one
    question: str = ""

    @classmethod
    def build(cls, text: str, *, values: Iterable[float] = (), decision: str | None = None,
              main_value: float | None = None, known_places: Iterable[str] = (), citations: int = 0,
              question: str = "") -> Facts:  # fmt: skip
        known = frozenset(p.lower() for p in known_places if p)
        low = text.lower()
        words = _WORD.findall(low)
        return cls(
            text=text,
            # the asker's own numbers ("over the last 10 minutes") may be repeated; they are not measurements
            numbers=frozenset(numbers_in(text)) | frozenset(float(v) for v in values) | frozenset(numbers_in(question)),
            places=frozenset(p for p in known if _has_phrase(low, p)),
            known_places=known,
            verdicts=frozenset(_VERDICTS[w] for w in words if w in _VERDICTS),
            decision=decision,
            main_value=main_value,
            citations=citations,
            question=question,
        )


@dataclass(frozen=True, slots=True)
class Verdict:
    ok: bool
    reason: str = ""


def numbers_in(text: str) -> list[float]:
    """Digits and the number words up to twenty."""
    out = [float(m) for m in _NUMBER.findall(text)]
    out += [_WORD_NUMBERS[w] for w in _WORD.findall(text.lower()) if w in _WORD_NUMBERS]
    return out


def _decimals(token: str) -> int:
    return len(token.split(".", 1)[1]) if "." in token else 0


def _is_rounding(token: str, facts: Iterable[float]) -> bool:
    n = float(token)
    half = 0.5 * 10 ** -_decimals(token) + 1e-9
    return any(abs(n - f) <= half for f in facts)


def _has_phrase(text: str, phrase: str) -> bool:
    return re.search(rf"(?<![a-z0-9]){re.escape(phrase)}(?![a-z0-9])", text) is not None


def _stated(text: str, value: float) -> bool:
    return any(abs(n - value) <= 0.5 * 10 ** -_decimals(t) + 1e-9
               for t in _NUMBER.findall(text) for n in (float(t),)) or value in numbers_in(text)  # fmt: skip


def check(text: str, facts: Facts) -> Verdict:
    """Whether ``text`` states only what ``facts`` hold (see the module docstring)."""
    stripped = text.strip()
    if not stripped:
        return Verdict(False, "empty text")
    low = stripped.lower()
    body = _CITE.sub(" ", stripped)  # citation markers are not numbers
    for token in _NUMBER.findall(body):
        if not _is_rounding(token, facts.numbers):
            return Verdict(False, f"number {token} is not in the facts")
    for w in _WORD.findall(low):
        if w in _WORD_NUMBERS and _WORD_NUMBERS[w] not in facts.numbers:
            return Verdict(False, f"number {w!r} is not in the facts")
    for place in facts.known_places - facts.places:
        if _has_phrase(low, place):
            return Verdict(False, f"place {place!r} is not in the facts")
    words = _WORD.findall(low)
    for i, w in enumerate(words):
        if w in _VERDICTS:
            if _VERDICTS[w] not in facts.verdicts:
                return Verdict(
                    False, f"verdict {w!r} is not the facts' ({', '.join(sorted(facts.verdicts)) or 'none'})"
                )
            if _NEGATIONS & set(words[max(0, i - 3) : i]):
                return Verdict(False, f"verdict {w!r} is negated")
    if (
        facts.decision
        and facts.decision.lower() not in low
        and not (facts.verdicts & {_VERDICTS.get(w) for w in words})
    ):
        return Verdict(False, f"decision {facts.decision!r} is not stated")
    if facts.main_value is not None and not _stated(body, facts.main_value):
        return Verdict(False, f"the value {facts.main_value:g} is not stated")
    cited = [int(n) for n in _CITE.findall(stripped)]
    if any(not 1 <= n <= facts.citations for n in cited):
        return Verdict(False, f"cites a passage that was not given ({cited})")
    if facts.citations and not cited:
        return Verdict(False, "cites no passage")
    support = _support(words, facts)
    if support < MIN_SUPPORT:
        return Verdict(False, f"only {support:.0%} of its words occur in the facts")
    return Verdict(True)


def _support(words: Sequence[str], facts: Facts) -> float:
    content = [w for w in words if w not in _FILLER and len(w) > 2 and w not in _WORD_NUMBERS]
    if not content:
        return 1.0
    known = set(_WORD.findall(f"{facts.text} {facts.question}".lower()))
    stems = {w[:5] for w in known}
    found = sum(1 for w in content if w in known or w[:5] in stems)
    return found / len(content)
