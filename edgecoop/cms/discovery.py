"""Discovery queries and semantic rankers.

Two rankers stand behind one interface: SQLite FTS5/BM25 inside :class:`~edgecoop.cms.store.CmsStore`
(always available, no model) and :class:`EmbeddingRanker` (cosine similarity of llama.cpp embeddings from a
local GGUF, when one is configured).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = ["STOPWORDS", "DiscoveryQuery", "EmbeddingRanker", "Match", "Ranker", "fts_query"]

STOPWORDS = frozenset(
    [
        "a",
        "an",
        "and",
        "are",
        "as",
        "at",
        "be",
        "by",
        "can",
        "do",
        "does",
        "for",
        "from",
        "how",
        "i",
        "in",
        "is",
        "it",
        "me",
        "my",
        "near",
        "of",
        "on",
        "or",
        "please",
        "the",
        "there",
        "this",
        "to",
        "what",
        "when",
        "where",
        "which",
        "who",
        "why",
        "will",
        "with",
        "you",
        "your",
        "our",
        "we",
        "any",
        "all",
        "some",
        "tell",
        "give",
        "show",
        "get",
    ]
)
_WORD = re.compile(r"[^\W_]+", re.UNICODE)


def fts_query(need: str) -> str:
    """Turn free text into a safe FTS5 query: quoted terms OR-ed (no FTS syntax from users reaches SQLite)."""
    words = [w.lower() for w in _WORD.findall(need)]
    terms = [w for w in dict.fromkeys(words) if w not in STOPWORDS and len(w) > 1][:24]
    return " OR ".join(f'"{t}"' for t in terms)


@dataclass(frozen=True, slots=True)
class DiscoveryQuery:
    need: str = ""
    kind: str | None = None
    capability: str | None = None
    cooperation: str | None = None
    modality: str | None = None
    domain: str | None = None
    site: str | None = None
    privacy: str | None = None
    accelerator: str | None = None
    min_ram_mb: int = 0
    max_queue: int | None = None
    online_only: bool = True
    exclude: tuple[str, ...] = ()
    limit: int = 10


@dataclass(frozen=True, slots=True)
class Match:
    agent_id: str
    score: float
    card: dict[str, Any] = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"agent_id": self.agent_id, "score": round(self.score, 4), "card": self.card}


class Ranker(Protocol):
    def rank(self, need: str, candidates: Sequence[tuple[str, str]]) -> list[tuple[str, float]]:
        """Return (agent_id, score) best first for (agent_id, card text) candidates."""
        ...


class EmbeddingRanker:
    """Cosine similarity between llama.cpp embeddings of the need and of each card's text (cached)."""

    def __init__(self, model_path: str, *, n_threads: int = 2) -> None:
        try:
            from llama_cpp import Llama
        except ImportError as exc:
            from edgecoop.errors import DependencyMissing

            raise DependencyMissing("llama-cpp-python", "llm") from exc
        self._llm = Llama(model_path=model_path, embedding=True, n_threads=n_threads, verbose=False, n_ctx=512)
        self._cache: dict[str, list[float]] = {}

    def _embed(self, text: str) -> list[float]:
        vec = self._cache.get(text)
        if vec is None:
            raw: Any = self._llm.embed(text[:1500])
            if raw and isinstance(raw[0], list):  # per-token embeddings: mean-pool them
                raw = [sum(col) / len(raw) for col in zip(*raw, strict=True)]
            norm = math.sqrt(sum(x * x for x in raw)) or 1.0
            vec = [x / norm for x in raw]
            if len(self._cache) > 50_000:
                self._cache.clear()
            self._cache[text] = vec
        return vec

    def rank(self, need: str, candidates: Sequence[tuple[str, str]]) -> list[tuple[str, float]]:
        q = self._embed(need)
        scored = [(agent, sum(a * b for a, b in zip(q, self._embed(text), strict=True))) for agent, text in candidates]
        return sorted(scored, key=lambda s: -s[1])

    def close(self) -> None:
        self._llm.close()
