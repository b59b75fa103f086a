"""The Classifier Engine's fast parser: a question -> a :class:`TaskSpec`, matched against the live vocabulary.

Microseconds to a millisecond, no model. Operation cues come from ``lexicon.toml`` (English), every modality, place
and knowledge source from the cards (:class:`Vocabulary`). What it cannot resolve it says: an unknown place, a
quantity nobody measures at the named place, a past time live sensors cannot serve, an ambiguous place (asked
back with the options).
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from edgecoop.orchestrator.spec import Limit, Operation, Target, TaskSpec, strictest
from edgecoop.orchestrator.text import find_phrase, match_phrase, similar, tokens
from edgecoop.orchestrator.vocabulary import Lexicon, Phrase, Vocabulary, lexicon

__all__ = ["FastParser", "Parser", "personal_content"]


class Parser(Protocol):
    name: str

    def parse(self, question: str, vocab: Vocabulary, *, privacy: str | None = None) -> TaskSpec: ...


@dataclass(frozen=True, slots=True)
class _Hit:
    name: str
    start: int
    length: int
    exact: bool


def _best(
    words: Sequence[str], name: str, phrases: set[Phrase] | Sequence[Phrase], taken: Sequence[_Hit] = ()
) -> _Hit | None:
    """The longest (then exact, then earliest) match of any of ``phrases`` that overlaps none of ``taken``."""
    best: _Hit | None = None
    for ph in phrases:
        for fuzzy in (False, True):
            m = match_phrase(words, ph, fuzzy=fuzzy)
            if m is not None:
                hit = _Hit(name, m[0], m[1], not fuzzy)
                if any(_overlaps(hit, t) for t in taken):
                    continue  # "bus" of "bus line 42" is the place; "occupancy" is the quantity
                if best is None or (hit.length, hit.exact, -hit.start) > (best.length, best.exact, -best.start):
                    best = hit
                break
    return best


def _has(words: Sequence[str], phrases: Sequence[Phrase], *, fuzzy: bool = False) -> bool:
    if not fuzzy:
        present = set(words)
        phrases = [p for p in phrases if p and (p[0] in present or len(p) == 2)]  # (a 2-word phrase may be glued)
    return any(find_phrase(words, p, fuzzy=fuzzy) >= 0 for p in phrases)


def _overlaps(a: _Hit, b: _Hit) -> bool:
    return a.start < b.start + b.length and b.start < a.start + a.length


def first_person(words: Sequence[str], lex: Lexicon | None = None) -> bool:
    """The asker speaks of themselves ("my", "am I", "check on me"; not the "me" of "tell me")."""
    lex = lex or lexicon()
    for i, w in enumerate(words):
        if w == "me" and i > 0 and words[i - 1] in ("give", "tell", "show", "let", "send", "for", "help"):
            continue
        if w in lex.first_person:
            return True
    return False


def personal_content(words: Sequence[str], lex: Lexicon | None = None) -> bool:
    """First person about the asker, or a sensitive topic: private. Unsure counts as personal (fails closed)."""
    lex = lex or lexicon()
    first = first_person(words, lex)
    sensitive = _has(words, lex.sensitive)
    if sensitive:
        return True
    return first and not _has(words, lex.public_world)


_NUMBER = re.compile(r"^\d+(?:\.\d+)?$")


class FastParser:
    """Lexical matching of the question against the live vocabulary.

    Pure for a given question, privacy and vocabulary version, so the last ``cache_size`` results are kept: the
    same question asked again (a dashboard, an automation) costs a dictionary look-up until a card's words change.
    """

    name = "fast"

    def __init__(self, cache_size: int = 4096) -> None:
        self._cache: OrderedDict[tuple[str, str | None, int, int], TaskSpec] = OrderedDict()
        self._cache_size = cache_size
        self.cache_hits = 0

    def parse(self, question: str, vocab: Vocabulary, *, privacy: str | None = None) -> TaskSpec:
        key = (question, privacy, id(vocab), vocab.version)
        spec = self._cache.get(key)
        if spec is not None:
            self._cache.move_to_end(key)
            self.cache_hits += 1
            return spec
        spec = self._parse(question, vocab, privacy=privacy)
        if self._cache_size:
            self._cache[key] = spec
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return spec

    def _parse(self, question: str, vocab: Vocabulary, *, privacy: str | None = None) -> TaskSpec:
        lex = lexicon()
        words = tokens(question)
        personal = personal_content(words, lex) or privacy == "private"
        asker = first_person(words, lex) and not _has(words, lex.public_world)
        places = self._places(words, vocab)
        quantities = [
            h for h in (_best(words, q.modality, q.phrases, places) for q in vocab.quantities.values()) if h is not None
        ]
        quantities = _dedupe(quantities)
        if not quantities:  # "air quality", "pollution": every modality the capability measures, each a target
            for ph, mods in sorted(vocab.groups.items(), key=lambda kv: -len(kv[0])):
                gm = match_phrase(words, ph, fuzzy=False)
                if gm is not None and not any(_overlaps(_Hit("", gm[0], gm[1], True), p) for p in places):
                    quantities = [_Hit(mod, gm[0], gm[1], True) for mod in sorted(mods)]
                    break
        objects = [h for h in (_best(words, name, phs, places) for name, (_op, phs) in lex.objects.items()) if h]
        spans = [*places, *quantities, *objects]
        fuzzy = not all(h.exact for h in spans)
        confidence = 0.75 if fuzzy else 0.95
        world = bool(places or quantities or objects)
        base = TaskSpec(Operation.OPEN, personal=personal, confidence=confidence)
        place_names = [p.name for p in sorted(places, key=lambda h: h.start)]

        # words of the question that the edge's documents are about ("fever", "COPD", "diversion")
        evidence = self._document_evidence(words, spans, vocab)
        unknown = self._unknown_place(question, words, spans, vocab)
        if re.search(r"\b(19|20)\d\d\b", " ".join(words)) and (quantities or objects) and not _has(words, _RULE_WORDS):
            return replace(base, unknown="live sensors cannot answer about another year")
        if unknown:
            return replace(base, unknown=f"no agent is at a place called {unknown!r}; known places: "
                           f"{', '.join(sorted(vocab.places))}", confidence=0.9)  # fmt: skip
        if _acts(words, lex) and (world or personal):
            return replace(base, unknown="the edge answers questions; it does not act (upload, send, share) for you")
        # "how did the WHO change the guideline in 2021": what the documents say about a past time, not a reading
        about_rules = _has(words, _RULE_WORDS) or evidence >= 2
        if _has(words, lex.past) and (quantities or objects) and not about_rules:
            return replace(base, unknown="live sensors cannot answer about another time than now or a recent window")

        covered_q = {i for h in quantities for i in range(h.start + 1, h.start + h.length)}  # "vehicles/min"
        agg, window_s = self._agg_window([w if i not in covered_q else "" for i, w in enumerate(words)], lex)
        percent = any(vocab.quantities[h.name].unit.strip() == "%" for h in quantities)
        limit = self._limit(words, spans, lex, percent=percent)
        yes_no = bool(words) and words[0] in ("is", "are", "am", "was", "does", "do", "has", "have")
        check = _has(words, lex.operations["check"]) or limit is not None or "too" in words
        check = check or (yes_no and bool(quantities) and not _has(words, lex.operations["compare"]))
        area = _has(words, lex.operations["area"])
        lookup_cue = _has(words, lex.operations["lookup"])
        live = _has(words, lex.operations["live"])

        # with no place, no asker and no live cue, a question holding the documents' words asks what they say, even
        # when it names a quantity, not for a reading
        # "count the vehicles on the street camera" is for a camera; "how do electric buses charge?" is general
        counting = bool(objects) and not quantities and _has(words, lex.operations["count"])
        enough = evidence >= 2 or (evidence == 1 and not _has(words, lex.general))
        enough = enough and (agg == "latest" or evidence >= 2)  # "the mean NO2 over every monitoring station"
        if not place_names and not asker and not live and not area and not counting and enough:
            return self._lookup(base, words, vocab, quantities)
        general_cue = _has(words, lex.general)
        if general_cue and not places and not quantities:
            return replace(base, general=not personal, confidence=0.95)
        if (
            not quantities
            and not objects
            and any(w in ("level", "levels", "index", "concentration", "speed", "pressure") for w in words)
        ):
            at = f" at {place_names[0]}" if place_names else ""
            return replace(base, unknown=f"no agent{at} measures that; known quantities: "
                           f"{', '.join(sorted(q.name for q in vocab.quantities.values()))}")  # fmt: skip
        if (quantities or objects) and not place_names:
            # "at home" when two places have "home" in their names: which one is not ours to guess
            shared = {w: sorted(p.name for p in vocab.places.values() if w in tokens(p.name)) for w in set(words)}
            shared = {w: ps for w, ps in shared.items() if len(ps) >= 2 and w not in lex.stopwords}
            if shared:
                w, options = sorted(shared.items())[0]
                return replace(base, ask=f"Which {w} do you mean: {', '.join(options)}?", options=tuple(options))
            loose = self._loose_unknown(words, spans, vocab)
            if loose:
                return replace(base, unknown=f"no agent is at a place called {loose!r}; known places: "
                               f"{', '.join(sorted(vocab.places))}")  # fmt: skip
        # every vital sign of the asker together
        summarise = _has(words, lex.operations["summarise"])
        if personal and summarise and len(quantities) != 1 and not place_names:
            mine = sorted({(q.modality, p) for q in vocab.quantities.values() for p, c in q.places.items()
                           if c != "public"})  # fmt: skip
            if mine:
                targets = tuple(Target(m, None, agg, window_s) for m in sorted({m for m, _ in mine}))
                return replace(base, operation=Operation.SUMMARISE, targets=targets)

        doc_cue = _has(words, _DOC_CUES)
        lookup_only = lookup_cue and not live and not _has(words, lex.operations["count"]) and (not check or doc_cue)
        if objects and not quantities and lookup_only:
            return self._lookup(base, words, vocab, [])
        # "divert bus 42 around Harbour Gate": nothing there measures the bus; its camera sees the traffic
        cam_place = bool(place_names) and place_names[0] in vocab.cameras
        if objects and quantities and check and cam_place:
            quantities = [h for h in quantities if place_names[0] in vocab.providers(h.name)]
        if objects and not quantities:
            obj = objects[0].name
            cams = sorted(vocab.cameras)
            if not cams or not vocab.vision:
                return replace(base, unknown="no camera and vision agents are known at the edge")
            where = [p for p in place_names if p in vocab.cameras]
            if place_names and not where:
                return replace(base, unknown=f"no camera at {place_names[0]}; cameras are at {', '.join(cams)}")
            if not where:
                if len(cams) != 1:
                    return replace(base, ask=f"Which camera: {', '.join(cams)}?", options=tuple(cams))
                where = cams
            if len(where) >= 2:  # two cameras named: a comparison of counts, which the edge does not plan (refused)
                return replace(base, operation=Operation.COMPARE, targets=tuple(Target(obj, p) for p in where))
            op = Operation.CHECK if check and not _has(words, lex.operations["count"]) else Operation.COUNT
            if op is Operation.COUNT and check and _has(words, _phrases_of(lex, "congest")):
                op = Operation.CHECK
            return replace(base, operation=op, targets=(Target(obj, where[0]),), limit=limit)

        if quantities:
            targets_mod = [h.name for h in sorted(quantities, key=lambda h: h.start)]
            personal_reading = asker and not place_names
            doc_question = not place_names and not live and not personal_reading and (not area or agg == "latest")
            # "explain weather and climate": a general question that merely names a measured quantity, when no
            # knowledge agent's domain covers that quantity
            known = {d for h in quantities for d in vocab.quantities[h.name].domains}
            covered_by_docs = any(k.domains & known for k in vocab.knowledge.values())
            if doc_question and general_cue and not covered_by_docs and not evidence:
                return replace(base, general=not personal, confidence=0.95)
            if doc_question and lookup_cue and (not check or _asks_for_rule(words)):
                return self._lookup(base, words, vocab, quantities)
            if doc_question and _asks_for_rule(words) and _has(words, _RULE_WORDS):
                return self._lookup(base, words, vocab, quantities)
            if len(place_names) >= 2:
                m = targets_mod[0]
                missing = [p for p in place_names if p not in vocab.providers(m)]
                if missing:
                    return replace(base, unknown=_nothing_at(vocab, m, missing[0]))
                targets = tuple(Target(m, p, agg, window_s) for p in place_names)
                return replace(base, operation=Operation.COMPARE, targets=targets)
            if not place_names and not personal_reading and (area or (agg != "latest" and not window_s)):
                m = targets_mod[0]
                public = [p for p, c in vocab.providers(m).items() if c == "public"]
                if len(public) >= 2 or area:
                    return replace(base, operation=Operation.AGGREGATE,
                                   targets=(Target(m, None, agg if agg != "latest" else "mean", window_s),))  # fmt: skip
            targets_l: list[Target] = []
            for m in targets_mod:
                place, problem = self._place_for(m, place_names, personal_reading, vocab)
                if problem:
                    return replace(base, **problem)  # type: ignore[arg-type]
                targets_l.append(Target(m, place, agg, window_s))
            op = Operation.CHECK if check else Operation.READ
            return replace(base, operation=op, targets=tuple(targets_l), limit=limit)

        # nothing measurable: a document question, the world without a question we know, or an open question
        # (a question with none of the documents' words is not theirs, whatever its phrasing; "how much X is there
        # at <place>" asks for a reading nobody there takes, not for a document)
        doc_like = (lookup_cue and (evidence or places)) or (places and vocab.knowledge)
        if doc_like and not (places and live):
            spec = self._lookup(base, words, vocab, [])
            if spec.knowledge_agent or lookup_cue:
                return spec
        if places and (check or live):
            offered_q = [q for q in vocab.quantities.values() if place_names[0] in q.places]
            if len(offered_q) > 1:  # "kitchen hotter than 25°C?": the unit after the number says which quantity
                offered_q = [q for q in offered_q if _unit_after_number(words, q.unit)] or offered_q
            if len(offered_q) == 1 and place_names[0] not in vocab.cameras:
                t = Target(offered_q[0].modality, place_names[0], agg, window_s)
                return replace(base, operation=Operation.CHECK if check else Operation.READ, targets=(t,), limit=limit)
        if places:
            offered = vocab.describe_place(place_names[0])
            return replace(base, ask=f"What would you like to know about {place_names[0]}? I can tell you: "
                           f"{', '.join(offered)}.", options=tuple(offered))  # fmt: skip
        if not personal and evidence >= 2:
            k = self._lookup(base, words, vocab, [])
            if k.knowledge_agent and k.confidence >= 0.6:
                return k
        general = not personal and not unknown
        cue = _has(words, lex.general)
        return replace(base, general=general, confidence=0.95 if cue else 0.6)

    # -- pieces -------------------------------------------------------------------------------------------------
    def _places(self, words: Sequence[str], vocab: Vocabulary) -> list[_Hit]:
        hits = [h for h in (_best(words, p.name, p.phrases) for p in vocab.places.values()) if h is not None]
        generic = {"which", "what", "every", "each", "all", "any", "other", "of"}
        heads = lexicon().place_heads
        # a bare head noun ("road traffic", "a square") is not the one place whose alias it is; "the road" is
        listing = _has(words, lexicon().operations["compare"])  # "compare pm2.5 station harbour park"
        hits = [h for h in hits if listing or not (h.length == 1 and words[h.start] in heads and h.start > 0
                                                   and words[h.start - 1] not in ("the", "at", "in", "near", "by"))]  # fmt: skip
        # "which station", "the air stations": a kind of place, not the one place whose alias the word is
        hits = [h for h in hits if not (h.length == 1 and (
            (h.start > 0 and words[h.start - 1] in generic) or (h.start > 1 and words[h.start - 2] in generic
                                                                 and words[h.start - 1] not in vocab.place_words)
            or (words[h.start].endswith("s") and not h.exact)))]  # fmt: skip
        # a longer match wins where two overlap ("Old Town Square" over an alias word of another place)
        return _dedupe(hits)

    def _unknown_place(self, question: str, words: Sequence[str], spans: Sequence[_Hit], vocab: Vocabulary) -> str:
        lex = lexicon()
        covered = {i for h in spans for i in range(h.start, h.start + h.length)}
        known_words = vocab.place_words
        single = {h.start for h in spans if h.length == 1}
        for i, w in enumerate(words):
            if (i in covered and i not in single) or w not in lex.place_heads or i == 0:
                continue
            prev = words[i - 1]
            connectors = ("vs", "versus", "or", "and", "than", "between")
            if (
                (i - 1) in covered
                or prev in lex.stopwords
                or prev in lex.not_places
                or prev in known_words
                or prev in connectors
            ):
                continue
            if any(similar(prev, k) for k in known_words) or prev.isdigit() or prev in vocab.knowledge_words:
                continue
            return f"{prev} {w}".title()
        # "bus 7" where the cards know "Bus line 42": a numbered place of a known kind that does not exist
        numbered = [tokens(p) for p in vocab.places]
        for i, w in enumerate(words):
            if i and w.isdigit() and i not in covered:
                kin = [n for n in numbered if words[i - 1] in n and any(t.isdigit() for t in n)]
                if kin and not any(w in n for n in kin):
                    return f"{words[i - 1]} {w}".title()
        # "at Narnia", "near Atlantis": a capitalised name after a preposition that no card knows
        # after "and"/"or"/"vs" only in a list of places ("City Park and the University Campus")
        listing = r"|and|or|vs" if any(h.name in vocab.places for h in spans) else ""
        pattern = rf"\b(?:at|in|near|around|by{listing})\s+(?:the\s+)?([A-Z][\w'-]+(?:\s+[A-Z][\w'-]+)*)"
        about_world = any(h.name not in vocab.places for h in spans)  # a quantity or object is asked for
        for m in re.finditer(pattern, question if about_world else ""):  # "the tallest mountain in Africa": no
            name = [n for n in tokens(m.group(1)) if n not in lex.stopwords]
            unknown = [n for n in name if not any(similar(n, k) for k in known_words)]
            vocab_q = vocab.quantity_words
            if (
                unknown
                and name[0] not in lex.not_places
                and not any(n in vocab_q for n in unknown)
                and not (len(name) == 1 and name[0] in vocab.knowledge_words)  # "in the EU": a word the documents use
            ):
                return m.group(1)
        return ""

    def _loose_unknown(self, words: Sequence[str], spans: Sequence[_Hit], vocab: Vocabulary) -> str:
        """'in the bathroom': a lower-case word after at/in/near that names no place, quantity or time."""
        lex = lexicon()
        covered = {i for h in spans for i in range(h.start, h.start + h.length)}
        known = vocab.place_words | vocab.quantity_words | vocab.unit_words  # units: "in µg/m³", "in dB(A)"
        for i, w in enumerate(words[:-1]):
            if w not in ("at", "in", "near", "inside", "outside"):
                continue
            j = i + 2 if words[i + 1] == "the" and i + 2 < len(words) else i + 1
            x = words[j]
            if j in covered or x in lex.stopwords or x in lex.not_places or x in known or x.isdigit():
                continue
            if any(find_phrase([x], p, fuzzy=False) >= 0 for ps in lex.operations.values() for p in ps):
                continue
            return x
        return ""

    def _document_evidence(self, words: Sequence[str], spans: Sequence[_Hit], vocab: Vocabulary) -> int:
        """Distinct words of the question, beyond its place, quantity, object and cue words, that a knowledge
        agent's documents are about (their topics); 0 with no knowledge agent."""
        if not vocab.knowledge:
            return 0
        lex = lexicon()
        covered = {i for h in spans for i in range(h.start, h.start + h.length)}
        content = {
            w
            for i, w in enumerate(words)
            if i not in covered and len(w) >= 3 and w not in lex.stopwords and w not in lex.cue_words
            and not w.isdigit() and w not in vocab.quantity_words and w not in vocab.place_words
        }  # fmt: skip
        return max(sum(1 for w in content if any(similar(w, t) for t in k.terms)) for k in vocab.knowledge.values())

    def _agg_window(self, words: Sequence[str], lex: Lexicon) -> tuple[str, int]:
        words = [str(lex.numbers.get(w, w)) for w in words]  # "the last two minutes"
        # "5 min" is a window, not the minimum; "pm2.5 i mean" is not the mean
        masked = [
            ""
            if i and ((w in lex.window_units and _NUMBER.match(words[i - 1])) or (w == "mean" and words[i - 1] in
                                                                                  ("i", "you", "we")))
            else w
            for i, w in enumerate(words)
        ]  # fmt: skip
        agg = next((a for a, phs in lex.aggregations.items() if _has(masked, phs)), "latest")
        window_s = 0
        for i, w in enumerate(words[:-1]):
            if w in ("last", "past", "previous") and i + 2 < len(words) + 1:
                n, unit = words[i + 1], words[i + 2] if i + 2 < len(words) else ""
                if _NUMBER.match(n) and unit in lex.window_units:
                    window_s = int(float(n) * lex.window_units[unit])
        for ph, secs in lex.window_phrases.items():
            if not window_s and find_phrase(words, ph, fuzzy=False) >= 0:
                window_s = secs
        if window_s and agg == "latest":
            agg = "mean"
        return agg, window_s

    def _limit(self, words: Sequence[str], spans: Sequence[_Hit], lex: Lexicon, *, percent: bool) -> Limit | None:
        if percent:  # "more than half full", "three quarters full": a share of a percentage (before "three" is 3)
            for ph, value in sorted(lex.fractions.items(), key=lambda kv: -len(kv[0])):
                at = find_phrase(words, ph, fuzzy=False)
                if at > 0 and any(b in lex.limit_cues for b in words[max(0, at - 3) : at]):
                    return Limit(float(value), kind=_limit_kind(words[max(0, at - 3) : at], lex))
        covered = {i for h in spans for i in range(h.start, h.start + h.length)}
        words = [str(lex.numbers.get(w, w)) for w in words]
        for i, w in enumerate(words):
            if i in covered or not _NUMBER.match(w):
                continue
            before = words[max(0, i - 5) : i]
            after = words[i + 1] if i + 1 < len(words) else ""
            if any(b in ("last", "past", "previous") for b in before[-2:]) or after in lex.window_units:
                continue
            if any(b in lex.limit_cues for b in before):
                return Limit(float(w), kind=_limit_kind(before, lex))
        return None

    def _place_for(
        self, modality: str, place_names: Sequence[str], personal: bool, vocab: Vocabulary
    ) -> tuple[str | None, dict[str, object]]:
        providers = vocab.providers(modality)
        if place_names:
            here = [p for p in place_names if p in providers]
            if here:
                return here[0], {}
            return None, {"unknown": _nothing_at(vocab, modality, place_names[0])}
        mine = [p for p, c in providers.items() if c != "public"]
        if mine and (personal or len(mine) == len(providers)):
            return None, {}  # the asker's own agents: the plan keeps to non-public providers
        public = sorted(p for p, c in providers.items() if c == "public")
        if len(public) == 1 and not personal and not mine:
            return public[0], {}
        if public and mine:  # "Current temperature?": the kitchen's, or the asker's own? Not ours to guess
            options = [*public, *sorted(mine)]
            name = vocab.quantities[modality].name
            return None, {"ask": f"Which {name} do you mean: {', '.join(options)}?", "options": tuple(options)}
        if len(providers) == 1:  # the only place that measures it (its privacy then governs the task)
            return next(iter(providers)), {}
        options = public or sorted(providers)
        name = vocab.quantities[modality].name
        return None, {
            "ask": f"Which place do you mean for the {name}: {', '.join(options)}?",
            "options": tuple(options),
        }

    def _lookup(self, base: TaskSpec, words: Sequence[str], vocab: Vocabulary, quantities: Sequence[_Hit]) -> TaskSpec:
        """The knowledge agent whose declared domains and tags best match the question (idf-weighted)."""
        lex = lexicon()
        sources = list(vocab.knowledge.values())
        if not sources:
            return replace(base, operation=Operation.LOOKUP, unknown="no knowledge agent is known")
        content = [w for w in words if w not in lex.stopwords and len(w) > 2]
        df = {w: sum(1 for k in sources if any(similar(w, t) for t in k.terms)) for w in set(content)}
        domains = {d for h in quantities for d in vocab.quantities[h.name].domains}
        best, best_score, tied = None, 0.0, False
        for k in sources:
            score = sum(math.log(1 + len(sources) / df[w]) for w in set(content) if df[w] and
                        any(similar(w, t) for t in k.terms))  # fmt: skip
            score += 2.0 * len(domains & k.domains)
            if score > best_score + 1e-9:
                best, best_score, tied = k, score, False
            elif best is not None and abs(score - best_score) <= 1e-9:
                tied = True
        if tied:  # the declared fields do not decide: every knowledge agent is asked (and the strictest privacy holds)
            best = None
        if best is None:
            if _has(words, lex.general) and not base.personal:
                return replace(base, general=True, confidence=0.9)
            # no declared field says who knows: every knowledge agent is asked, the best-supported passage wins
            return replace(base, operation=Operation.LOOKUP, confidence=0.5)
        conf = min(0.95, 0.4 + 0.15 * best_score)
        return replace(base, operation=Operation.LOOKUP, knowledge_agent=best.agent_id, confidence=conf)


_DOC_CUES = tuple(
    tuple(p.split())
    for p in (
        "what should",
        "when should",
        "how should",
        "according to",
        "what does",
        "what do the",
        "rules",
        "procedure",
        "regulation",
    )
)
_RULE_WORDS = tuple(
    (w,)
    for w in (
        "limit",
        "limits",
        "guideline",
        "guidelines",
        "normal",
        "threshold",
        "range",
        "target",
        "value",
        "recommended",
        "safe",
    )
)


def _limit_kind(before: Sequence[str], lex: Lexicon) -> str:
    """'min' when the nearest direction word before the number points down ("below 93", "under 18 degrees");
    a named limit or threshold in between ("below the limit of 40") is a maximum, as limits are by default."""
    for b in reversed(before):
        if b in ("limit", "threshold", "guideline"):
            return "max"
        if b in lex.limit_down:
            return "min"
        if b in lex.limit_cues and b not in ("than", "of"):
            return "max"
    return "max"


_VERB_BEFORE = frozenset(
    {"please", "pls", "can", "could", "would", "will", "to", "and", "then", "you", "i", "we", "also", "just", "now"}
)


def _acts(words: Sequence[str], lex: Lexicon) -> bool:
    """An action verb the user wants done ("upload my readings", "can you send ..."), not the noun ("a good book")
    and not an obligation asked about ("do cities have to publish noise maps?")."""
    for ph in lex.actions:
        at = find_phrase(words, ph, fuzzy=False)
        obligation = at >= 2 and words[at - 1] == "to" and words[at - 2] in ("have", "has", "had", "need", "needs")
        if (at == 0 or (at > 0 and words[at - 1] in _VERB_BEFORE)) and not obligation:
            return True
    return False


def _unit_after_number(words: Sequence[str], unit: str) -> bool:
    """The question writes a number followed by this unit ("25 °C", "40 %", "60 dB(A)")."""
    unit_tokens = tokens(unit)
    if not unit_tokens:
        return False
    n = len(unit_tokens)
    return any(_NUMBER.match(words[i]) and list(words[i + 1 : i + 1 + n]) == unit_tokens for i in range(len(words)))


def _phrases_of(lex: Lexicon, stem: str) -> list[Phrase]:
    return [p for p in lex.operations["check"] if any(w.startswith(stem) for w in p)]


def _asks_for_rule(words: Sequence[str]) -> bool:
    """'What is the limit for NO2?' asks a document; 'Is NO2 above the limit?' asks a check."""
    return bool(words) and words[0] in ("what", "whats", "what's", "which", "how", "when", "explain", "according")


def _dedupe(hits: list[_Hit]) -> list[_Hit]:
    """Of overlapping matches the longer (then the exact, then the earlier) wins: "heart rate" over "rate"."""
    hits = sorted(hits, key=lambda h: (-h.length, not h.exact, h.start))
    kept: list[_Hit] = []
    for h in hits:
        if not any(_overlaps(h, k) for k in kept):
            kept.append(h)
    return kept


def _nothing_at(vocab: Vocabulary, modality: str, place: str) -> str:
    q = vocab.quantities[modality]
    where = ", ".join(sorted(q.places)) or "nowhere"
    return f"no agent at {place} measures {q.name} (it is measured at: {where})"


def privacy_of(spec: TaskSpec, vocab: Vocabulary, *, policy: str | None = None) -> str:
    """The strictest of: the data the spec touches, the submitter's or site's policy, the personal detector."""
    classes: list[str | None] = [policy, "private" if spec.personal else None]
    for t in spec.targets:
        provs = vocab.providers(t.modality)
        if t.place is not None:
            classes.append(provs.get(t.place, "public"))
        elif spec.operation is Operation.AGGREGATE:  # an aggregate over an area reads the public places only
            classes.extend(c for c in provs.values() if c == "public")
        else:  # no place named: whichever provider the plan reaches, its class counts (fails closed)
            classes.extend(provs.values())
    if spec.knowledge_agent and spec.knowledge_agent in vocab.knowledge:
        classes.append(vocab.knowledge[spec.knowledge_agent].privacy)
    elif spec.operation is Operation.LOOKUP:  # a fan-out touches every knowledge agent: the strictest counts
        classes.extend(k.privacy for k in vocab.knowledge.values())
    return strictest(*classes)
