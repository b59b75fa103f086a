"""``edgecoop bench writer``: answers written at the edge by each model, through the faithfulness gate.

One private Mosquitto, the urban and health scenarios' agents (no cloud), one orchestrator. The labelled edge
tasks of scenarios/tasks.jsonl run twice per model in the same run: once with the writer off (the deterministic
answers: the baseline) and once with the scenarios' SLM agents running that model and writing every edge answer
from the facts. Per model: how many written texts the gate passed (the model's faithfulness before the gate), how
many sent texts are faithful by an independent check (numbers in the sent text against the numbers of the
deterministic answer, written here, not the gate's code), the writer's added latency (p50, p95) and the task
latency with and without it, and correctness (scenarios.taskset.score) with and without it.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import re
import statistics
import time
from collections.abc import Mapping, Sequence
from typing import Any

from edgecoop.benchmarks.rpc import machine_info

__all__ = ["MODELS", "independent_faithful", "main", "run"]

MODELS = ("smollm2-135m", "gemma3-270m")
WRITER_BUDGET_S = 20.0
_NUM = re.compile(r"(?<![\w.])\d+(?:\.\d+)?")


def _pct(values: Sequence[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))] if s else 0.0


def independent_faithful(sent: str, deterministic: str, question: str = "") -> bool:
    """Every number in the sent text is a number of the deterministic answer (or the question), up to rounding.
    Deliberately a second, simpler implementation than the gate's: the benchmark does not grade the gate with
    the gate."""
    allowed = [float(n) for n in _NUM.findall(deterministic + " " + question)]
    body = re.sub(r"\[\d+\]", " ", sent)
    for tok in _NUM.findall(body):
        half = 0.5 * 10 ** -(len(tok.split(".")[1]) if "." in tok else 0) + 1e-9
        if not any(abs(float(tok) - a) <= half for a in allowed):
            return False
    return True


def _with_model(cfg: Any, model: str) -> Any:
    caps = tuple(
        dataclasses.replace(c, options={**c.options, "model": model, "n_threads": 1}) if c.kind == "slm" else c
        for c in cfg.capabilities
    )
    return dataclasses.replace(cfg, capabilities=caps)


async def _run_model(model: str | None, tasks: Sequence[Any], concurrency: int) -> dict[str, Any]:
    from edgecoop.agents import Agent
    from edgecoop.broker import MosquittoProcess
    from edgecoop.connection import BrokerSettings
    from edgecoop.orchestrator import Orchestrator
    from edgecoop.scenarios.loader import load_scenario
    from edgecoop.scenarios.taskset import score

    with MosquittoProcess() as broker:
        settings = BrokerSettings(port=broker.port, keepalive=30)
        configs = load_scenario("urban", settings, with_cloud=False) + load_scenario(
            "health", settings, with_cloud=False
        )
        if model is not None:
            configs = [_with_model(c, model) for c in configs]
        else:
            configs = [c for c in configs if not any(cap.kind == "slm" for cap in c.capabilities)]
        agents = []
        try:
            for cfg in configs:
                a = Agent(cfg)
                await a.__aenter__()
                agents.append(a)
            tokens_per_s = [m.tokens_per_s for a in agents for h in a.handlers.values() if h.kind == "slm"
                            for m in h.models()]  # fmt: skip
            async with Orchestrator(settings, max_concurrent=concurrency, default_deadline_s=90) as orch:
                # 20 s: every model writes every answer on a loaded machine too (the engine's default budget, 8 s,
                # skips a model whose card's decode rate cannot write 64 tokens in time)
                orch.engine.writer_budget_s = WRITER_BUDGET_S
                sem = asyncio.Semaphore(concurrency)

                async def one(t: Any) -> tuple[Any, dict[str, Any]]:
                    async with sem:
                        return t, await orch.submit(t.question, strategy="capability-aware", task_id=f"w-{t.id}")

                t0 = time.monotonic()
                pairs = await asyncio.gather(*(one(t) for t in tasks))
                wall = time.monotonic() - t0
                counters = orch.engine.writer.counters.to_dict() if orch.engine.writer else {}
        finally:
            for a in agents:
                await a.__aexit__(None, None, None)
    return {"pairs": pairs, "wall_s": round(wall, 1), "counters": counters, "tokens_per_s": tokens_per_s,
            "score": score}  # fmt: skip


def _summarise(base: Mapping[str, Any], run: Mapping[str, Any]) -> dict[str, Any]:
    score = run["score"]
    written = [(t, r) for t, r in run["pairs"] if r.get("writer")]
    passed = [(t, r) for t, r in written if r["writer"]["gate"] == "passed"]
    ms = [float(r["writer"]["ms"]) for _, r in written]
    # a stopped text was replaced by the deterministic answer (the facts themselves); a passed one is checked here
    # against the deterministic answer of the same run, which the writer keeps as "replaced"
    sent_faithful = sum(
        1 for t, r in written if r["writer"]["gate"] != "passed" or independent_faithful(
            str(r.get("answer", "")), str(r["writer"].get("replaced", "")), t.question)
    )  # fmt: skip
    lat = [r["latency_ms"] for _, r in run["pairs"]]
    base_lat = [r["latency_ms"] for _, r in base["pairs"]]
    reasons: dict[str, int] = {}
    for _, r in written:
        gate = r["writer"]["gate"]
        if gate != "passed":
            key = re.sub(r"[\d.]+|'[^']*'", "…", gate.removeprefix("failed: "))
            reasons[key] = reasons.get(key, 0) + 1
    return {
        "card_tokens_per_s": run["tokens_per_s"],
        "written": len(written),
        "gate_passed": len(passed),
        "faithfulness_before_gate": round(len(passed) / len(written), 4) if written else 0.0,
        "sent_faithful_fraction": round(sent_faithful / len(written), 4) if written else 0.0,
        "writer_p50_ms": round(statistics.median(ms), 1) if ms else 0.0,
        "writer_p95_ms": round(_pct(ms, 95), 1),
        "task_p50_ms": round(statistics.median(lat), 1),
        "task_p95_ms": round(_pct(lat, 95), 1),
        "baseline_task_p50_ms": round(statistics.median(base_lat), 1),
        "baseline_task_p95_ms": round(_pct(base_lat, 95), 1),
        "correct_fraction": round(sum(score(t, r) for t, r in run["pairs"]) / len(run["pairs"]), 4),
        "baseline_correct_fraction": round(sum(score(t, r) for t, r in base["pairs"]) / len(base["pairs"]), 4),
        "counters": run["counters"],
        "gate_failures": dict(sorted(reasons.items(), key=lambda kv: -kv[1])),
        "examples": [
            {"question": t.question, "sent": str(r.get("answer"))[:200], "gate": r["writer"]["gate"][:120]}
            for t, r in written[:: max(1, len(written) // 6)]
        ][:6],
        "wall_s": run["wall_s"],
    }


async def run(
    *, quick: bool = False, models: Sequence[str] = MODELS, every: int = 6, concurrency: int = 1
) -> dict[str, Any]:
    from edgecoop.scenarios.taskset import load_tasks

    tasks = [t for t in load_tasks() if t.route == "edge" and t.expect.get("kind") != "intent-only"]
    tasks = tasks[:: 12 if quick else every]
    out: dict[str, Any] = {"benchmark": "writer", "tasks": len(tasks), "models": {},
                           "params": {"quick": quick, "every": every, "concurrency": concurrency, "models": list(models),
                                      "strategy": "capability-aware", "n_threads": 1}}  # fmt: skip
    out["load_at_start"] = machine_info()["loadavg_1m"]
    base = await _run_model(None, tasks, concurrency)
    for model in models:
        out["models"][model] = _summarise(base, await _run_model(model, tasks, concurrency))
    out["machine"] = machine_info()
    return out


def main(args: argparse.Namespace) -> dict[str, Any]:
    result = asyncio.run(run(quick=bool(getattr(args, "quick", False))))
    m = result["machine"]
    print(f"writer benchmark: {result['tasks']} labelled edge tasks per model; {m['cores']} cores, load "
          f"{result['load_at_start']} -> {m['loadavg_1m']}")  # fmt: skip
    print(
        f"{'model':<14}{'written':>8}{'faithful':>10}{'sent ok':>9}{'p50 ms':>8}{'p95 ms':>8}{'correct':>9}{'base':>7}"
    )
    for name, s in result["models"].items():
        print(f"{name:<14}{s['written']:>8}{100 * s['faithfulness_before_gate']:>9.1f}%{100 * s['sent_faithful_fraction']:>8.1f}%"
              f"{s['writer_p50_ms']:>8.0f}{s['writer_p95_ms']:>8.0f}{100 * s['correct_fraction']:>8.1f}%"
              f"{100 * s['baseline_correct_fraction']:>6.1f}%")  # fmt: skip
    return result
