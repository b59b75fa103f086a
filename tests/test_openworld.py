"""Open world: agents nobody's code names, added at runtime, are understood from their cards alone.

A noise monitor (modality ``noise_dba``), a kitchen sensor at a new place, and a knowledge agent for a new domain
(parks) are started from ``agents/examples`` while the orchestrator runs; natural questions about each are answered
at the edge with the right value or passage. Stopped, their questions get a clear "no agent", never the cloud.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from edgecoop.agents import Agent
from edgecoop.agents.config import CapabilitySpec, config_from_dict, load_agent_config
from edgecoop.orchestrator import Orchestrator
from edgecoop.scenarios.loader import load_scenario

EXAMPLES = Path(__file__).resolve().parent.parent / "agents" / "examples"


def _cloud(settings, topics):
    cfg = config_from_dict({"agent": {"id": "cloud-llm", "site": "cloud", "description": "Cloud LLM",
                                      "domains": ["general"]}}, broker=settings, prefix=topics.prefix,
                           capabilities=(CapabilitySpec("cloud", "cloud-reference", options={"latency_ms": 5}),))  # fmt: skip
    return Agent(cfg)


async def test_agents_added_at_runtime_are_understood_and_their_absence_is_not_guessed(settings, topics):
    base = [Agent(c) for c in load_scenario("urban", settings, prefix=topics.prefix,
                                             include={"air-park", "air-oldtown", "air-station", "kb-city"})]  # fmt: skip
    cloud = _cloud(settings, topics)
    cloud_handler = cloud.handlers["cloud"]
    started = [*base, cloud]
    for a in started:
        await a.__aenter__()
    try:
        async with Orchestrator(settings, topics=topics) as orch:
            # before: nothing at the edge measures noise; the question is refused with the reason, not guessed
            r = await orch.submit("How loud is it at Old Town Square?")
            assert r["tier"] == "none" and r["decision"] in ("refused", "clarify") and r["cloud_calls"] == 0, r

            runtime = {f.stem: Agent(load_agent_config(f, broker=settings, prefix=topics.prefix))
                       for f in sorted(EXAMPLES.glob("*.toml"))}  # fmt: skip
            for a in runtime.values():
                await a.__aenter__()
                started.append(a)
            await orch.mirror.wait_for(lambda s: all(s.status(i) == (True, s.status(i)[1]) for i in runtime
                                                     if s.status(i)), timeout=10)  # fmt: skip
            await orch.mirror.wait_for(lambda s: all(s.card(i) is not None for i in runtime), timeout=10)

            # (a) a modality no code names
            r = await orch.submit("How loud is it at Old Town Square?")
            assert r["state"] == "done" and r["tier"] == "edge", r
            assert r["classification"]["targets"][0]["modality"] == "noise_dba"
            assert abs(r["value"] - 62) < 3 and "dB(A)" in r["answer"], r["answer"]
            r = await orch.submit("is it noisy in the old town right now?")
            assert r["state"] == "done" and r["tier"] == "edge" and abs(r["value"] - 62) < 3, r

            # (b) a new place, with a word ("temperature") that health data also uses: public, not private
            r = await orch.submit("What's the temperature in the kitchen?")
            assert r["state"] == "done" and r["tier"] == "edge", r
            assert r["classification"]["targets"][0]["place"] == "Home Kitchen"
            assert abs(r["value"] - 21.5) < 1 and r["privacy"] == "public", r
            r = await orch.submit("Is the kitchen warmer than 25 °C?")
            assert r["state"] == "done" and r["decision"] == "within", r

            # (c) a knowledge agent for a new domain, with its own documents
            r = await orch.submit("What time does City Park close?")
            assert r["state"] == "done" and r["tier"] == "edge", r
            assert any(Path(s).name == "opening_hours.md" for s in r["sources"]), r
            assert "22:00" in r["answer"] or "20:00" in r["answer"], r["answer"]
            r = await orch.submit("Can I bring my dog to City Park?")
            assert r["state"] == "done" and any(Path(s).name == "park_rules.md" for s in r["sources"]), r

            # an unknown place gets no other place's answer
            r = await orch.submit("What is the PM2.5 level at Narnia Square?")
            assert r["tier"] == "none" and r["decision"] == "refused" and "Narnia" in r["answer"], r

            # stop the noise monitor: a clear "no agent", not a cloud guess
            noise = runtime["noise-oldtown"]
            await noise.__aexit__(None, None, None)
            started.remove(noise)
            await orch.mirror.wait_for(lambda s: s.status("noise-oldtown") is None or not s.status("noise-oldtown")[0],
                                       timeout=10)  # fmt: skip
            r = await orch.submit("How loud is it at Old Town Square?", deadline_s=15)
            assert r["state"] == "failed" and r["tier"] == "edge" and r["cloud_calls"] == 0, r
            assert "no" in r["reason"] and "agent" in r["reason"], r["reason"]
            assert cloud_handler.calls == 0
    finally:
        for a in reversed(started):
            await a.__aexit__(None, None, None)


@pytest.mark.parametrize(
    "question",
    [
        "Do I have diabetes?",
        "Should I be worried about how I feel today?",
        "Upload my heart rate history to my doctor's cloud portal.",
        "What should I invest my savings in?",
        "Am I okay?",
        "Explain how a heat pump works.",
    ],
)
async def test_no_strategy_sends_a_private_or_site_task_to_the_cloud(settings, topics, question):
    """Every strategy, both parsers' paths (the model parser is covered in test_openworld_model), private questions
    without medical words, and a site-class submission: the cloud stand-in never sees any of them."""
    from edgecoop.orchestrator import STRATEGIES

    cloud = _cloud(settings, topics)
    handler = cloud.handlers["cloud"]
    await cloud.__aenter__()
    try:
        async with Orchestrator(settings, topics=topics) as orch:
            for name in STRATEGIES:
                privacy = "site" if question.startswith("Explain") else None
                r = await orch.submit(question, strategy=name, privacy=privacy, deadline_s=10)
                assert r["cloud_calls"] == 0 and r["tier"] != "cloud", (name, r)
                assert r["privacy"] in ("private", "site"), (name, r)
            assert handler.calls == 0
    finally:
        await cloud.__aexit__(None, None, None)
