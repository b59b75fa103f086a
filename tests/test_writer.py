"""Answers written at the edge by a real SLM agent (SmolLM2 through llama.cpp) over a real broker, through the
faithfulness gate: what is sent states the facts' value and decision, a passage answer cites its documents, and the
asker's own data is written only by a private agent."""

from __future__ import annotations

import re

import pytest

from edgecoop.agents import Agent
from edgecoop.cms.discovery import DiscoveryQuery
from edgecoop.orchestrator import Orchestrator
from edgecoop.scenarios.loader import load_scenario

pytestmark = [pytest.mark.llm, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def smollm2() -> None:
    pytest.importorskip("llama_cpp")
    from edgecoop.models import resolve_model

    resolve_model("smollm2-135m")


async def test_edge_answers_are_written_from_the_facts_and_gated(settings, topics, smollm2):
    configs = load_scenario("urban", settings, prefix=topics.prefix, include={"air-harbour", "kb-city", "slm-edge"})
    configs += load_scenario("health", settings, prefix=topics.prefix, with_cloud=False,
                             include={"wearable", "phone-slm"})  # fmt: skip
    agents = [Agent(c) for c in configs]
    for a in agents:
        await a.__aenter__()
    try:
        async with Orchestrator(settings, topics=topics) as orch:
            # this test is about what is sent, not about speed: on a loaded machine the cards' measured decode
            # rates would make the planner skip writing (bench writer measures the latency)
            orch.engine.writer_budget_s = 60.0
            check = await orch.submit("Is NO2 at Harbour Gate above the WHO limit?")
            doc = await orch.submit("According to the city procedure, when should buses be rerouted?")
            vitals = await orch.submit("How is my heart rate?")
            cards = {m.agent_id: m.card.get("models") for m in await orch.mirror.discover(DiscoveryQuery(kind="slm"))}
            writer = orch.engine.writer
            assert writer is not None
            counters = writer.counters.to_dict()
    finally:
        for a in agents:
            await a.__aexit__(None, None, None)

    # a check: the SLM wrote a text; whatever it was, what is sent states the measured value and the decision
    assert check["state"] == "done" and check["tier"] == "edge", check["reason"]
    assert "writer" in check, (cards, check["trace"])
    assert check["writer"]["model"] == "smollm2-135m" and check["writer"]["ms"] > 0
    steps = [t for t in check["trace"] if t["step"] == "writer"]
    assert [t["agent"] for t in steps] == ["slm-edge"]
    assert check["plan"]["stages"][-1] == [{"name": "writer", "kind": "slm", "modality": None, "fanout": False}]
    value = check["value"]
    assert any(abs(float(n) - value) < 0.51 for n in re.findall(r"\d+(?:\.\d+)?", check["answer"])), check
    assert check["decision"] in check["answer"] or any(w in check["answer"] for w in ("above", "below", "within"))

    # a passage answer cites the document it comes from (written or not)
    assert doc["state"] == "done" and doc["sources"], doc["reason"]
    assert re.search(r"\[1\] \S+\.md", doc["answer"]), doc["answer"]

    # the asker's own data: only the private agent on the phone writes it
    assert vitals["state"] == "done", vitals["reason"]
    writers = [t["agent"] for t in vitals["trace"] if t["step"] == "writer"]
    assert writers in ([], ["phone-slm"]), vitals["trace"]
    assert all(t["agent"] != "slm-edge" for t in vitals["trace"])

    # every draft is counted as passed, stopped by the gate, or without text
    assert counters["drafts"] == counters["passed"] + counters["failed"] + counters["no_text"] >= 3
