"""The model-backed parser: a small language model fills the task specification, constrained by a grammar.

The GBNF grammar is built from the live vocabulary at call time, so the model can only ever name an operation we
have, a modality some card declares and a place some card stands at (or ``none``): it cannot invent an agent.
It runs on the orchestrator's worker thread, and only when the fast parser is unsure.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

from edgecoop.errors import DependencyMissing
from edgecoop.orchestrator.parser import FastParser, personal_content
from edgecoop.orchestrator.spec import Operation, Target, TaskSpec
from edgecoop.orchestrator.text import tokens
from edgecoop.orchestrator.vocabulary import Vocabulary, lexicon

__all__ = ["ModelParser"]

_HELP = {
    Operation.READ: "a live sensor value at one place",
    Operation.CHECK: "is a value above a limit, safe, normal, congested",
    Operation.AGGREGATE: "highest, lowest or average of one quantity over all places",
    Operation.COMPARE: "one quantity at two places",
    Operation.COUNT: "how many vehicles or people a street camera sees",
    Operation.SUMMARISE: "all of my vital signs",
    Operation.LOOKUP: "what a rule, guideline, procedure or opening hours say",
    Operation.OPEN: "any other question",
}


def _lit(s: str) -> str:
    return json.dumps(s)


class ModelParser:
    """SmolLM2 (or any chat GGUF) choosing operation, quantity and place under a vocabulary-built grammar."""

    name = "model"

    def __init__(self, model_path: str, *, n_threads: int = 2) -> None:
        try:
            from llama_cpp import Llama
        except ImportError as exc:
            raise DependencyMissing("llama-cpp-python", "llm") from exc
        self._llm = Llama(model_path=model_path, n_ctx=2048, n_threads=n_threads, verbose=False)
        self._grammar: Any = None
        self._version = -1
        self._fast = FastParser()

    def _grammar_for(self, vocab: Vocabulary) -> Any:
        from llama_cpp.llama_grammar import LlamaGrammar

        if self._grammar is None or self._version != vocab.version:
            ops = " | ".join(_lit(o.value) for o in Operation)
            mods = " | ".join([_lit("none"), *(_lit(m) for m in sorted(vocab.quantities)),
                               *(_lit(o) for o in lexicon().objects)])  # fmt: skip
            places = " | ".join([_lit("none"), *(_lit(p) for p in sorted(vocab.places))])
            gbnf = (
                'root ::= "{\\"op\\": \\"" op "\\", \\"quantity\\": \\"" mod "\\", \\"place\\": \\"" place "\\"}"\n'
                f"op ::= {ops}\nmod ::= {mods}\nplace ::= {places}\n"
            )
            self._grammar = LlamaGrammar.from_string(gbnf, verbose=False)
            self._version = vocab.version
        return self._grammar

    def parse(self, question: str, vocab: Vocabulary, *, privacy: str | None = None) -> TaskSpec:
        fast = self._fast.parse(question, vocab, privacy=privacy)
        menu = "; ".join(f"{o.value} = {h}" for o, h in _HELP.items())
        quantities = ", ".join(f"{m} ({q.name})" for m, q in sorted(vocab.quantities.items()))
        system = (f"Turn the request into JSON. Operations: {menu}. Quantities: {quantities}, vehicles, pedestrians. "
                  f"Places: {', '.join(sorted(vocab.places))}. Use none when the request names none.")  # fmt: skip
        out: Any = self._llm.create_chat_completion(
            messages=[{"role": "system", "content": system}, {"role": "user", "content": question[:500]}],
            grammar=self._grammar_for(vocab), max_tokens=48, temperature=0.0,
        )  # fmt: skip
        try:
            d = json.loads(str(out["choices"][0]["message"]["content"]))
            op = Operation(d["op"])
        except (ValueError, KeyError, TypeError):
            return replace(fast, parser=self.name)
        modality = d.get("quantity") if d.get("quantity") != "none" else None
        place = d.get("place") if d.get("place") != "none" else None
        personal = personal_content(tokens(question)) or privacy == "private"
        # open questions (general or not), look-ups and summaries stay the fast parser's judgement
        if modality is None or op in (Operation.OPEN, Operation.LOOKUP, Operation.SUMMARISE):
            return replace(fast, parser=self.name)
        if place is not None and place not in vocab.providers(modality) and modality in vocab.quantities:
            return replace(fast, unknown=f"no agent at {place} measures {vocab.quantities[modality].name}",
                           parser=self.name)  # fmt: skip
        target = Target(modality, None if op is Operation.AGGREGATE else place)
        return TaskSpec(op, (target,), personal=personal, confidence=0.6, parser=self.name)

    def close(self) -> None:
        self._llm.close()
