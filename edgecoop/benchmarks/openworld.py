"""``edgecoop bench openworld``: every scheduling strategy on the TEST split of the open-world evaluation set.

The hand-written questions of scenarios/eval/understanding.jsonl whose id falls in the test split (``split_of``;
nothing is tuned on them, they only run for the report) go through every strategy on the same agents as
``bench understanding`` (both scenarios, the runtime example agents added while the orchestrator runs, the honest
cloud stand-in). Answers are graded by ``understanding.grade`` against the agents' own values, the synthetic scenes
and the rulebooks. This set has no reference answers for its open questions: the stand-in cannot answer them and
they are graded by route only (sent to the cloud and done counts right, an edge model's answer counts wrong), which
the output says. Per strategy: ``cloud_calls``, ``cloud_fraction``, ``correct_fraction``, ``privacy_violations``
(a personal question with a cloud call), ``p50_ms``, ``p95_ms``; top level: ``oracle_cloud_calls`` (a question goes
to the cloud only when no edge run of this benchmark answered it right and a cloud run did).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

from edgecoop.benchmarks.rpc import machine_info
from edgecoop.benchmarks.understanding import (
    EXAMPLES,
    Truth,
    camera_options,
    grade,
    load_eval,
    scenario_configs,
    start_agent,
)

__all__ = ["main", "run"]


def _pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))] if s else 0.0


async def run(*, concurrency: int = 4, strategies: list[str] | None = None) -> dict[str, Any]:
    from edgecoop.agents.config import load_agent_config
    from edgecoop.broker import MosquittoProcess
    from edgecoop.connection import BrokerSettings
    from edgecoop.orchestrator import STRATEGIES, Orchestrator

    items = [it for it in load_eval() if it["split"] == "test"]
    names = strategies or list(STRATEGIES)
    per: dict[str, dict[str, tuple[bool, int]]] = {}
    out: dict[str, Any] = {"benchmark": "openworld", "split": "test", "questions": len(items), "strategies": {},
                           "cloud_tier": "cloud-reference stand-in: general knowledge only; this set's open questions "
                           "have no reference answers, so they are graded by route (cloud and done = right)"}  # fmt: skip
    with MosquittoProcess() as broker:
        settings = BrokerSettings(port=broker.port, keepalive=30)
        configs = scenario_configs(settings, cloud_latency_ms=400)
        configs += [load_agent_config(f, broker=settings) for f in sorted(EXAMPLES.glob("*.toml"))]
        agents: list[Any] = []
        skipped: list[str] = []
        for cfg in configs:
            await start_agent(cfg, agents, skipped)
        out["skipped_agents"] = skipped
        cards = {a.agent_id: a.card().to_dict() for a in agents}
        camera_options(cards, configs)
        try:
            async with Orchestrator(settings, max_concurrent=concurrency * 2, default_deadline_s=60) as orch:
                orch.engine.writer = None  # as in bench scheduling: routing is compared, written answers are not
                ids = [a.agent_id for a in agents]
                await orch.mirror.wait_for(
                    lambda s: all(s.card(i) is not None and (s.status(i) or (False, 0))[0] for i in ids), timeout=30
                )
                truth = Truth(orch.requester, cards)
                for name in names:
                    sem = asyncio.Semaphore(concurrency)

                    async def one(it: dict[str, Any], name: str = name, sem: asyncio.Semaphore = sem) -> dict[str, Any]:
                        async with sem:
                            r = await orch.submit(it["question"], strategy=name, task_id=f"ow-{name}-{it['id']}")
                            return {"id": it["id"], "ok": await grade(it, r, truth), "calls": r.get("cloud_calls", 0),
                                    "ms": r["latency_ms"], "private": bool(it.get("personal"))}  # fmt: skip

                    t0 = time.monotonic()
                    rows = await asyncio.gather(*(one(it) for it in items))
                    per[name] = {r["id"]: (bool(r["ok"]), int(r["calls"])) for r in rows}
                    lat = [float(r["ms"]) for r in rows]
                    out["strategies"][name] = {
                        "cloud_calls": sum(r["calls"] for r in rows),
                        "cloud_fraction": round(sum(r["calls"] > 0 for r in rows) / len(rows), 4),
                        "correct_fraction": round(sum(r["ok"] for r in rows) / len(rows), 4),
                        "privacy_violations": sum(r["private"] and r["calls"] > 0 for r in rows),
                        "p50_ms": round(statistics.median(lat), 1),
                        "p95_ms": round(_pct(lat, 95), 1),
                        "wall_s": round(time.monotonic() - t0, 1),
                    }
        finally:
            for a in agents:
                await a.__aexit__(None, None, None)
    edge_ok = {i for run in per.values() for i, (ok, calls) in run.items() if ok and calls == 0}
    cloud_ok = {i for run in per.values() for i, (ok, calls) in run.items() if ok and calls > 0}
    out["oracle_cloud_calls"] = len(cloud_ok - edge_ok)
    out["oracle_correct_fraction"] = round(len(edge_ok | cloud_ok) / len(items), 4) if items else 0.0
    best = max((s["correct_fraction"] for s in out["strategies"].values()), default=0.0)
    for s in out["strategies"].values():
        s["cloud_calls_vs_oracle"] = (
            round(s["cloud_calls"] / out["oracle_cloud_calls"], 3) if out["oracle_cloud_calls"] else None
        )
        s["correct_below_best_points"] = round(100 * (best - s["correct_fraction"]), 2)
    out["machine"] = machine_info()
    return out


def main(args: argparse.Namespace) -> dict[str, Any]:
    result = asyncio.run(run())
    print(f"open-world test split: {result['questions']} questions per strategy; oracle {result['oracle_cloud_calls']} "
          f"cloud calls for {100 * result['oracle_correct_fraction']:.1f} %; load {result['machine']['loadavg_1m']}")  # fmt: skip
    for name, s in result["strategies"].items():
        print(f"{name:<18}{s['cloud_calls']:>6} calls {100 * s['correct_fraction']:>6.1f} % correct "
              f"{s['privacy_violations']:>3} private  p50 {s['p50_ms']:.0f} ms  p95 {s['p95_ms']:.0f} ms")  # fmt: skip
    return result
