"""``edgecoop bench scheduling``: every strategy on the same agents and the same labelled workload.

Per strategy: fraction of tasks that used the cloud, correctness against the labelled expectations, p50/p95
latency, cloud cost, privacy violations (private tasks that reached the cloud tier) and payload bytes sent to
the cloud. Offline, the cloud tier is the reference stand-in (general knowledge only: open questions answered from
their labelled references, no access to the edge's live data, a fixed latency and cost): the output says so. With EDGECOOP_CLOUD_URL set, a real endpoint is used instead.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from typing import Any

from edgecoop.benchmarks.rpc import machine_info

__all__ = ["main", "run"]


def _pct(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


async def run(*, quick: bool = False, strategies: list[str] | None = None, concurrency: int = 4,
              cloud_latency_ms: float = 400.0, cloud_cost: float = 0.002) -> dict[str, Any]:  # fmt: skip
    from edgecoop.agents import Agent
    from edgecoop.agents.config import CapabilitySpec, config_from_dict
    from edgecoop.broker import MosquittoProcess
    from edgecoop.connection import BrokerSettings
    from edgecoop.orchestrator import STRATEGIES, Orchestrator
    from edgecoop.scenarios.loader import load_scenario
    from edgecoop.scenarios.taskset import load_tasks, score

    tasks = [t for t in load_tasks() if t.expect.get("kind") != "intent-only"]
    if quick:
        tasks = tasks[::8]
    names = strategies or list(STRATEGIES)
    real_cloud = os.environ.get("EDGECOOP_CLOUD_URL")
    with MosquittoProcess() as broker:
        settings = BrokerSettings(port=broker.port, keepalive=10)
        configs = load_scenario("urban", settings, exclude=set() if real_cloud else {"cloud-llm"})
        configs += load_scenario("health", settings, with_cloud=False)
        if not real_cloud:
            configs.append(config_from_dict({"agent": {"id": "cloud-llm", "site": "cloud", "description": "Cloud LLM "
                "(reference stand-in): general knowledge, open questions", "domains": ["general"]}}, broker=settings,
                capabilities=(CapabilitySpec("cloud", "cloud-reference", max_concurrency=16,
                              options={"latency_ms": cloud_latency_ms, "cost_per_call": cloud_cost}),)))  # fmt: skip
        agents = []
        skipped = []
        for cfg in configs:
            try:
                a = Agent(cfg)
                await a.__aenter__()
                agents.append(a)
            except Exception as exc:  # an optional extra missing: run without that agent, and say so
                skipped.append(f"{cfg.agent_id}: {exc}")
        cloud_handler = next((h for a in agents for h in a.handlers.values() if h.kind == "cloud"), None)
        out: dict[str, Any] = {
            "benchmark": "scheduling",
            "tasks": len(tasks),
            "agents": [a.agent_id for a in agents],
            "skipped_agents": skipped,
            "cloud_tier": ("real endpoint " + real_cloud) if real_cloud else (
                f"reference stand-in: open, general questions answered from their labelled references; no access to "
                f"the edge's data ('I have no access to that data', scored wrong), {cloud_latency_ms:.0f} ms, "
                f"${cloud_cost} per call (offline; not a real LLM)"),
            "strategies": {},
            "params": {"quick": quick, "concurrency": concurrency, "cloud_latency_ms": cloud_latency_ms,
                       "cloud_cost": cloud_cost, "strategies": names},
        }  # fmt: skip
        try:
            async with Orchestrator(settings, max_concurrent=concurrency, default_deadline_s=60) as orch:
                for name in names:
                    sem = asyncio.Semaphore(concurrency)
                    before = getattr(cloud_handler, "privacy_violations", 0)

                    async def one(t: Any, name: str = name, sem: asyncio.Semaphore = sem) -> tuple[Any, dict[str, Any]]:
                        async with sem:
                            return t, await orch.submit(t.question, strategy=name, task_id=f"{name}-{t.id}")

                    t0 = time.monotonic()
                    pairs = await asyncio.gather(*(one(t) for t in tasks))
                    wall = time.monotonic() - t0
                    lat = [r["latency_ms"] for _, r in pairs]
                    cloud_tasks = sum(1 for _, r in pairs if r.get("cloud_calls", 0) > 0)
                    violations = sum(1 for t, r in pairs if t.privacy == "private" and r.get("cloud_calls", 0) > 0)
                    seen_by_cloud = getattr(cloud_handler, "privacy_violations", 0) - before
                    out["strategies"][name] = {
                        "cloud_fraction": round(cloud_tasks / len(pairs), 4),
                        "cloud_calls": sum(r.get("cloud_calls", 0) for _, r in pairs),
                        "correct_fraction": round(sum(score(t, r) for t, r in pairs) / len(pairs), 4),
                        "p50_ms": round(statistics.median(lat), 1),
                        "p95_ms": round(_pct(lat, 95), 1),
                        "cloud_cost": round(sum(r.get("cost", 0.0) for _, r in pairs), 4),
                        "privacy_violations": max(violations, seen_by_cloud),
                        "cloud_bytes": sum(r.get("cloud_bytes", 0) for _, r in pairs),
                        "failed": sum(1 for _, r in pairs if r["state"] != "done"),
                        "wall_s": round(wall, 1),
                        "incorrect": [
                            {
                                "id": t.id,
                                "question": t.question,
                                "tier": r["tier"],
                                "answer": str(r.get("answer"))[:160],
                            }
                            for t, r in pairs
                            if not score(t, r)
                        ],
                    }
        finally:
            # a reconnect during the run means a status flap (offline, then online) that tasks may have seen
            out["agent_reconnects"] = {
                a.agent_id: a.conn.counters.connects - 1 for a in agents if a.conn.counters.connects > 1
            }
            for a in agents:
                await a.__aexit__(None, None, None)
    base = out["strategies"].get("cloud-only")
    if base:
        for s in out["strategies"].values():
            s["cloud_calls_saved_vs_cloud_only"] = (
                round(1 - s["cloud_calls"] / base["cloud_calls"], 4) if base["cloud_calls"] else 0.0
            )
            s["correct_delta_vs_cloud_only_points"] = round(100 * (s["correct_fraction"] - base["correct_fraction"]), 2)
    out["machine"] = machine_info()
    return out


def main(args: argparse.Namespace) -> dict[str, Any]:
    result = asyncio.run(run(quick=bool(getattr(args, "quick", False))))
    m = result["machine"]
    print(f"scheduling benchmark: {result['tasks']} labelled tasks per strategy; cloud tier: {result['cloud_tier']}; "
          f"{m['cores']} cores, load {m['loadavg_1m']}")  # fmt: skip
    if result["skipped_agents"]:
        print("agents not started: " + "; ".join(result["skipped_agents"]))
    hdr = f"{'strategy':<18}{'cloud%':>8}{'saved':>8}{'correct':>9}{'Δpts':>7}{'p50 ms':>9}{'p95 ms':>9}{'cost $':>9}{'priv':>6}{'cloud B':>9}"
    print(hdr)
    for name, s in result["strategies"].items():
        print(f"{name:<18}{100 * s['cloud_fraction']:>7.1f}%{100 * s.get('cloud_calls_saved_vs_cloud_only', 0):>7.0f}%"
              f"{100 * s['correct_fraction']:>8.1f}%{s.get('correct_delta_vs_cloud_only_points', 0):>7.1f}"
              f"{s['p50_ms']:>9.0f}{s['p95_ms']:>9.0f}{s['cloud_cost']:>9.3f}{s['privacy_violations']:>6}{s['cloud_bytes']:>9}")  # fmt: skip
    return result
