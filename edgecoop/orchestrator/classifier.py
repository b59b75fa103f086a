"""The Classifier Engine: what does a task need?

For each task: the intent (hence cooperation types, collaboration shape, whether the edge can serve it),
its slots (quantity, place, aggregation), the domain, difficulty and privacy class.

Two classifiers stand behind one interface:

* :class:`RuleClassifier` - lexical rules; microseconds, no model. The default.
* :class:`SlmClassifier` - a small language model picks the intent under a GBNF grammar that only admits
  the known intent labels (so its output can never name anything else); slots still come from the lexical
  extractor. Selectable, and measured against the same labelled set (``edgecoop bench classifier``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from edgecoop.orchestrator.intents import INTENTS, QUANTITIES, Intent

__all__ = ["Classification", "Classifier", "RuleClassifier", "SlmClassifier", "match_place"]

_AREA = re.compile(
    r"\b(across|all (the )?(stations|sensors|sites)|district|city[- ]?wide|citywide|every|each|everywhere|whole city|overall)\b"
)
_CHECK = re.compile(
    r"\b(limit|limits|safe|unsafe|exceed|exceeds|exceeding|above|below|too (high|low)|legal|illegal|normal|abnormal|"
    r"healthy|ok|okay|dangerous|concerning|worrying|within|guideline|guidelines|threshold|alarming|worry)\b"
)
_VEHICLE = re.compile(r"\b(vehicles?|cars?|trucks?|lorries|traffic)\b")
_COUNT = re.compile(r"\b(how many|count|number of|passing|passed)\b")
_CONGESTION = re.compile(
    r"\b(congest\w*|jam\w*|gridlock\w*|reroute|re-route|divert\w*|detour\w*|backed up|standstill)\b"
)
_VITALS = re.compile(
    r"\b(vitals|vital signs|all (my )?readings|overview of my|summar\w+ (of )?my|how am i doing|health status)\b"
)
# documents asked for by name: these win even when a place is mentioned
_DOCS = re.compile(
    r"\b(according to|regulations?|procedures?|polic(y|ies)|definition|defined|rules? (for|about|on)|"
    r"what does [\w\s-]{0,30}(say|recommend)|what should (i|we) do|what is [\w\s-]{0,30} used for)\b"
)
# weaker cues: a limit or guideline asked for without a place or a live reading
_KNOWLEDGE = re.compile(
    r"\b(guidelines?|what (is|are) the [\w\s.-]{0,40}?(limit|limits|threshold|thresholds|range)|when should|how should)\b"
)
_HEALTH = re.compile(
    r"\b(health|medical|clinic\w*|doctor|nurse|blood|pain|medication|medicine|tachycardia|bradycardia|news2|fever|"
    r"disease|symptoms?|emergency|headache|antibiotics?|rash|tumou?r|diagnos\w*|patient|vitals?|anxiety|oxygen|pulse)\b"
)
_BUS = re.compile(r"\b(bus|buses|bus line|transit)\b")
_LIVE = re.compile(
    r"\b(now|right now|currently|current|today|at the moment|latest|live|this minute|last \d+ ?(s|sec|seconds|min|minutes))\b"
)
_MAX = re.compile(r"\b(highest|max|maximum|peak|worst)\b")
_MIN = re.compile(r"\b(lowest|min|minimum|best|cleanest)\b")
_MEAN = re.compile(r"\b(average|mean|typical)\b")
_WINDOW = re.compile(r"\blast (\d+) ?(s|sec|secs|seconds|min|mins|minutes)\b")
_PERSONAL = re.compile(r"\b(my|mine|me|i am|i'm|patient|diagnos\w*|medication|symptom\w*)\b")
_WORD = re.compile(r"[a-z0-9.]+")
_STOP = frozenset(
    ["the", "a", "an", "of", "in", "at", "on", "near", "by", "to", "for", "is", "are", "what", "how", "many", "there"]
)


@dataclass(frozen=True, slots=True)
class Classification:
    intent: Intent
    cooperation: tuple[str, ...]
    shape: str
    domain: str
    difficulty: str
    privacy: str
    edge_capable: bool
    quantity: str | None = None
    place: str | None = None
    agg: str = "latest"
    window_s: int = 0
    area: bool = False
    confidence: float = 1.0
    classifier: str = "rule"
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["intent"] = self.intent.value
        d["cooperation"] = list(self.cooperation)
        return d


class Classifier(Protocol):
    name: str

    def classify(self, question: str, *, places: Sequence[str] = (), privacy: str | None = None) -> Classification: ...


def _tokens(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if w not in _STOP and len(w) > 2}


def match_place(question: str, places: Sequence[str]) -> str | None:
    """The known place whose name shares the most (distinctive) words with the question."""
    q = _tokens(question)
    best, best_score = None, 0.0
    for place in places:
        words = _tokens(place)
        if not words:
            continue
        common = q & words
        # stems: "station" ~ "stations", "harbour" ~ "harbor"
        common |= {
            w for w in words for t in q if len(w) > 4 and (t.startswith(w[:5]) or w.startswith(t[:5])) and len(t) > 4
        }
        score = len(common) / len(words) + 0.01 * len(common)
        if common and score > best_score:
            best, best_score = place, score
    return best


def _quantity(q: str) -> str | None:
    found = [
        (q.find(w), name)
        for name, spec in QUANTITIES.items()
        for w in spec.words
        if re.search(rf"\b{re.escape(w)}\b", q)
    ]
    if not found:
        return None
    return min(found)[1]


class RuleClassifier:
    """Lexical rules over the question, plus the known place names from the CMS cards."""

    name = "rule"

    def classify(self, question: str, *, places: Sequence[str] = (), privacy: str | None = None) -> Classification:
        q = " ".join(question.lower().split())
        quantity = _quantity(q)
        area = bool(_AREA.search(q))
        place = match_place(q, places)
        if area and place is not None and place.lower() not in q:
            place = None  # "across all stations" names no station
        area = area and place is None
        agg = "max" if _MAX.search(q) else "min" if _MIN.search(q) else "mean" if _MEAN.search(q) else "latest"
        m = _WINDOW.search(q)
        window_s = 0
        if m:
            window_s = int(m.group(1)) * (60 if m.group(2).startswith("m") else 1)
            agg = "mean" if agg == "latest" else agg
        vehicles = bool(_VEHICLE.search(q))
        live, personal = bool(_LIVE.search(q)), bool(_PERSONAL.search(q))
        about_me = personal and quantity is not None
        asks_docs = (
            not live and not about_me and (bool(_DOCS.search(q)) or (bool(_KNOWLEDGE.search(q)) and place is None))
        )
        if asks_docs:
            intent = Intent.KNOWLEDGE
        elif _CONGESTION.search(q) and (vehicles or _BUS.search(q) or place):
            intent = Intent.CONGESTION
        elif vehicles and (_COUNT.search(q) or place) and quantity != "traffic_flow":
            intent = Intent.COUNT_VEHICLES
        elif _VITALS.search(q):
            intent = Intent.VITALS_SUMMARY
        elif quantity and _CHECK.search(q):
            intent = Intent.READING_CHECK
        elif quantity and area:
            intent = Intent.AREA_READING
        elif quantity and (live or place or personal or agg != "latest" or "what is the" in q):
            intent = Intent.READING
        elif quantity and not personal:
            intent = Intent.KNOWLEDGE
        else:
            intent = Intent.OPEN
        return _finish(intent, q, quantity, place, agg, window_s, area, privacy, self.name, 1.0)


def _finish(
    intent: Intent, q: str, quantity: str | None, place: str | None, agg: str, window_s: int, area: bool,
    privacy: str | None, name: str, confidence: float,
) -> Classification:  # fmt: skip
    spec = INTENTS[intent]
    domain = QUANTITIES[quantity].domain if quantity else ("traffic" if _VEHICLE.search(q) else "general")
    if intent is Intent.VITALS_SUMMARY:
        domain = "health"
    if domain == "general" and _HEALTH.search(q):
        domain = "health"
    # Health data never leaves the edge: the privacy class is derived, and a caller may only make it stricter.
    derived = "private" if domain == "health" or privacy == "private" else "public"
    return Classification(
        intent=intent, cooperation=spec.cooperation, shape=spec.shape, domain=domain, difficulty=spec.difficulty,
        privacy=derived, edge_capable=spec.edge_capable, quantity=quantity, place=place, agg=agg, window_s=window_s,
        area=area or intent in (Intent.AREA_READING, Intent.VITALS_SUMMARY), confidence=confidence, classifier=name,
    )  # fmt: skip


_INTENT_HELP = {
    Intent.COUNT_VEHICLES: "count vehicles seen by a street camera",
    Intent.CONGESTION: "is there a traffic jam, should buses be rerouted",
    Intent.READING: "a live sensor value (air quality, bus, heart rate, oxygen, temperature)",
    Intent.READING_CHECK: "is a live sensor value above a limit or abnormal",
    Intent.AREA_READING: "average or maximum of a sensor across the whole district",
    Intent.VITALS_SUMMARY: "summary of all my vital signs",
    Intent.KNOWLEDGE: "what a rule, regulation or guideline says",
    Intent.OPEN: "any other general question",
}


# Hand-written examples for the few-shot prompt (not taken from the labelled evaluation set).
_SHOTS = (
    ("How many cars went past the bridge camera?", Intent.COUNT_VEHICLES),
    ("Is the ring road jammed, should the trams be diverted?", Intent.CONGESTION),
    ("What is the humidity at the school right now?", Intent.READING),
    ("Is the noise level at the school above the limit?", Intent.READING_CHECK),
    ("What is the average humidity across all stations?", Intent.AREA_READING),
    ("Give me an overview of all my vital signs.", Intent.VITALS_SUMMARY),
    ("What does the policy say about parking permits?", Intent.KNOWLEDGE),
    ("Write a limerick about a cat.", Intent.OPEN),
)


class SlmClassifier:
    """A small language model chooses the intent, constrained by a GBNF grammar to the known labels.

    Few-shot chat prompt (the system prompt and examples are a constant prefix, so llama.cpp reuses their KV
    cache between calls). Slots (quantity, place, aggregation) still come from the lexical extractor.
    """

    name = "slm"

    def __init__(self, model_path: str, *, n_threads: int = 2) -> None:
        try:
            from llama_cpp import Llama
            from llama_cpp.llama_grammar import LlamaGrammar
        except ImportError as exc:
            from edgecoop.errors import DependencyMissing

            raise DependencyMissing("llama-cpp-python", "llm") from exc
        self._llm = Llama(model_path=model_path, n_ctx=2048, n_threads=n_threads, verbose=False)
        labels = " | ".join(f'"{i.value}"' for i in Intent)
        self._grammar = LlamaGrammar.from_string(f"root ::= {labels}", verbose=False)
        self._rules = RuleClassifier()
        menu = "; ".join(f"{i.value} = {h}" for i, h in _INTENT_HELP.items())
        self._prefix: list[Any] = [{"role": "system", "content": f"Label each request with one label. {menu}."}]
        for q, label in _SHOTS:
            self._prefix += [{"role": "user", "content": q}, {"role": "assistant", "content": label.value}]

    def classify(self, question: str, *, places: Sequence[str] = (), privacy: str | None = None) -> Classification:
        out: Any = self._llm.create_chat_completion(
            messages=[*self._prefix, {"role": "user", "content": question[:500]}],
            grammar=self._grammar, max_tokens=12, temperature=0.0,
        )  # fmt: skip
        label = str(out["choices"][0]["message"]["content"]).strip()
        intent = Intent(label) if label in Intent._value2member_map_ else Intent.OPEN
        base = self._rules.classify(question, places=places, privacy=privacy)
        q = " ".join(question.lower().split())
        return _finish(
            intent, q, base.quantity, base.place, base.agg, base.window_s, base.area, privacy, self.name, 0.5
        )

    def close(self) -> None:
        self._llm.close()
