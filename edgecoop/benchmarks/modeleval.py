"""``edgecoop models eval``: each installed model's decode speed, context and a quality score on a small evaluation.

Quality is the mean of two shares, on fixed items that no code under test produced:

* **writing** (scenarios/eval/writing.jsonl): the orchestrator's own writer prompt over hand-written facts; a text
  counts when the faithfulness gate passes it (every number, place and decision from the facts);
* **knowing**: the public general questions of the templated task set (scenarios/tasks.jsonl) in the dev split
  (``split_of``, the understanding benchmark's rule); an answer counts when it holds every accepted keyword.

Decode speed is the median gap between streamed tokens (prompt evaluation not counted), context is the model's
trained context (GGUF metadata). The results go to ``edgecoop.models.eval_path()``, where SLM agents read their
model's quality for their cards, and with ``--json`` to a file (benchmarks/results/models.json).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from collections.abc import Mapping, Sequence
from typing import Any

from edgecoop.benchmarks.rpc import machine_info
from edgecoop.benchmarks.understanding import split_of
from edgecoop.models import KNOWN_MODELS, eval_path, local_path, resolve_model
from edgecoop.orchestrator.compose import Answer
from edgecoop.orchestrator.faithful import check
from edgecoop.orchestrator.writer import MAX_TOKENS, AnswerWriter
from edgecoop.scenarios.data import data_root

__all__ = ["evaluate", "main"]

PLACES = ("Central Station", "Harbour Gate", "City Park", "Old Town Square", "Ring Road", "Kitchen")
OPEN_SYSTEM = "Answer the question in one short sentence."
N_THREADS = 1  # on shared cores one thread is steadier (docs/models.md)


def _writing_items() -> list[dict[str, Any]]:
    path = data_root() / "eval" / "writing.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _knowing_items() -> list[dict[str, Any]]:
    from edgecoop.scenarios.taskset import load_tasks

    items = []
    for t in load_tasks():
        if t.intent != "open" or t.privacy != "public" or split_of(t.id) != "dev":
            continue
        # a keyword the question holds is no evidence: a model that echoes the question would score
        keywords = [k for k in t.expect.get("keywords", []) if k.lower() not in t.question.lower()]
        if keywords:
            items.append({"id": t.id, "question": t.question, "keywords": keywords})
    return items


class _Model:
    def __init__(self, name: str) -> None:
        import llama_cpp

        self.name = name
        self.chat = KNOWN_MODELS[name].chat if name in KNOWN_MODELS else True
        self.llm = llama_cpp.Llama(model_path=str(resolve_model(name)), n_ctx=2048, n_threads=N_THREADS,
                                   n_threads_batch=N_THREADS, verbose=False)  # fmt: skip

    def close(self) -> None:
        self.llm.close()

    def trained_context(self) -> int:
        meta: Mapping[str, str] = self.llm.metadata or {}
        raw = meta.get(f"{meta.get('general.architecture', '')}.context_length", "0")
        return int(raw) if str(raw).isdigit() else 0

    def decode_rate(self) -> float:
        stamps = [time.perf_counter() for _ in self.llm.create_completion(
            "The weather station on the hill reported that", max_tokens=32, temperature=0.0, stream=True)]  # fmt: skip
        gaps = [b - a for a, b in itertools.pairwise(stamps) if b > a]
        return round(1 / statistics.median(gaps), 1) if gaps else 0.0

    def generate(self, system: str, prompt: str, max_tokens: int) -> tuple[str, float]:
        t0 = time.perf_counter()
        out: Any
        if self.chat:
            out = self.llm.create_chat_completion(
                messages=[{"role": "system", "content": system}, {"role": "user", "content": prompt}],
                max_tokens=max_tokens, temperature=0.0)  # fmt: skip
            text = str(out["choices"][0]["message"]["content"] or "")
        else:
            out = self.llm.create_completion(f"{system}\n\n{prompt}", max_tokens=max_tokens, temperature=0.0)
            text = str(out["choices"][0]["text"])
        first = next((line.strip() for line in text.strip().splitlines() if line.strip()), "")
        return first, (time.perf_counter() - t0) * 1000


def evaluate(name: str, *, quick: bool = False) -> dict[str, Any]:
    writing, knowing = _writing_items(), _knowing_items()
    if quick:
        writing, knowing = writing[::3], knowing[::3]
    model = _Model(name)
    writer = AnswerWriter()
    try:
        rate = model.decode_rate()
        ctx = model.trained_context()
        written: list[dict[str, Any]] = []
        for it in writing:
            answer = Answer(it["facts"], it.get("value"), it.get("decision"), [], 0.95, it["facts"])
            draft = writer.draft(it["question"], answer, {}, PLACES)
            inp = draft.plan.stages[0][0].make_input({})
            text, ms = model.generate(inp["system"], inp["prompt"], MAX_TOKENS)
            verdict = check(text, draft.facts)
            written.append({"id": it["id"], "ok": verdict.ok, "ms": round(ms, 1), "text": text[:160],
                            "gate": "passed" if verdict.ok else verdict.reason})  # fmt: skip
        known: list[dict[str, Any]] = []
        for it in knowing:
            text, ms = model.generate(OPEN_SYSTEM, it["question"] if model.chat else f"Question: {it['question']}\n"
                                      "Answer:", 48)  # fmt: skip
            ok = all(k.lower() in text.lower() for k in it["keywords"])
            known.append({"id": it["id"], "ok": ok, "ms": round(ms, 1), "text": text[:120]})
    finally:
        model.close()
    w = sum(r["ok"] for r in written) / len(written) if written else 0.0
    k = sum(r["ok"] for r in known) / len(known) if known else 0.0
    return {
        "tokens_per_s": rate,
        "ctx": ctx,
        "quality": round((w + k) / 2, 4),
        "writing_faithful": round(w, 4),
        "knowing_correct": round(k, 4),
        "writing_items": len(written),
        "knowing_items": len(known),
        "writing_p50_ms": round(statistics.median(r["ms"] for r in written), 1) if written else 0.0,
        "knowing_p50_ms": round(statistics.median(r["ms"] for r in known), 1) if known else 0.0,
        "writing": written,
        "knowing": known,
    }


def _installed(names: Sequence[str]) -> list[str]:
    if names:
        return list(names)
    out = []
    for n, m in KNOWN_MODELS.items():
        if local_path(n) is not None or m.assembled:
            try:
                resolve_model(n)
            except Exception:  # not installed: nothing to evaluate  # noqa: S112
                continue
            out.append(n)
    return out


def run(names: Sequence[str] = (), *, quick: bool = False) -> dict[str, Any]:
    result: dict[str, Any] = {"benchmark": "models", "models": {}, "params": {"quick": quick, "n_threads": N_THREADS}}
    result["load_at_start"] = machine_info()["loadavg_1m"]
    for name in _installed(names):
        result["models"][name] = evaluate(name, quick=quick)
    result["machine"] = machine_info()
    return result


def _save(result: Mapping[str, Any]) -> None:
    """Merge into the eval file the agents read (other models' earlier measurements stay)."""
    path = eval_path()
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        old = {}
    models = {**(old.get("models", {}) if isinstance(old, dict) else {}), **result["models"]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**result, "models": models}, indent=2) + "\n", encoding="utf-8")


def main(args: argparse.Namespace) -> int:
    result = run(getattr(args, "names", []) or [], quick=bool(getattr(args, "quick", False)))
    if not result["models"]:
        print("no installed model to evaluate (edgecoop models install NAME)")
        return 1
    _save(result)
    print(f"{'model':<14}{'tokens/s':>9}{'ctx':>8}{'quality':>9}{'writing':>9}{'knowing':>9}")
    for name, r in result["models"].items():
        print(f"{name:<14}{r['tokens_per_s']:>9.1f}{r['ctx']:>8}{r['quality']:>9.2f}{r['writing_faithful']:>9.2f}"
              f"{r['knowing_correct']:>9.2f}")  # fmt: skip
    print(f"recorded in {eval_path()} (agents state it on their cards)")
    if getattr(args, "json", None):
        with open(args.json, "w", encoding="utf-8") as f:
            f.write(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0
