"""The edge model's confidence in its answer to an open question: measured from the model, calibrated.

The SLM agent answers greedily and draws :data:`SAMPLES` more answers at a higher temperature; the agreement of
the samples with the answer (self-consistency, ``agreement`` in the slm result) is the raw signal. A calibration
fitted on the dev split of the labelled open questions (``edgecoop bench cascade --calibrate``; never on the test
split) maps it to the probability that the answer is correct: bins of agreement with the share of correct answers
in each, made monotone. The table ships beside this module (``calibration.json``); without it the raw agreement is
used. Below :data:`THRESHOLD` the cascade escalates.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgecoop.orchestrator.plans import Plan, Step

__all__ = ["OPEN_TOKENS", "SAMPLES", "THRESHOLD", "Calibration", "fit", "load_calibration", "open_plan"]

SAMPLES = 2
THRESHOLD = 0.5
OPEN_MAX_TOKENS = 64
#: what an open answer costs the model: the answer and the samples (24 tokens each, slm.py)
OPEN_TOKENS = OPEN_MAX_TOKENS + SAMPLES * 24
_FILE = Path(__file__).with_name("calibration.json")


@dataclass(frozen=True, slots=True)
class Calibration:
    """``edges[i]`` is the upper agreement of bin i; ``probs[i]`` the share of correct answers in it."""

    edges: tuple[float, ...] = ()
    probs: tuple[float, ...] = ()

    def __call__(self, agreement: float) -> float:
        if not self.edges:
            return max(0.0, min(1.0, agreement))
        i = min(bisect.bisect_left(self.edges, agreement), len(self.probs) - 1)
        return self.probs[i]

    def to_dict(self) -> dict[str, Any]:
        return {"edges": list(self.edges), "probs": list(self.probs)}


def fit(pairs: Iterable[tuple[float, bool]], bins: int = 3) -> Calibration:
    """Equal-count bins of agreement, each with its share of correct answers, pooled until non-decreasing."""
    data = sorted(pairs)
    if not data:
        return Calibration()
    size = max(1, len(data) // bins)
    groups = [data[i : i + size] for i in range(0, len(data), size)]
    if len(groups) > 1 and len(groups[-1]) < size:  # a short tail joins the bin before it
        groups[-2] += groups.pop()
    blocks = [[g[-1][0], sum(ok for _, ok in g), len(g)] for g in groups]
    merged: list[list[float]] = []
    for b in blocks:  # pool adjacent violators: a higher agreement never means a lower probability
        merged.append([float(x) for x in b])
        while len(merged) > 1 and merged[-2][1] / merged[-2][2] > merged[-1][1] / merged[-1][2]:
            last = merged.pop()
            merged[-1] = [last[0], merged[-1][1] + last[1], merged[-1][2] + last[2]]
    edges = (*(round(e, 4) for e, _, _ in merged[:-1]), 1.0)
    return Calibration(edges, tuple(round(k / n, 4) for _, k, n in merged))


def load_calibration(path: Path = _FILE) -> Calibration:
    try:
        d: Mapping[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        return Calibration(tuple(float(e) for e in d["edges"]), tuple(float(p) for p in d["probs"]))
    except (OSError, ValueError, KeyError, TypeError):
        return Calibration()


def open_plan(question: str, agent: str | None = None) -> Plan:
    """The edge model's answer to an open question, with the samples its confidence is measured from; ``agent``:
    the SLM agent the planner chose by measured quality and speed (modelchoice.py)."""
    step = Step("slm", "slm", {"prompt": question, "max_tokens": OPEN_MAX_TOKENS, "samples": SAMPLES}, need=question,
                timeout_s=60, agent=agent)  # fmt: skip
    return Plan(((step,),), "single", "edge")
