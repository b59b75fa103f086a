"""``edgecoop bench classifier``: accuracy and latency of the Classifier Engine on the labelled task set.

Accuracy counts a task as right when the intent, the route (edge / cloud / refuse) and the privacy class all match
the label. The rule classifier is the baseline measured in the same run as the SLM classifier.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

__all__ = ["evaluate", "main"]

PLACES = ["Central Station", "City Park", "Old Town Square", "Harbour Gate", "Bus line 42", "Ring Road",
          "Traffic Control Centre", "City Hall", "Patient home", "Patient phone"]  # fmt: skip


def evaluate(classifier: Any, tasks: list[Any]) -> dict[str, Any]:
    right = intent_right = 0
    by_split: dict[str, list[int]] = {}
    t0 = time.perf_counter()
    for t in tasks:
        c = classifier.classify(t.question, places=PLACES)
        route = "edge" if c.edge_capable else ("refuse" if c.privacy == "private" else "cloud")
        ok = c.intent.value == t.intent and route == t.route and c.privacy == t.privacy
        right += ok
        intent_right += c.intent.value == t.intent
        by_split.setdefault(t.split, [0, 0])
        by_split[t.split][0] += ok
        by_split[t.split][1] += 1
    elapsed = time.perf_counter() - t0
    return {
        "tasks": len(tasks),
        "accuracy": round(right / len(tasks), 4),
        "intent_accuracy": round(intent_right / len(tasks), 4),
        "by_split": {k: round(a / n, 4) for k, (a, n) in by_split.items()},
        "ms_per_task": round(1000 * elapsed / len(tasks), 3),
    }


def main(args: argparse.Namespace) -> dict[str, Any]:
    from edgecoop.orchestrator.classifier import RuleClassifier
    from edgecoop.scenarios.taskset import load_tasks

    tasks = load_tasks()
    if getattr(args, "quick", False):
        tasks = tasks[::5]
    out: dict[str, Any] = {"rule": evaluate(RuleClassifier(), tasks)}
    try:
        from edgecoop.models import resolve_model
        from edgecoop.orchestrator.classifier import SlmClassifier

        slm = SlmClassifier(str(resolve_model("smollm2-135m")))
        out["slm"] = evaluate(slm, tasks)
        slm.close()
    except Exception as exc:  # the llm extra or the model is missing: report the rule classifier alone
        out["slm"] = {"error": str(exc)}
    print(f"{'classifier':<12}{'accuracy':>10}{'intent':>9}{'dev':>8}{'holdout':>9}{'ms/task':>10}")
    for name, r in out.items():
        if "error" in r:
            print(f"{name:<12} unavailable: {r['error']}")
            continue
        print(f"{name:<12}{100 * r['accuracy']:>9.1f}%{100 * r['intent_accuracy']:>8.1f}%"
              f"{100 * r['by_split'].get('dev', 0):>7.1f}%{100 * r['by_split'].get('holdout', 0):>8.1f}%{r['ms_per_task']:>10.2f}")  # fmt: skip
    return out
