"""``edgecoop bench cascade``: calibrate the edge model's confidence on the dev split, and draw the cascade curve.

Calibration: the public open questions of scenarios/tasks.jsonl whose id falls in the dev split (``split_of``, the
understanding benchmark's rule; the test split is never used here) go to a SmolLM2 agent through the orchestrator
under ``edge-only`` with the raw agreement as confidence; each answer is scored by the task set's keywords; the
monotone bins fitted to (agreement, correct) are written to ``edgecoop/orchestrator/calibration.json``, which the
engine loads. The quality-versus-cloud-calls curve itself comes from ``bench scheduling`` (one run, every strategy):
:func:`curve` computes it and :func:`draw` renders it as a PNG with OpenCV.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from edgecoop.benchmarks.rpc import machine_info
from edgecoop.benchmarks.understanding import split_of

__all__ = ["curve", "draw", "main", "run"]

CALIBRATION_FILE = Path(__file__).resolve().parents[1] / "orchestrator" / "calibration.json"


def curve(
    points: Sequence[Mapping[str, Any]], others_correct: int, others_calls: int, total: int
) -> list[dict[str, Any]]:
    """Correctness and cloud calls of the cascade at every threshold, from each open question's edge confidence,
    edge correctness and cloud correctness (``points``); the other tasks add ``others_correct`` and
    ``others_calls`` whatever the threshold."""
    thresholds = sorted({0.0, 1.01, *(float(p["confidence"]) + 1e-6 for p in points)})
    out = []
    for th in thresholds:
        up = [p for p in points if float(p["confidence"]) < th]
        correct = others_correct + sum(bool(p["cloud_ok"]) for p in up) + sum(
            bool(p["edge_ok"]) for p in points if float(p["confidence"]) >= th)  # fmt: skip
        out.append({"threshold": round(min(th, 1.0), 4), "cloud_calls": others_calls + len(up),
                    "correct_fraction": round(correct / total, 4)})  # fmt: skip
    return out


def draw(path: Path, points: Sequence[Mapping[str, Any]], marks: Mapping[str, tuple[float, float]],
         title: str) -> None:  # fmt: skip
    """The curve (cloud calls on x, correct fraction on y) with each strategy and the oracle as labelled marks."""
    import cv2
    import numpy as np

    w, h, m = 900, 560, 70
    img = np.full((h, w, 3), 255, np.uint8)
    xs = [p["cloud_calls"] for p in points] + [v[0] for v in marks.values()]
    x_max = max(1.0, max(xs) * 1.05)

    def at(calls: float, frac: float) -> tuple[int, int]:
        return int(m + (w - 2 * m) * calls / x_max), int(h - m - (h - 2 * m) * frac)

    black, grey, blue, red = (0, 0, 0), (200, 200, 200), (180, 90, 20), (40, 40, 200)
    for i in range(11):
        y = at(0, i / 10)[1]
        cv2.line(img, (m, y), (w - m, y), grey, 1)
        cv2.putText(img, f"{i * 10}%", (10, y + 5), cv2.FONT_HERSHEY_SIMPLEX, 0.45, black, 1, cv2.LINE_AA)
    for i in range(6):
        calls = x_max * i / 5
        x = at(calls, 0)[0]
        cv2.line(img, (x, h - m), (x, h - m + 6), black, 1)
        cv2.putText(img, f"{calls:.0f}", (x - 10, h - m + 22), cv2.FONT_HERSHEY_SIMPLEX, 0.45, black, 1, cv2.LINE_AA)
    cv2.rectangle(img, (m, m), (w - m, h - m), black, 1)
    pts = sorted(points, key=lambda p: (p["cloud_calls"], p["correct_fraction"]))
    for a, b in itertools.pairwise(pts):
        cv2.line(img, at(a["cloud_calls"], a["correct_fraction"]), at(b["cloud_calls"], b["correct_fraction"]), blue, 2,
                 cv2.LINE_AA)  # fmt: skip
    for p in pts:
        cv2.circle(img, at(p["cloud_calls"], p["correct_fraction"]), 3, blue, -1, cv2.LINE_AA)
    grouped: dict[tuple[float, float], list[str]] = {}
    for name, pos in marks.items():  # strategies at the same point share one label
        grouped.setdefault(pos, []).append(name)
    for i, ((calls, frac), names) in enumerate(sorted(grouped.items())):
        name = " = ".join(sorted(names))
        x, y = at(calls, frac)
        cv2.drawMarker(img, (x, y), red, cv2.MARKER_TILTED_CROSS, 12, 2)
        cv2.putText(img, name, (x + 8, y - 6 - 12 * (i % 3)), cv2.FONT_HERSHEY_SIMPLEX, 0.42, red, 1, cv2.LINE_AA)
    cv2.putText(img, title, (m, 40), cv2.FONT_HERSHEY_SIMPLEX, 0.6, black, 1, cv2.LINE_AA)
    cv2.putText(img, "cloud calls", (w // 2 - 40, h - 20), cv2.FONT_HERSHEY_SIMPLEX, 0.5, black, 1, cv2.LINE_AA)
    cv2.putText(img, "correct", (5, m - 12), cv2.FONT_HERSHEY_SIMPLEX, 0.5, black, 1, cv2.LINE_AA)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), img):
        raise OSError(f"could not write {path}")


async def run(*, write: bool = True) -> dict[str, Any]:
    from edgecoop.agents import Agent
    from edgecoop.broker import MosquittoProcess
    from edgecoop.connection import BrokerSettings
    from edgecoop.orchestrator import Orchestrator
    from edgecoop.orchestrator.confidence import Calibration, fit
    from edgecoop.scenarios.loader import load_scenario
    from edgecoop.scenarios.taskset import load_tasks, score

    tasks = [t for t in load_tasks() if t.intent == "open" and t.privacy == "public" and split_of(t.id) == "dev"]
    with MosquittoProcess() as broker:
        settings = BrokerSettings(port=broker.port, keepalive=30)
        agents = [Agent(c) for c in load_scenario("urban", settings, include={"slm-edge", "kb-city"})]
        for a in agents:
            await a.__aenter__()
        try:
            async with Orchestrator(settings, default_deadline_s=120) as orch:
                orch.engine.calibration = Calibration()  # the raw agreement: what is being calibrated
                results = [(t, await orch.submit(t.question, strategy="edge-only", task_id=f"cal-{t.id}"))
                           for t in tasks]  # fmt: skip
        finally:
            for a in agents:
                await a.__aexit__(None, None, None)
    # an edge step that failed (a deadline on a loaded machine) says nothing about the model's confidence
    pairs = [(float(r.get("confidence", 0.0)), score(t, r)) for t, r in results
             if r.get("tier") == "edge" and r.get("state") == "done"]  # fmt: skip
    cal = fit(pairs)
    if write:
        CALIBRATION_FILE.write_text(json.dumps(cal.to_dict() | {"fitted_on": f"{len(pairs)} dev-split open "
                                    "questions of scenarios/tasks.jsonl (bench cascade)"}, indent=2) + "\n")  # fmt: skip
    return {
        "benchmark": "cascade",
        "split": "dev",
        "questions": len(tasks),
        "answered_at_edge": len(pairs),
        "edge_correct": sum(ok for _, ok in pairs),
        "calibration": cal.to_dict(),
        "pairs": [
            {
                "id": t.id,
                "agreement": round(float(r.get("confidence", 0.0)), 4),
                "correct": score(t, r),
                "answer": str(r.get("answer", ""))[:120],
            }
            for t, r in results
        ],
        "machine": machine_info(),
    }


def main(args: argparse.Namespace) -> dict[str, Any]:
    result = asyncio.run(run())
    print(f"cascade calibration on {result['questions']} dev-split open questions: {result['edge_correct']} of "
          f"{result['answered_at_edge']} edge answers correct; bins {result['calibration']} -> {CALIBRATION_FILE}")  # fmt: skip
    return result
