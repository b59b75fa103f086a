"""``edgecoop bench understanding``: does the orchestrator understand questions the way people ask them?

The set is ``scenarios/eval/understanding.jsonl``: questions written by hand from the cards and documents (not
from the parser), split dev/test by ``sha256(id)`` before any tuning; the test split's checksum is committed and
checked here, and the parser is never tuned on it. Everything runs for real: Mosquitto, the urban and health
agents, then the example agents of ``agents/examples`` added *after* the orchestrator started.

Ground truth never comes from the orchestrator: a value is checked against the agent's own sensor read directly
over RPC right after the task; a camera count against the synthetic scene's truth from the card; a look-up against
the labelled document; a decision against the labelled limit applied to the agent's value. The cloud tier is a
stand-in that answers every prompt with a fixed text (it reads no labels) and counts the prompts of tasks labelled
personal; a personal question that reaches it is a privacy violation.

Per split: ``ops_slots_exact`` (operation and targets, and the limit where one is stated; for refusals: refused),
``route`` (edge, cloud or refuse/ask), ``answer`` (correct value, decision, document or refusal), and
``private_to_cloud`` (personal questions the cloud saw), all fractions 0-1; plus the parser's latency per task.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import statistics
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edgecoop.scenarios.data import data_root

__all__ = ["load_eval", "main", "run", "split_of"]

EXAMPLES = Path(__file__).resolve().parents[2] / "agents" / "examples"


def split_of(qid: str) -> str:
    """The fixed split rule, applied before any tuning."""
    return "test" if hashlib.sha256(qid.encode()).hexdigest()[0] in "01234567" else "dev"


def load_eval(path: Path | None = None) -> list[dict[str, Any]]:
    path = path or data_root() / "eval" / "understanding.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines()
    items = [json.loads(line) for line in lines if line.strip()]
    for it in items:
        if it["split"] != split_of(it["id"]):
            raise ValueError(f"{it['id']}: split {it['split']!r} does not follow the rule")
    test_lines = "".join(line + "\n" for line, it in zip(lines, items, strict=True) if it["split"] == "test")
    want = (path.parent / "understanding-test.sha256").read_text().split()[0]
    if hashlib.sha256(test_lines.encode()).hexdigest() != want:
        raise ValueError("the test split changed since its checksum was committed")
    return items


def _route(r: Mapping[str, Any]) -> str:
    if r.get("tier") == "cloud":
        return "cloud"
    if r.get("tier") == "none" and r.get("decision") in ("refused", "clarify"):
        return "refuse"
    return "edge"


def _targets(ts: Any) -> set[tuple[Any, ...]]:
    return {(t["modality"], t.get("place"), t.get("agg", "latest"), int(t.get("window_s", 0))) for t in ts or []}


def ops_slots_exact(item: Mapping[str, Any], c: Mapping[str, Any] | None, route: str) -> bool:
    if item["route"] == "refuse":
        return route == "refuse"
    if c is None:
        return False
    if item["route"] == "cloud":
        return c.get("operation") == "open"
    if c.get("operation") != item["operation"]:
        return False
    if item["operation"] == "lookup":
        return True
    got = _targets(c.get("targets"))
    want = _targets(item["targets"])
    if item["operation"] in ("summarise",):
        got, want = {(t[0],) for t in got}, {(t[0],) for t in want}
    if got != want:
        return False
    want_limit = item.get("limit")
    got_limit = (c.get("limit") or {}).get("value")
    return want_limit is None or (got_limit is not None and abs(float(got_limit) - float(want_limit)) < 1e-6)


def _judge(value: float, a: Mapping[str, Any]) -> str:
    kind = a.get("limit_kind", "max")
    if kind == "range":
        return "above" if value > float(a["high"]) else "below" if value < float(a["low"]) else "within"
    limit = float(a["limit"])
    if kind == "min":
        return "below" if value < limit else "within"
    return "above" if value > limit else "within"


class Truth:
    """Ground truth from the agents themselves (RPC to their sensors) and from the cards (camera scenes)."""

    def __init__(self, requester: Any, cards: Mapping[str, Mapping[str, Any]]) -> None:
        self.requester = requester
        self.cards = cards

    async def value(self, agent: str, sensor: str) -> float | None:
        cap = next(c["name"] for c in self.cards[agent]["capabilities"] if c["kind"] == "sensor")
        resp = await self.requester.request(agent, cap, {"op": "latest", "sensor": sensor}, timeout=5)
        v = resp.result.get("value")
        return None if v is None else float(v)

    def count(self, camera: str, obj: str) -> int:
        from edgecoop.agents.scenes import synthetic_scene

        o = self.cards[camera]["_options"]
        truth = synthetic_scene(o["seed"], **o["scene"]).truth
        return int(truth.vehicles if obj == "vehicles" else truth.pedestrians)


def _close(got: Any, want: float | None, tol: float) -> bool:
    return got is not None and want is not None and abs(float(got) - want) <= tol


async def grade(item: Mapping[str, Any], r: Mapping[str, Any], truth: Truth) -> bool:
    a = item["answer"]
    kind = a["kind"]
    route = _route(r)
    if kind == "refusal":
        return route == "refuse"
    if kind == "cloud":
        return route == "cloud" and r.get("state") == "done"
    if r.get("state") != "done" or route != "edge":
        return False
    if kind == "value":
        want = await truth.value(a["agent"], a["sensor"])
        vals = list((r.get("values") or {}).values()) or [r.get("value")]
        tol = max(1.5, 0.08 * abs(want or 0))
        return any(_close(v, want, tol) for v in vals)
    if kind == "decision":
        if a["agent"].startswith("cam-"):
            value: float | None = float(truth.count(a["agent"], a["sensor"]))
        else:
            value = await truth.value(a["agent"], a["sensor"])
        if value is None:
            return False
        expected = _judge(value, a)
        decision = str(r.get("decision"))
        # a rule may name its decisions ("reroute" for above); "above"/"within" in the text count too
        return (
            decision == expected
            or expected in str(r.get("answer", "")).split(",")[-1]
            or (decision in ("reroute", "unsafe") and expected == "above")
            or (decision == "keep" and expected == "within")
        )
    if kind == "aggregate":
        agents = [aid for aid, c in truth.cards.items() if any(s.get("modality") == a["modality"] for s in c.get("sensors", []))
                  and c.get("privacy", "public") == "public"]  # fmt: skip
        vals = []
        for aid in agents:
            sensor = next(s["name"] for s in truth.cards[aid]["sensors"] if s["modality"] == a["modality"])
            v = await truth.value(aid, sensor)
            if v is not None:
                vals.append(v)
        want = max(vals) if a["agg"] == "max" else min(vals) if a["agg"] == "min" else statistics.fmean(vals)
        return _close(r.get("value"), want, max(1.5, 0.08 * abs(want)))
    if kind == "compare":
        got: dict[str, float] = dict(r.get("values") or {})
        truths: dict[str, float] = {}
        for aid, sensor in a["pairs"]:
            place = truth.cards[aid]["location"]["name"]
            if aid.startswith("cam-"):
                truths[place] = float(truth.count(aid, sensor))
            else:
                truths[place] = await truth.value(aid, sensor) or 0.0
        if set(got) != set(truths):
            return False
        hi = max(truths, key=lambda p: truths[p])
        return bool(max(got, key=lambda p: got[p]) == hi or max(truths.values()) - min(truths.values()) < 1.0)
    if kind == "count":
        return _close(r.get("value"), float(truth.count(a["camera"], a["object"])), 1.0)
    if kind == "vitals":
        return r.get("decision") in ("normal", "attention")
    if kind == "doc":
        return a["doc"] in [Path(str(s)).name for s in (r.get("sources") or [])[:3]]
    raise ValueError(f"unknown answer kind {kind!r}")


def spec_route(spec: Any) -> str:
    """The route a specification leads to before any agent is asked (for the parse-only comparison)."""
    if spec.unknown or spec.ask:
        return "refuse"
    if spec.operation.value == "open":
        return "cloud" if spec.general and not spec.personal and spec.confidence >= 0.6 else "refuse"
    return "edge"


def compare_parsers(items: list[dict[str, Any]], vocab: Any, parsers: Mapping[str, Any]) -> dict[str, Any]:
    """Every parser configuration on the same questions and vocabulary: ops+slots exact, route, latency."""
    out: dict[str, Any] = {}
    for name, parse in parsers.items():
        by_split: dict[str, Any] = {}
        for split in ("dev", "test"):
            rs = [it for it in items if it["split"] == split]
            if not rs:
                continue
            exact = route = 0
            times = []
            for it in rs:
                t0 = time.perf_counter()
                spec = parse(it["question"], vocab)
                times.append((time.perf_counter() - t0) * 1000)
                r = spec_route(spec)
                exact += ops_slots_exact(it, spec.to_dict(), r)
                route += r == it["route"]
            by_split[split] = {"n": len(rs), "ops_slots_exact": round(exact / len(rs), 4),
                               "route": round(route / len(rs), 4), "p50_ms": round(statistics.median(times), 3),
                               "p95_ms": round(_pct(times, 95), 3)}  # fmt: skip
        out[name] = by_split
    return out


def _pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))] if s else 0.0


def scenario_configs(settings: Any, *, cloud_latency_ms: float) -> list[Any]:
    """Both scenarios' agents and the offline cloud stand-in (general knowledge only, no access to the edge's data)."""
    from edgecoop.agents.config import CapabilitySpec, config_from_dict
    from edgecoop.scenarios.loader import load_scenario

    configs = load_scenario("urban", settings, exclude={"cloud-llm"})
    configs += load_scenario("health", settings, with_cloud=False)
    configs.append(config_from_dict({"agent": {"id": "cloud-llm", "site": "cloud", "description": "Cloud LLM "
        "stand-in: general knowledge, open questions", "domains": ["general"]}}, broker=settings,
        capabilities=(CapabilitySpec("cloud", "cloud-reference", max_concurrency=16,
                      options={"latency_ms": cloud_latency_ms, "cost_per_call": 0.002}),)))  # fmt: skip
    return configs


async def start_agent(cfg: Any, agents: list[Any], skipped: list[str]) -> Any | None:
    """Start one agent into ``agents``; one an optional extra is missing for is left out and named in ``skipped``."""
    from edgecoop.agents import Agent

    try:
        a = Agent(cfg)
        await a.__aenter__()
    except Exception as exc:  # an optional extra missing: run without that agent, and say so
        skipped.append(f"{cfg.agent_id}: {exc}")
        return None
    agents.append(a)
    return a


def camera_options(cards: dict[str, dict[str, Any]], configs: list[Any]) -> None:
    """Give each camera's card its scene options: the ground truth of its counts (read by Truth, never the system)."""
    for cfg in configs:
        for cap in cfg.capabilities:
            if cap.kind == "camera" and cfg.agent_id in cards:
                cards[cfg.agent_id]["_options"] = dict(cap.options)


async def run(*, splits: tuple[str, ...] = ("dev", "test"), concurrency: int = 4, model: bool = False,
              limit: int | None = None, compare: bool = False,
              items: list[dict[str, Any]] | None = None) -> dict[str, Any]:  # fmt: skip
    from edgecoop.agents.config import load_agent_config
    from edgecoop.broker import MosquittoProcess
    from edgecoop.connection import BrokerSettings
    from edgecoop.orchestrator import Orchestrator

    items = [it for it in (load_eval() if items is None else items) if it["split"] in splits][:limit]
    model_parser = None
    if model:
        from edgecoop.models import resolve_model
        from edgecoop.orchestrator.modelparser import ModelParser

        model_parser = ModelParser(str(resolve_model("smollm2-135m")))
    with MosquittoProcess() as broker:
        settings = BrokerSettings(port=broker.port, keepalive=10)
        configs = scenario_configs(settings, cloud_latency_ms=50)
        runtime = [load_agent_config(f, broker=settings) for f in sorted(EXAMPLES.glob("*.toml"))]
        agents: list[Any] = []
        skipped: list[str] = []
        for cfg in configs:
            await start_agent(cfg, agents, skipped)
        cards = {a.agent_id: a.card().to_dict() for a in agents}
        camera_options(cards, configs + runtime)
        out: dict[str, Any] = {"n_items": len(items), "skipped_agents": skipped, "parser": "fast+model" if model
                               else "fast", "cloud_tier": "cloud-reference stand-in; it knows none of this set's labels, so cloud answers are graded by route only"}  # fmt: skip
        try:
            async with Orchestrator(settings, max_concurrent=concurrency * 2, default_deadline_s=30,
                                    model_parser=model_parser) as orch:  # fmt: skip
                for cfg in runtime:  # agents nobody's code knows, added while the orchestrator runs
                    if (a := await start_agent(cfg, agents, skipped)) is not None:
                        cards[cfg.agent_id] = a.card().to_dict()
                ids = [a.agent_id for a in agents]
                await orch.mirror.wait_for(
                    lambda s: all(s.card(i) is not None and (s.status(i) or (False, 0))[0] for i in ids), timeout=20
                )
                truth = Truth(orch.requester, cards)
                sem = asyncio.Semaphore(concurrency)
                rows: list[dict[str, Any]] = []

                async def one(it: dict[str, Any]) -> None:
                    async with sem:
                        r = await orch.submit(it["question"], task_id=f"u-{it['id']}")
                        route = _route(r)
                        ok = await grade(it, r, truth)
                        rows.append({"id": it["id"], "split": it["split"], "route_ok": route == it["route"],
                                     "exact": ops_slots_exact(it, r.get("classification"), route), "answer_ok": ok,
                                     "private_to_cloud": bool(it.get("personal")) and r.get("cloud_calls", 0) > 0,
                                     "parse_ms": r.get("parse_ms", 0.0), "route": route, "want_route": it["route"],
                                     "wrong_answer": route == "edge" and r.get("state") == "done" and not ok,
                                     "question": it["question"], "answer": str(r.get("answer"))[:200],
                                     "spec": {k: (r.get("classification") or {}).get(k) for k in
                                              ("operation", "targets", "limit", "unknown", "ask")}})  # fmt: skip

                t0 = time.monotonic()
                await asyncio.gather(*(one(it) for it in items))
                out["wall_s"] = round(time.monotonic() - t0, 1)
                if compare:
                    vocab = await orch.engine.vocabulary()
                    out["parsers"] = await asyncio.to_thread(_compare_all, items, vocab)
        finally:
            for a in agents:
                await a.__aexit__(None, None, None)
            if model_parser is not None:
                model_parser.close()
    for split in splits:
        rs = [r for r in rows if r["split"] == split]
        if not rs:
            continue
        n = len(rs)
        out[split] = {
            "n": n,
            "ops_slots_exact": round(sum(r["exact"] for r in rs) / n, 4),
            "route": round(sum(r["route_ok"] for r in rs) / n, 4),
            "answer": round(sum(r["answer_ok"] for r in rs) / n, 4),
            "private_to_cloud": round(sum(r["private_to_cloud"] for r in rs) / n, 4),
            "private_to_cloud_count": sum(r["private_to_cloud"] for r in rs),
            # an edge answer given and graded wrong: the failure a refusal would have avoided
            "wrong_answer": round(sum(r["wrong_answer"] for r in rs) / n, 4),
            "parse_p50_ms": round(statistics.median(r["parse_ms"] for r in rs), 3),
            "parse_p95_ms": round(_pct([r["parse_ms"] for r in rs], 95), 3),
        }
        if split != "test":  # misses are shown for development sets only: the test split is never looked at
            out[f"{split}_misses"] = sorted((r for r in rs if not (r["exact"] and r["route_ok"] and r["answer_ok"])),
                                       key=lambda r: r["id"])  # fmt: skip
    return out


def _compare_all(items: list[dict[str, Any]], vocab: Any) -> dict[str, Any]:
    """fast alone; fast with the model when unsure; the model on every question (SmolLM2-135M, grammar-bound)."""
    from edgecoop.orchestrator import FastParser

    # each configuration gets its own parser with the cache off: a shared or warm cache would time look-ups
    fast = FastParser(cache_size=0)
    parsers: dict[str, Any] = {"fast": fast.parse}
    try:
        from edgecoop.models import resolve_model
        from edgecoop.orchestrator.modelparser import ModelParser

        model = ModelParser(str(resolve_model("smollm2-135m")))
    except Exception as exc:  # the llm extra or the model is missing: the fast parser alone, and say so
        return {"fast": compare_parsers(items, vocab, parsers)["fast"], "model_skipped": str(exc)}
    try:
        first = FastParser(cache_size=0)

        def fast_then_model(q: str, v: Any) -> Any:
            spec = first.parse(q, v)
            return model.parse(q, v) if spec.confidence < 0.6 else spec

        parsers["fast+model(smollm2-135m)"] = fast_then_model
        parsers["model(smollm2-135m)"] = model.parse
        return compare_parsers(items, vocab, parsers)
    finally:
        model.close()


def load_own(path: str | Path) -> list[dict[str, Any]]:
    """A user's labelled questions (the evaluation set's format); the name 'test' is reserved for the shipped split."""
    items = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    if any(it.get("split") == "test" for it in items):
        raise ValueError(f"{path}: the split name 'test' is reserved for the shipped evaluation set")
    return items


def main(args: argparse.Namespace) -> dict[str, Any]:
    own = load_own(args.eval) if getattr(args, "eval", None) else None
    if own is not None:
        splits = tuple(dict.fromkeys(str(it["split"]) for it in own))
    else:
        splits = tuple(s for s in ("dev", "test") if getattr(args, "split", None) in (None, s))
    quick = bool(getattr(args, "quick", False))
    result = asyncio.run(run(splits=splits, model=bool(getattr(args, "model_parser", False)),
                             limit=10 if quick else None, compare=not quick and own is None,
                             items=own))  # fmt: skip
    from edgecoop.benchmarks.rpc import machine_info

    result["machine"] = machine_info()  # with the load and the commit that ran
    for split in splits:
        if split in result:
            r = result[split]
            print(f"{split:<5} n={r['n']:<4} ops+slots {r['ops_slots_exact']:.3f}  route {r['route']:.3f}  "
                  f"answer {r['answer']:.3f}  private->cloud {r['private_to_cloud_count']}  "
                  f"parse p50 {r['parse_p50_ms']:.2f} ms p95 {r['parse_p95_ms']:.2f} ms")  # fmt: skip
    return result
