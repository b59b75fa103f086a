"""Both scenarios end to end over a real broker: every cooperation type, both collaboration shapes, privacy."""

import statistics

import pytest

from edgecoop.agents import Agent
from edgecoop.agents.config import CapabilitySpec, config_from_dict
from edgecoop.orchestrator import Orchestrator
from edgecoop.scenarios.loader import load_scenario
from edgecoop.scenarios.taskset import load_tasks, score

pytestmark = pytest.mark.vision


def _refcloud(settings, topics):
    return Agent(config_from_dict(
        {"agent": {"id": "cloud-llm", "site": "cloud", "description": "Cloud LLM for open questions"}},
        broker=settings, prefix=topics.prefix,
        capabilities=(CapabilitySpec("cloud", "cloud-reference", max_concurrency=8, options={"latency_ms": 20}),),
    ))  # fmt: skip


async def _running(agents):
    for a in agents:
        await a.__aenter__()
    return agents


async def _stop(agents):
    for a in agents:
        await a.__aexit__(None, None, None)


@pytest.fixture
async def health(settings, topics):
    configs = load_scenario("health", settings, prefix=topics.prefix, with_cloud=False, exclude={"phone-slm"})
    agents = await _running([Agent(c) for c in configs] + [_refcloud(settings, topics)])
    yield {a.agent_id: a for a in agents}
    await _stop(agents)


@pytest.fixture
async def urban(settings, topics):
    configs = load_scenario("urban", settings, prefix=topics.prefix, exclude={"cloud-llm", "slm-edge", "slm-gateway"})
    agents = await _running([Agent(c) for c in configs] + [_refcloud(settings, topics)])
    yield {a.agent_id: a for a in agents}
    await _stop(agents)


@pytest.mark.parametrize("strategy", ["cloud-only", "capability-aware", "cascade", "random"])
async def test_health_data_never_reaches_the_cloud(health, settings, topics, strategy):
    cloud = health["cloud-llm"].handlers["cloud"]
    tasks = [t for t in load_tasks() if t.scenario == "health" and t.expect.get("kind") != "intent-only"]
    async with Orchestrator(settings, topics=topics, strategy=strategy, seed=1) as orch:
        results = [(t, await orch.submit(t.question)) for t in tasks[::3]]
    assert cloud.calls == 0 and cloud.privacy_violations == 0
    assert all(r["tier"] in ("edge", "none") and r["cloud_calls"] == 0 for _, r in results)
    assert all(r["classification"]["privacy"] == "private" for _, r in results)
    refused = [r for t, r in results if t.route == "refuse"]
    assert refused and all(r["decision"] == "refused" and "not sent to the cloud" in r["answer"] for r in refused)
    correct = sum(score(t, r) for t, r in results)
    assert correct >= len(results) - 1, [(t.question, r["answer"]) for t, r in results if not score(t, r)]


async def test_health_check_uses_the_private_rulebook_in_parallel(health, settings, topics):
    async with Orchestrator(settings, topics=topics) as orch:
        r = await orch.submit("Is my heart rate normal?")
    assert r["plan"]["shape"] == "parallel"
    assert {t["agent"] for t in r["trace"]} == {"wearable", "kb-clinic"}
    assert r["decision"] == "above" and "bpm" in r["answer"]


async def test_parallel_fan_out_and_fan_in(urban, settings, topics):
    async with Orchestrator(settings, topics=topics) as orch:
        r = await orch.submit("What is the average PM2.5 across the district?")
    steps = [t for t in r["trace"] if t["step"] == "readings"]
    assert {t["agent"] for t in steps} == {"air-park", "air-station", "air-oldtown", "air-harbour"}
    assert all(t["ok"] for t in steps) and r["plan"]["shape"] == "parallel"
    per_station = [float(x.split(": ")[1]) for x in r["answer"].split("(")[1].rstrip(").").split(", ")]
    assert r["value"] == pytest.approx(statistics.fmean(per_station), abs=0.06)


async def test_knowledge_cooperation_cites_the_document(urban, settings, topics):
    async with Orchestrator(settings, topics=topics) as orch:
        r = await orch.submit("What does the regulation say about construction noise at night?")
    assert r["tier"] == "edge" and r["trace"][0]["agent"] == "kb-city" and r["sources"][0] == "noise.md"
    assert "22:00" in r["answer"]


async def test_open_question_escalates_to_the_cloud_only_when_needed(urban, settings, topics):
    cloud = urban["cloud-llm"].handlers["cloud"]
    async with Orchestrator(settings, topics=topics) as orch:
        edge = await orch.submit("What is the PM2.5 level at City Park right now?")
        open_q = await orch.submit("Who wrote Pride and Prejudice?")
        edge_only = await orch.submit("Who wrote Pride and Prejudice?", strategy="edge-only")
    assert edge["tier"] == "edge" and edge["cloud_calls"] == 0
    assert open_q["tier"] == "cloud" and "Austen" in open_q["answer"] and open_q["cost"] > 0
    assert edge_only["state"] == "failed" and edge_only["cloud_calls"] == 0  # no SLM agent here: says so
    assert cloud.calls == 1


def test_fast_parser_on_the_understanding_dev_split(monkeypatch):
    """A floor on the dev split only (parse alone, no broker); the test split is the benchmark's, never tuned on."""
    from pathlib import Path

    from edgecoop.agents import Agent
    from edgecoop.agents.config import load_agent_config
    from edgecoop.benchmarks.understanding import compare_parsers, load_eval
    from edgecoop.orchestrator import FastParser
    from edgecoop.orchestrator.vocabulary import Vocabulary
    from edgecoop.scenarios.data import data_root

    monkeypatch.setenv("EDGECOOP_CLOUD_URL", "http://127.0.0.1:9")  # the cloud card is built, never called
    files = sorted(data_root().glob("*/agents/*.toml")) + sorted(
        (Path(__file__).resolve().parent.parent / "agents" / "examples").glob("*.toml")
    )
    vocab = Vocabulary()
    vocab.update({(a := Agent(load_agent_config(f))).agent_id: a.card().to_dict() for f in files})
    items = [i for i in load_eval() if i["split"] == "dev"]
    r = compare_parsers(items, vocab, {"fast": FastParser().parse})["fast"]["dev"]
    assert r["ops_slots_exact"] >= 0.93 and r["route"] >= 0.95, r
    # the independent writers' sets (load_own refuses a 'test' split): the same floor, parse alone
    from edgecoop.benchmarks.understanding import load_own, ops_slots_exact, spec_route

    parser = FastParser(cache_size=0)
    for name in ("dev2", "dev3"):
        own = load_own(data_root() / "eval" / f"{name}.jsonl")
        specs = [(it, parser.parse(it["question"], vocab)) for it in own]
        exact = sum(ops_slots_exact(it, s.to_dict(), spec_route(s)) for it, s in specs) / len(own)
        route = sum(spec_route(s) == it["route"] for it, s in specs) / len(own)
        assert exact >= 0.93 and route >= 0.95, (name, exact, route)


async def test_scheduling_benchmark_quick_meets_the_targets():
    from edgecoop.benchmarks.scheduling import run

    out = await run(quick=True, strategies=["cloud-only", "capability-aware"], cloud_latency_ms=20)
    base, ours = out["strategies"]["cloud-only"], out["strategies"]["capability-aware"]
    assert "reference stand-in" in out["cloud_tier"]
    # questions about the edge's own world never go to the cloud, whatever the strategy: only open ones differ
    assert ours["cloud_calls"] <= base["cloud_calls"]
    assert base["privacy_violations"] == ours["privacy_violations"] == 0
