"""The cascade's confidence comes from the model, and when the cloud endpoint stops mid-run a public open question
gets the edge model's best answer marked degraded, with its confidence, instead of failing. Real parts: a
llama.cpp OpenAI-compatible server as the cloud endpoint (stopped mid-run), a cloud agent in front of it, a SmolLM2
agent, Mosquitto and the orchestrator."""

from __future__ import annotations

import asyncio

import pytest

from edgecoop.agents.cloudserver import CloudServer
from edgecoop.agents.handlers.slm import agreement
from edgecoop.orchestrator import Orchestrator
from edgecoop.orchestrator.confidence import Calibration, fit

API_KEY = "test-key-degraded"


def test_agreement_measures_how_much_the_samples_say_the_same():
    assert agreement("Canberra is the capital", ["Canberra is the capital", "canberra is the capital"]) == 1.0
    assert agreement("Canberra", ["Sydney", "Melbourne"]) == 0.0
    assert 0.0 < agreement("the capital is Canberra", ["the capital is Sydney"]) < 1.0
    assert agreement("x", []) == 0.0


def test_calibration_is_monotone_and_maps_agreement_to_the_share_correct():
    pairs = [(0.1, False), (0.2, False), (0.3, True), (0.5, False), (0.6, True), (0.7, True), (0.9, True),
             (0.95, True), (0.99, True)]  # fmt: skip
    cal = fit(pairs)
    assert list(cal.probs) == sorted(cal.probs) and cal.edges[-1] == 1.0
    assert cal(0.05) < cal(0.97)
    assert cal(0.97) == 1.0
    assert Calibration()(0.42) == 0.42  # no table: the raw agreement


@pytest.mark.llm
@pytest.mark.timeout(600)
async def test_cloud_stopped_mid_run_gives_degraded_edge_answers(settings, topics, make_agent, monkeypatch):
    pytest.importorskip("llama_cpp")
    monkeypatch.setenv("EDGECOOP_TEST_CLOUD_KEY", API_KEY)
    server = CloudServer("smollm2-135m", api_key=API_KEY)
    await asyncio.to_thread(server.start)
    cloud_caps = [{"kind": "cloud", "max_concurrency": 2, "options": {
        "url": server.url, "max_tokens": 24, "api_key_env": "EDGECOOP_TEST_CLOUD_KEY", "timeout_s": 20}}]  # fmt: skip
    slm_caps = [{"kind": "slm", "options": {"model": "smollm2-135m", "n_threads": 1, "max_tokens": 32}}]
    agents = [make_agent("cloud-llm", capabilities=cloud_caps, site="cloud", domains=["general"],
                         description="Cloud LLM: general knowledge, open questions"),
              make_agent("slm-edge", capabilities=slm_caps, description="small language model")]  # fmt: skip
    try:
        for a in agents:
            await a.__aenter__()
        async with Orchestrator(settings, topics=topics) as orch:
            before = await orch.submit("What is the capital of Australia?", strategy="capability-aware")
            assert before["state"] == "done" and before["tier"] == "cloud", before["reason"]
            assert not before.get("degraded")

            await asyncio.to_thread(server.stop)  # the endpoint goes away mid-run; its agent stays online

            after = await orch.submit("Who wrote Pride and Prejudice?", strategy="capability-aware")
            assert after["state"] == "done" and after["tier"] == "edge", after["reason"]
            assert after["degraded"] is True and "cloud failed" in after["reason"]
            assert 0.0 <= after["confidence"] <= 1.0 and after["answer"]
            assert [t["step"] for t in after["trace"] if t["ok"]] == ["slm"]  # the cloud step failed, then the edge
            assert [st[0]["kind"] for st in after["plan"]["stages"]] == ["cloud", "slm"]  # both, in the order they ran

            # the cascade: an edge answer whose measured confidence is below the threshold escalates; with the
            # cloud gone it is sent as it is, marked degraded, with the confidence the model gave it
            orch.engine.cascade_threshold = 1.01
            cascade = await orch.submit("Who painted the Mona Lisa?", strategy="cascade")
            assert cascade["state"] == "done" and cascade["degraded"] is True, cascade["reason"]
            assert "low edge confidence" in cascade["reason"]
            assert sum(t["step"] == "slm" for t in cascade["trace"]) == 1  # its own answer, not asked twice
            assert [st[0]["kind"] for st in cascade["plan"]["stages"]] == ["slm", "cloud"]
    finally:
        for a in agents:
            await a.__aexit__(None, None, None)
        await asyncio.to_thread(server.stop)
