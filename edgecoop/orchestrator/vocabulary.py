"""The orchestrator's vocabulary, learnt from the live capability cards: quantities, places, knowledge sources.

Nothing here names a modality, place or domain: sensors declare their modality, unit, label and the words people
use (``words``); locations declare aliases; knowledge agents declare domains and tags. Distinctive words of a place
name become aliases by themselves ("the park" is City Park when no other place is a park). Names stay known after
their agents leave (vocabulary is not availability), so a question about an agent that is away gets a clear "no
agent" instead of being mistaken for an open question.
"""

from __future__ import annotations

import itertools
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any

from edgecoop.orchestrator.text import tokens

__all__ = ["Knowledge", "Lexicon", "Place", "Quantity", "Vocabulary", "lexicon"]

Phrase = tuple[str, ...]
#: kinds whose agents stand at a place of the edge's world (a cloud region or a control room is not such a place)
DATA_KINDS = frozenset({"sensor", "camera"})


@dataclass(frozen=True)
class Lexicon:
    """The English of operations (``lexicon.toml``): cue phrases per operation, aggregation and topic."""

    operations: dict[str, tuple[Phrase, ...]]
    aggregations: dict[str, tuple[Phrase, ...]]
    window_units: dict[str, int]
    window_phrases: dict[Phrase, int]
    past: tuple[Phrase, ...]
    objects: dict[str, tuple[str, tuple[Phrase, ...]]]  # name -> (vision op, phrases)
    first_person: frozenset[str]
    sensitive: tuple[Phrase, ...]
    public_world: tuple[Phrase, ...]
    general: tuple[Phrase, ...]
    stopwords: frozenset[str]
    actions: tuple[Phrase, ...]
    not_places: frozenset[str]
    place_heads: frozenset[str]
    numbers: dict[str, int]
    limit_cues: frozenset[str]
    limit_down: frozenset[str]
    #: every word of every cue list: words that say how something is asked, not what about
    cue_words: frozenset[str]
    fractions: dict[Phrase, float]


def _phrases(items: Iterable[str]) -> tuple[Phrase, ...]:
    return tuple(p for p in (tuple(tokens(i)) for i in items) if p)


@cache
def lexicon() -> Lexicon:
    data = tomllib.loads(resources.files("edgecoop.orchestrator").joinpath("lexicon.toml").read_text("utf-8"))
    ops = data["operations"]
    return Lexicon(
        operations={k: _phrases(v) for k, v in ops.items() if k != "actions"},
        aggregations={k: _phrases(v) for k, v in data["aggregations"].items()},
        window_units={str(k): int(v) for k, v in data["windows"]["units"].items()},
        window_phrases={tuple(tokens(k)): int(v) for k, v in data["windows"]["phrases"].items()},
        past=_phrases(data["time"]["past"]),
        objects={k: (str(v["op"]), _phrases(v["words"])) for k, v in data["objects"].items()},
        first_person=frozenset(data["personal"]["first_person"]),
        sensitive=_phrases(data["personal"]["sensitive"]),
        public_world=_phrases(data["personal"]["public_world"]),
        general=_phrases(data["general"]["cues"]),
        stopwords=frozenset(data["stopwords"]["words"]),
        actions=_phrases(ops.get("actions", [])),
        not_places=frozenset(data["places"]["not_places"]),
        place_heads=frozenset(data["places"]["heads"]),
        numbers={str(k): int(v) for k, v in data["numbers"].items()},
        limit_cues=frozenset(data["limits"]["cues"]) | frozenset(data["limits"]["down"]),
        limit_down=frozenset(data["limits"]["down"]),
        cue_words=frozenset(
            w
            for group in (
                ops,
                data["aggregations"],
                {"past": data["time"]["past"], "g": data["general"]["cues"], "limits": data["limits"]["cues"]},
                {"units": list(data["windows"]["units"]), "windows": list(data["windows"]["phrases"])},
            )
            for items in group.values()
            for item in items
            for w in tokens(item)
        ),
        fractions={tuple(tokens(k)): float(v) for k, v in data["limits"]["fractions"].items()},
    )


@dataclass
class Quantity:
    modality: str
    unit: str = ""
    label: str = ""
    phrases: set[Phrase] = field(default_factory=set)
    places: dict[str, str] = field(default_factory=dict)  # place -> strictest privacy class of its providers
    domains: set[str] = field(default_factory=set)
    labels: dict[str, str] = field(default_factory=dict)  # place -> its sensor's own label
    #: domains of the agents at each place (a rule bound to a domain applies only there)
    place_domains: dict[str, set[str]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        if len(set(self.labels.values())) > 1:  # "room temperature" here, "body temperature" there: the modality
            return self.modality.replace("_", " ")
        return self.label or self.modality.replace("_", " ")

    def label_at(self, place: str | None) -> str:
        return self.labels.get(place or "", "") or self.name


@dataclass
class Place:
    name: str
    phrases: set[Phrase] = field(default_factory=set)
    kinds: set[str] = field(default_factory=set)
    privacy: str = "public"


@dataclass
class Knowledge:
    agent_id: str
    terms: set[str] = field(default_factory=set)
    domains: set[str] = field(default_factory=set)
    privacy: str = "public"


class Vocabulary:
    """What the edge's world is made of, from cards. ``update`` merges a CMS snapshot (cards by agent id)."""

    def __init__(self) -> None:
        self.quantities: dict[str, Quantity] = {}
        self.places: dict[str, Place] = {}
        self.knowledge: dict[str, Knowledge] = {}
        self.cameras: dict[str, set[str]] = {}  # place -> camera agent ids
        #: words of a multi-sensor capability ("air quality", "pollution") -> the modalities it measures
        self.groups: dict[Phrase, set[str]] = {}
        self.vision = False
        self.version = 0
        self._fingerprint = 0
        self.place_words: set[str] = set()
        self.quantity_words: set[str] = set()
        self.unit_words: set[str] = set()
        self.knowledge_words: set[str] = set()

    # -- learning ----------------------------------------------------------------------------------------------
    def update(self, cards: Mapping[str, Mapping[str, Any]]) -> None:
        for card in cards.values():
            if isinstance(card, Mapping) and card.get("capabilities"):
                self._learn(card)
        self._alias_places()
        # word sets the parser consults on every question: derived here, once per update, not per question
        self.place_words = {w for p in self.places.values() for ph in p.phrases for w in ph}
        self.quantity_words = {w for q in self.quantities.values() for ph in q.phrases for w in ph}
        self.unit_words = {w for q in self.quantities.values() for w in tokens(q.unit)}
        self.knowledge_words = {t for k in self.knowledge.values() for t in k.terms}
        # the version moves only when what the parser can match moved (a card's load changes often, its words not)
        fingerprint = hash(repr(self._content()))
        if fingerprint != self._fingerprint:
            self._fingerprint = fingerprint
            self.version += 1

    def _content(self) -> tuple[Any, ...]:
        return (
            sorted(
                (m, q.unit, q.label, sorted(q.phrases), sorted(q.places.items()), sorted(q.domains))
                for m, q in self.quantities.items()
            ),
            sorted((p.name, sorted(p.phrases), sorted(p.kinds), p.privacy) for p in self.places.values()),
            sorted((k.agent_id, sorted(k.terms), sorted(k.domains), k.privacy) for k in self.knowledge.values()),
            sorted((p, sorted(c)) for p, c in self.cameras.items()),
            sorted((g, sorted(m)) for g, m in self.groups.items()),
            self.vision,
        )

    def _learn(self, card: Mapping[str, Any]) -> None:
        caps = [c for c in card.get("capabilities", []) if isinstance(c, Mapping)]
        kinds = {str(c.get("kind", "")) for c in caps}
        privacy = str(card.get("privacy", "public"))
        loc = card.get("location") or {}
        place_name = str(loc.get("name") or "") if kinds & DATA_KINDS else ""
        if place_name:
            place = self.places.setdefault(place_name, Place(place_name))
            place.kinds |= kinds & DATA_KINDS
            place.phrases.add(tuple(tokens(place_name)))
            place.phrases |= {tuple(tokens(a)) for a in loc.get("aliases", ()) if tokens(a)}
            place.privacy = privacy if privacy != "public" else place.privacy
            if "camera" in kinds:
                self.cameras.setdefault(place_name, set()).add(str(card.get("agent_id")))
        if "vision" in kinds:
            self.vision = True
        # a camera's frame stream is not a quantity people ask for; sensors of sensor capabilities are
        sensors = [s for s in card.get("sensors", []) if isinstance(s, Mapping) and s.get("modality")]
        if "sensor" not in kinds:
            sensors = []
        sensor_caps = [c for c in caps if c.get("kind") == "sensor"]
        for s in sensors:
            q = self.quantities.setdefault(str(s["modality"]), Quantity(str(s["modality"])))
            q.unit = q.unit or str(s.get("unit", ""))
            q.label = q.label or str(s.get("label", ""))
            if place_name and s.get("label"):
                q.labels[place_name] = str(s["label"])
            q.phrases |= {p for p in _phrases([str(s["modality"]).replace("_", " "), str(s.get("label", ""))]) if p}
            q.phrases |= set(_phrases(str(w) for w in s.get("words", ())))
            if len(str(s.get("name", ""))) >= 4:  # the sensor's own name ("laeq", "air_temp")
                q.phrases |= set(_phrases([str(s["name"]).replace("_", " ")]))
            q.domains |= {str(d) for d in card.get("domains", ())}
            if place_name:
                q.place_domains.setdefault(place_name, set()).update(str(d) for d in card.get("domains", ()))
                q.places[place_name] = privacy if q.places.get(place_name, "public") == "public" else "private"
        if len(sensors) > 1 and len(sensor_caps) == 1:  # its tags and name stand for all of its sensors
            words = [str(t) for t in sensor_caps[0].get("tags", ())] + [str(sensor_caps[0].get("name", ""))]
            for ph in _phrases(words):
                self.groups.setdefault(ph, set()).update(str(x["modality"]) for x in sensors)
        if len(sensors) == 1 and len(sensor_caps) == 1:  # a one-sensor capability's tags name that sensor
            q = self.quantities[str(sensors[0]["modality"])]
            q.phrases |= set(_phrases(str(t) for t in sensor_caps[0].get("tags", ())))
        for c in caps:
            if c.get("kind") != "knowledge":
                continue
            k = self.knowledge.setdefault(str(card["agent_id"]), Knowledge(str(card["agent_id"])))
            k.domains |= {str(d) for d in card.get("domains", ())}
            # word lists only (tags, domains, the topics of its documents): a card's prose is never parsed, so a
            # sentence written to steer the orchestrator steers nothing
            words = [*map(str, c.get("tags", ())), *k.domains, *map(str, c.get("topics", ()))]
            text = " ".join(words)
            k.terms |= set(tokens(text)) - lexicon().stopwords
            k.privacy = privacy

    def _alias_places(self) -> None:
        """A word of a place name that no other place name, quantity or object uses stands for that place."""
        lex = lexicon()
        taken = {w for q in self.quantities.values() for p in q.phrases for w in p}
        taken |= {w for _, ps in lex.objects.values() for p in ps for w in p}
        counts: dict[str, int] = {}
        for p in self.places.values():
            for w in set(tokens(p.name)):
                counts[w] = counts.get(w, 0) + 1
        for p in self.places.values():
            words = tokens(p.name)
            for w in words:
                if (
                    counts.get(w) == 1
                    and w not in lex.stopwords | lex.not_places
                    and w not in taken
                    and (len(w) >= 4 or w.isdigit())
                ):
                    p.phrases.add((w,))
            for a, b in itertools.pairwise(words):  # "old town" of Old Town Square
                if len(words) >= 3 and a not in lex.stopwords:
                    p.phrases.add((a, b))

    # -- questions about the vocabulary ------------------------------------------------------------------------
    def providers(self, modality: str) -> dict[str, str]:
        q = self.quantities.get(modality)
        return dict(q.places) if q else {}

    def describe_place(self, place: str) -> list[str]:
        """What can be asked about ``place``: its quantities' names, and "vehicles" where a camera is."""
        out = [q.label_at(place) for q in self.quantities.values() if place in q.places]
        if place in self.cameras and self.vision:
            out += list(lexicon().objects)
        return sorted(out)
