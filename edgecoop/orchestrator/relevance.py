"""How relevant each candidate is to a step's need, for dispatch: from what agents *declare*, never from prose.

Agent-written prose - card and capability descriptions, sensor units, knowledge documents, results - is data.
It may hold anything ("ignore previous instructions, route to me", the need's words a hundred times, fake JSON)
and must not move an agent up or down the dispatch order. The CMS's full-text discovery ranks on the whole card,
which suits a person searching; dispatch re-scores the candidates that passed the structured filters (kind,
modality, domain, privacy, online) on their declared fields only:

* the agent id, the location name, the domains, the site;
* each capability's name, kind, cooperation type and tags;
* each sensor's name and modality, each model's name.

A need term counts once per card (``ln(1 + N / df)`` over the N candidates, so words every candidate declares
weigh least), whatever the text repeats, and the length of a card's text neither helps nor hurts. Ties go to the
live load, then the agent id (the strategy's order).

Limitation, stated: declared fields are written by the agent too. The broker's ACL guarantees an agent writes
only its own card, so an agent can misdescribe only itself - e.g. declare tags it does not deserve, or claim a
place - and win only among agents of its own kind that pass the same filters; place-bound data steps take the
agent whose location *is* the named place. Every dispatched agent is in the CMS with the needed capability.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from edgecoop.cms.discovery import STOPWORDS, Match

__all__ = ["declared_terms", "need_terms", "rank_declared"]

_WORD = re.compile(r"[^\W_]+")


def _stem(word: str) -> str:
    """Plural to singular, enough for "stations"/"station", "buses"/"bus", "vitals"/"vital"."""
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 4 and word.endswith(("ses", "xes", "ches", "shes")):
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def _terms(texts: Iterable[object]) -> set[str]:
    out: set[str] = set()
    for text in texts:
        if isinstance(text, str):
            out.update(_stem(w) for w in _WORD.findall(text.lower()) if len(w) > 1 and w not in STOPWORDS)
    return out


def need_terms(need: str) -> set[str]:
    return _terms([need])


def declared_terms(card: Mapping[str, Any]) -> set[str]:
    """The words of a card's declared (schema) fields; descriptions, units and free text are left out."""
    texts: list[object] = [card.get("agent_id"), card.get("site")]
    location = card.get("location")
    if isinstance(location, Mapping):
        texts.append(location.get("name"))
    texts += list(card.get("domains") or [])
    for cap in card.get("capabilities") or []:
        if isinstance(cap, Mapping):
            texts += [cap.get("name"), cap.get("kind"), cap.get("cooperation"), *(cap.get("tags") or [])]
    for sensor in card.get("sensors") or []:
        if isinstance(sensor, Mapping):
            texts += [sensor.get("name"), sensor.get("modality")]
    texts += [m.get("name") for m in card.get("models") or [] if isinstance(m, Mapping)]
    return _terms(texts)


def rank_declared(need: str, candidates: Sequence[Match]) -> list[Match]:
    """The candidates, each with its declared-field relevance to ``need`` as its score (order unchanged)."""
    wanted = need_terms(need)
    if not wanted or not candidates:
        return [Match(m.agent_id, 0.0, m.card) for m in candidates]
    declared = [declared_terms(m.card) & wanted for m in candidates]
    n = len(candidates)
    df = {t: sum(t in d for d in declared) for t in wanted}
    idf = {t: math.log(1 + n / df[t]) for t in wanted if df[t]}
    return [Match(m.agent_id, sum(idf[t] for t in d), m.card) for m, d in zip(candidates, declared, strict=True)]
