"""The ``knowledge`` capability: a domain knowledge base (markdown/text passages) searched with SQLite FTS5.

Documents are split into passages at markdown headings and blank lines (at most ``max_chars`` each) and indexed
in an FTS5 table with the porter stemmer; questions are ranked with BM25 (titles weigh more than text). The
SQLite connection lives on one dedicated worker thread and is never touched from the event loop.

Questions are never passed to FTS5 as query syntax: they are split into word tokens, stop words are dropped,
and each remaining token is quoted (``"token"``) and OR-ed, so ``"NEAR( OR *`` is just text.

Request ``{"question": str, "k": 3}`` -> ``{"passages": [{"doc", "title", "text", "score"}], "answer",
"confidence"}``; the answer is extractive (the best sentences of the top passage).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import sqlite3
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgecoop.agents.handlers.base import AgentContext, CallContext, Handler
from edgecoop.errors import CapabilityError, ConfigError
from edgecoop.worker import Worker

if TYPE_CHECKING:
    from edgecoop.agents.config import AgentConfig, CapabilitySpec
    from edgecoop.messages import CapabilityInfo, ModelInfo

__all__ = ["KnowledgeBase", "KnowledgeHandler", "Passage", "chunk_markdown", "query_terms"]

_SUFFIXES = (".md", ".markdown", ".txt")
_MAX_QUESTION = 2000
_MAX_K = 20
_MAX_TERMS = 32
# Common English function words. "who" is kept on purpose: in these domains it is usually the WHO.
_STOP_WORDS = """a an and are as at be but by can do does for from has have how i if in into is it its me my of on or
our should so than that the their them then there these they this to was we were what when where which why will
with would you your about after before during over under per any all more most some such only also"""
_STOP = frozenset(_STOP_WORDS.split())
_TOKEN = re.compile(r"\w+", re.UNICODE)
_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")


@dataclass(frozen=True, slots=True)
class Passage:
    doc: str
    title: str
    text: str


def query_terms(question: str) -> list[str]:
    """The searchable tokens of a free-text question, lower-cased, stop words removed, order kept, unique."""
    seen: dict[str, None] = {}
    for token in _TOKEN.findall(question.lower()):
        if token not in _STOP and token not in seen:
            seen[token] = None
    return list(seen)[:_MAX_TERMS]


def _fts_query(terms: Iterable[str]) -> str:
    # Each term quoted as an FTS5 string: operators, columns filters, NEAR, * and ( ) lose their meaning.
    return " OR ".join('"' + t.replace('"', '""') + '"' for t in terms)


def _clean(text: str) -> str:
    """Markdown to plain text for passages and answers: no emphasis markers, table pipes or heading hashes."""
    text = re.sub(r"^\s*#+\s*", "", text, flags=re.MULTILINE)
    text = re.sub(r"^\s*\|?[-:| ]+\|?\s*$", "", text, flags=re.MULTILINE)  # table rulers
    text = text.replace("**", "").replace("__", "").replace("`", "")
    text = re.sub(r"[ \t]*\|[ \t]*", " | ", text)
    text = re.sub(r"[ \t]+", " ", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip().strip("|").strip()


def _unwrap(text: str) -> str:
    """Join hard-wrapped paragraph and list-item lines; keep table rows, list items and blank lines apart.

    Block quotes (``>``) are dropped: in these documents they hold disclaimers, not answers.
    """
    out: list[str] = []
    for line in text.split("\n"):
        s = line.strip()
        if s.startswith(">"):
            continue
        new_block = not s or s.startswith(("|", "- ", "* ", "#")) or re.match(r"\d+\. ", s) is not None
        if out and out[-1].strip() and not out[-1].lstrip().startswith("|") and not new_block:
            out[-1] = out[-1].rstrip() + " " + s
        else:
            out.append(s)
    return "\n".join(out)


def chunk_markdown(doc: str, text: str, *, max_chars: int = 900) -> list[Passage]:
    """Split a document into passages: one per heading section, long sections split at blank lines.

    Each passage's title is ``"<document title> › <section heading>"``.
    """
    lines = text.splitlines()
    doc_title = next((ln.lstrip("#").strip() for ln in lines if ln.startswith("# ")), doc)
    sections: list[tuple[str, list[str]]] = [(doc_title, [])]
    for ln in lines:
        if re.match(r"^#{1,6}\s", ln):
            heading = ln.lstrip("#").strip()
            sections.append((doc_title if heading == doc_title else f"{doc_title} › {heading}", []))
        else:
            sections[-1][1].append(ln)
    out: list[Passage] = []
    for title, body in sections:
        paragraphs = [p.strip() for p in _unwrap("\n".join(body)).split("\n\n") if p.strip()]
        chunk = ""
        for para in paragraphs:
            if chunk and len(chunk) + len(para) + 2 > max_chars:
                out.append(Passage(doc, title, _clean(chunk)))
                chunk = ""
            chunk = f"{chunk}\n\n{para}" if chunk else para
        if chunk:
            out.append(Passage(doc, title, _clean(chunk)))
    return [p for p in out if p.text]


def _sentences(text: str) -> list[str]:
    parts: list[str] = []
    for raw in text.split("\n"):
        line = raw.strip(" -*|")
        if line:
            parts.extend(s.strip() for s in _SENTENCE.split(line) if s.strip())
    return parts


def _stem(word: str) -> str:
    """A crude stem for answer selection (the index itself uses SQLite's porter stemmer)."""
    for suffix in ("ations", "ation", "ings", "ing", "ies", "es", "ed", "s"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            return word[: -len(suffix)]
    return word


def extract_answer(
    passage_text: str, terms: list[str], *, idf: Mapping[str, float] | None = None, max_sentences: int = 2
) -> tuple[str, float]:
    """The passage's sentences that best cover the question's terms, in reading order; and their coverage.

    Terms are weighted by ``idf`` (stem -> weight; rare words such as "gridlock" matter more than "level").
    Coverage is the weighted share of the question's terms found in the chosen sentences (0..1).
    """
    weights = {_stem(t): (idf or {}).get(_stem(t), 1.0) for t in terms}
    total = sum(weights.values())
    if total <= 0:
        return "", 0.0
    scored = []
    for i, sentence in enumerate(_sentences(passage_text)):
        words = {_stem(w) for w in _TOKEN.findall(sentence.lower())}
        hit = sum(w for stem, w in weights.items() if stem in words)
        has_number = bool(re.search(r"\d", sentence))
        scored.append((hit * (1.1 if has_number else 1.0), -i, sentence, hit))
    if not scored:
        return "", 0.0
    scored.sort(reverse=True)
    best = [s for s in scored[:max_sentences] if s[3] > 0] or scored[:1]
    if len(best) > 1 and best[1][0] < 0.8 * best[0][0]:
        best = best[:1]
    best.sort(key=lambda s: -s[1])
    found = {stem for s in best for stem in weights if stem in {_stem(w) for w in _TOKEN.findall(s[2].lower())}}
    coverage = sum(weights[stem] for stem in found) / total
    return " ".join(s[2] for s in best), coverage


def _idf(texts: Iterable[str]) -> dict[str, float]:
    """Inverse document frequency per crude stem over the passages: ``log(1 + N / df)``."""
    df: Counter[str] = Counter()
    n = 0
    for text in texts:
        n += 1
        df.update({_stem(w) for w in _TOKEN.findall(text.lower())})
    return {stem: math.log(1 + n / c) for stem, c in df.items()}


class KnowledgeBase:
    """The FTS5 index. Blocking: create and use it on a single thread (the handler's worker)."""

    def __init__(self, db: str = ":memory:") -> None:
        self._stack = contextlib.ExitStack()
        self.conn = sqlite3.connect(db)
        self._stack.callback(self.conn.close)
        self._idf: dict[str, float] = {}
        self._doc_idf: dict[str, float] = {}
        try:
            self.conn.execute(
                "CREATE VIRTUAL TABLE IF NOT EXISTS passages USING fts5("
                "doc UNINDEXED, title, text, tokenize = 'porter unicode61')"
            )
        except sqlite3.OperationalError as exc:
            self.close()
            raise ConfigError(f"this SQLite ({sqlite3.sqlite_version}) has no FTS5: {exc}") from exc

    def close(self) -> None:
        self._stack.close()

    def rebuild(self, passages: Iterable[Passage]) -> int:
        with self.conn:  # one transaction: readers never see a half-built index
            self.conn.execute("DELETE FROM passages")
            self.conn.executemany(
                "INSERT INTO passages (doc, title, text) VALUES (?, ?, ?)",
                ((p.doc, p.title, p.text) for p in passages),
            )
        self._idf = _idf(p[0] for p in self.conn.execute("SELECT title || ' ' || text FROM passages"))
        by_doc: dict[str, set[str]] = {}
        for doc, text in self.conn.execute("SELECT doc, title || ' ' || text FROM passages"):
            by_doc.setdefault(doc, set()).update(_stem(w) for w in _TOKEN.findall(text.lower()))
        self._doc_idf = {
            st: math.log(1 + len(by_doc) / c) for st, c in Counter(s for v in by_doc.values() for s in v).items()
        }
        count: int = self.conn.execute("SELECT count(*) FROM passages").fetchone()[0]
        return count

    def documents(self) -> list[dict[str, Any]]:
        rows = self.conn.execute("SELECT doc, min(title), count(*) FROM passages GROUP BY doc ORDER BY doc")
        return [{"doc": d, "title": t.split(" › ")[0], "passages": n} for d, t, n in rows]

    def search(self, question: str, k: int = 3) -> dict[str, Any]:
        terms = query_terms(question)
        if not terms:
            return {"passages": [], "answer": "", "confidence": 0.0, "terms": []}
        rows = self.conn.execute(
            # bm25() is lower-is-better; column weights: doc (unindexed), title x3, text x1
            "SELECT doc, title, text, -bm25(passages, 0.0, 3.0, 1.0) AS score "
            "FROM passages WHERE passages MATCH ? ORDER BY score DESC LIMIT ?",
            (_fts_query(terms), max(k, _CANDIDATES)),
        ).fetchall()
        # FTS5's BM25 gives a word in half of the passages no weight at all ("NEWS2" in every passage of the NEWS2
        # document): the question's words are weighted again by how few *documents* hold them
        stems = {_stem(t) for t in terms}

        def score(row: tuple[str, str, str, float]) -> float:
            words = {_stem(w) for w in _TOKEN.findall(f"{row[1]} {row[2]}".lower())}
            return float(row[3]) + sum(self._doc_idf.get(st, 0.0) for st in stems & words)

        ranked = sorted(((score(r), r) for r in rows), key=lambda sr: sr[0], reverse=True)[:k]
        passages = [{"doc": d, "title": t, "text": x, "score": round(s, 4)} for s, (d, t, x, _) in ranked]
        if not passages:
            return {"passages": [], "answer": "", "confidence": 0.0, "terms": terms}
        answer, coverage = extract_answer(passages[0]["text"], terms, idf=self._idf)
        top = passages[0]["score"]
        runner_up = passages[1]["score"] if len(passages) > 1 else 0.0
        margin = (top - runner_up) / top if top > 0 else 0.0
        confidence = round(max(0.0, min(1.0, 0.75 * coverage + 0.25 * margin)), 3)
        return {"passages": passages, "answer": answer, "confidence": confidence, "terms": terms}


_MAX_TOPICS = 160
_CANDIDATES = 50  # passages re-ranked per question (a knowledge base holds tens to a few thousand)


def document_topics(texts: Iterable[str], *, limit: int = _MAX_TOPICS) -> tuple[str, ...]:
    """The words the documents are about: every heading word first, then words that recur (by frequency).

    A suggestion for the operator (``edgecoop knowledge-topics``), who reviews it and declares it as the capability's
    ``options.topics``; the card publishes the declared list so the orchestrator routes look-ups by it.
    """
    headings: dict[str, None] = {}
    counts: dict[str, int] = {}
    for text in texts:
        for line in text.splitlines():
            words = [w for w in _TOKEN.findall(line.lower()) if w not in _STOP and len(w) > 2 and not w.isdigit()]
            if line.lstrip().startswith("#"):
                headings.update(dict.fromkeys(words))
            for w in words:
                counts[w] = counts.get(w, 0) + 1
    recurring = sorted((w for w, n in counts.items() if n >= 2 and w not in headings), key=lambda w: (-counts[w], w))
    return tuple([*headings, *recurring][:limit])


def _document_files(spec: Any, base: Path) -> list[Path]:
    items = [spec] if isinstance(spec, str) else list(spec or [])
    files: list[Path] = []
    for item in items:
        path = Path(str(item))
        path = path if path.is_absolute() else base / path
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.suffix.lower() in _SUFFIXES and p.is_file()))
        elif path.is_file():
            files.append(path)
        else:
            raise ConfigError(f"knowledge document {str(path)!r} does not exist")
    return files


def _load(files: list[Path], root: Path, max_chars: int) -> list[Passage]:
    passages: list[Passage] = []
    for f in files:
        try:
            name = str(f.relative_to(root))
        except ValueError:
            name = f.name
        passages.extend(chunk_markdown(name, f.read_text(encoding="utf-8"), max_chars=max_chars))
    return passages


class KnowledgeHandler(Handler):
    """Answers domain questions from a document knowledge base (SQLite FTS5, BM25, extractive answers)."""

    kind = "knowledge"
    cooperation = "knowledge"

    def __init__(self, spec: CapabilitySpec, config: AgentConfig) -> None:
        super().__init__(spec, config)
        self.base = config.source.parent if config.source is not None else Path.cwd()
        self.files = _document_files(self.options.get("documents", []), self.base)
        if not self.files:
            raise ConfigError(f"capability {spec.name!r}: options.documents names no .md/.txt files")
        db = str(self.options.get("db", ":memory:"))
        self.db = db if db == ":memory:" or Path(db).is_absolute() else str(self.base / db)
        self.domains = tuple(str(d) for d in self.options.get("domains", ()))
        self.max_chars = int(self.options.get("max_chars", 900))
        # declared by the operator (``edgecoop knowledge-topics DOCS`` suggests them), never read from the documents
        # at run time: a poisoned document must not steer which agent the orchestrator asks
        self.topics = tuple(str(t) for t in self.options.get("topics", ()))
        self.passage_count = 0
        self._worker: Worker | None = None
        self._kb: KnowledgeBase | None = None  # worker thread only
        # With an ``slm`` options table the agent also has a small language model: answers are then also
        # written by it, grounded in the retrieved passages and citing them (options as for the slm handler).
        self._slm: Handler | None = None
        slm_options = self.options.get("slm")
        if slm_options is not None:
            if not isinstance(slm_options, Mapping):
                raise ConfigError(f"capability {spec.name!r}: options.slm must be a table of slm options")
            from edgecoop.agents.config import CapabilitySpec
            from edgecoop.agents.handlers.slm import SlmHandler

            self._slm = SlmHandler(CapabilitySpec(f"{spec.name}-slm", "slm", options=dict(slm_options)), config)

    def models(self) -> list[ModelInfo]:
        return self._slm.models() if self._slm is not None else []

    def info(self) -> CapabilityInfo:
        base = super().info()
        tags = tuple(dict.fromkeys((*base.tags, *self.domains)))
        return replace(base, tags=tags, topics=self.topics)

    async def start(self, ctx: AgentContext) -> None:
        self._worker = Worker(f"knowledge-{ctx.agent_id}")
        try:
            self.passage_count = await self._worker.run(self._open)
            if self._slm is not None:
                await self._slm.start(ctx)
        except BaseException:
            await self.stop()
            raise

    def _open(self) -> int:
        self._kb = KnowledgeBase(self.db)
        root = self.files[0].parent if len(self.files) == 1 else Path(*_common_parts(self.files))
        return self._kb.rebuild(_load(self.files, root, self.max_chars))

    def _close(self) -> None:
        if self._kb is not None:
            self._kb.close()
            self._kb = None

    async def stop(self) -> None:
        if self._slm is not None:
            await self._slm.stop()
        worker, self._worker = self._worker, None
        if worker is not None:
            await worker.run(self._close)
            await asyncio.to_thread(worker.close)

    async def handle(self, request_input: Mapping[str, Any], call: CallContext) -> Mapping[str, Any]:
        worker = self._worker
        if worker is None or self._kb is None:
            raise CapabilityError("knowledge base is not open")
        if request_input.get("op") == "documents":
            kb = self._kb
            return {"documents": await worker.run(kb.documents), "domains": list(self.domains)}
        question = request_input.get("question", request_input.get("text"))
        if not isinstance(question, str) or not question.strip():
            raise ValueError("question must be a non-empty string")
        if len(question) > _MAX_QUESTION:
            raise ValueError(f"question is longer than {_MAX_QUESTION} characters")
        k = request_input.get("k", 3)
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= _MAX_K:
            raise ValueError(f"k must be an integer in 1..{_MAX_K}")
        result = await worker.run(self._kb.search, question, k)
        result["domains"] = list(self.domains)
        if self._slm is not None and result.get("passages") and request_input.get("grounded", True):
            result |= await self._grounded(question, result["passages"], call)
        return result

    async def _grounded(self, question: str, passages: list[dict[str, Any]], call: CallContext) -> dict[str, Any]:
        """The agent's SLM answers from the retrieved passages only, and the answer names its sources."""
        assert self._slm is not None
        context = "\n".join(f"[{i + 1}] ({p['doc']}) {p['text'][:600]}" for i, p in enumerate(passages[:3]))
        out = await self._slm.handle(
            {
                "system": "Answer the question using only the numbered sources. Be brief. "
                "If the sources do not answer it, say so.",
                "prompt": f"Sources:\n{context}\n\nQuestion: {question}\nAnswer:",
                "max_tokens": int(self.options.get("grounded_max_tokens", 80)),
            },
            call,
        )
        cited = list(dict.fromkeys(str(p["doc"]) for p in passages[:3]))
        text = str(out.get("text", "")).strip()
        # the citation is attached by us, not left to a 135M-parameter model to get right
        return {"grounded_answer": f"{text} [sources: {', '.join(cited)}]", "cited": cited, "model": out.get("model")}


def _common_parts(files: list[Path]) -> tuple[str, ...]:
    parts = files[0].parent.parts
    for f in files[1:]:
        other = f.parent.parts
        n = 0
        while n < min(len(parts), len(other)) and parts[n] == other[n]:
            n += 1
        parts = parts[:n]
    return parts or ("/",)
