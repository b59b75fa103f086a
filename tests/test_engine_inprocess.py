"""The engine in-process, through its seams: a real CMS store (SQLite) as the directory and a dispatcher that
answers like the agents would. Plans, routes, refusals and answers in milliseconds; the wire is tested elsewhere
(tests/test_orchestrator.py, test_openworld.py) against a real broker and real agents."""

from __future__ import annotations

import asyncio
import time
import tomllib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from edgecoop.agents import Agent
from edgecoop.agents.config import load_agent_config
from edgecoop.cms.discovery import DiscoveryQuery, Match
from edgecoop.cms.store import CmsStore, Update
from edgecoop.messages import CapabilityCard, Response, Status
from edgecoop.orchestrator.engine import Engine, Submission
from edgecoop.orchestrator.strategies import get_strategy
from edgecoop.scenarios.data import data_root

ROOT = Path(__file__).resolve().parent.parent


class StoreDirectory:
    """The Directory seam over a real in-memory CmsStore, on the calling thread."""

    def __init__(self, cards: list[CapabilityCard]) -> None:
        self.store = CmsStore()
        self.store.ingest([Update(c.agent_id, card=c) for c in cards])
        self.store.ingest([Update(c.agent_id, status=Status(c.agent_id, True, c.epoch)) for c in cards])
        self.version = 1

    async def discover(self, q: DiscoveryQuery) -> list[Match]:
        return self.store.discover(q)

    async def query(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(self.store, *args)

    async def wait_for(self, predicate: Callable[[Any], bool], timeout: float | None = 10.0) -> None:
        if predicate(self.store):
            return
        if timeout is None:  # an offline watch: nobody goes offline here, so it waits until cancelled
            await asyncio.Event().wait()
        raise TimeoutError  # nothing changes in-process: a grace wait ends at once


class AnswerDispatcher:
    """The Dispatcher seam: answers as the scenario's agents would (sensor base values, rulebooks from the files)."""

    site = None

    def __init__(self, configs: Mapping[str, Any]) -> None:
        self.configs = configs
        self.calls: list[tuple[str, str, dict[str, Any]]] = []
        self.passages: list[dict[str, Any]] = []  # what every knowledge agent finds

    async def request(
        self, agent_id: str, capability: str, input: Mapping[str, Any] | None = None, **_: Any
    ) -> Response:
        data = dict(input or {})
        self.calls.append((agent_id, capability, data))
        cfg = self.configs[agent_id]
        cap = next(c for c in cfg.capabilities if c.name == capability)
        if cap.kind == "sensor":
            s = next(s for s in cap.options["sensors"] if s["name"] == data["sensor"])
            return Response(True, {"sensor": s["name"], "value": float(s["base"]), "unit": s.get("unit", "")})
        if cap.kind == "rulebook":
            rules = tomllib.loads((cfg.source.parent / cap.options["rules"]).read_text())
            found = [{"key": k, **r} for k, r in rules.items() if r.get("modality") == data["modality"]]
            return Response(True, {"rules": sorted(found, key=lambda r: not r.get("default", False))})
        if cap.kind == "cloud":
            return Response(True, {"text": "cloud answer", "cost": 0.001})
        if cap.kind == "knowledge":
            return Response(True, {"passages": self.passages, "answer": "", "confidence": 0.8 if self.passages else 0})
        if cap.kind == "camera":  # the stream reference a camera hands to the vision agent
            return Response(True, {"source": "synthetic", "seed": int(cap.options["seed"]), "frames": 60})
        if cap.kind == "vision":  # a confident count that differs per camera: its seed's last digit
            return Response(True, {"count": data["seed"] % 10, "confidence": 0.9, "method": "test"})
        raise AssertionError(f"unexpected request to {agent_id}/{capability}")

    async def pool_request(self, *a: Any, **k: Any) -> Response:
        raise AssertionError("no pools here")


@pytest.fixture(scope="module")
def world() -> Iterator[tuple[list[CapabilityCard], dict[str, Any]]]:
    files = [*sorted(data_root().glob("*/agents/*.toml")), *sorted((ROOT / "agents" / "examples").glob("*.toml"))]
    with pytest.MonkeyPatch.context() as mp:  # the cloud card is built, never called; the variable does not leak
        mp.setenv("EDGECOOP_CLOUD_URL", "http://127.0.0.1:9")
        configs = {c.agent_id: c for c in (load_agent_config(f) for f in files)}
        cards = [Agent(c).card() for c in configs.values()]
    yield cards, configs


async def _ask(
    world: Any,
    question: str,
    strategy: str = "capability-aware",
    *,
    policy: str | None = None,
    without: tuple[str, ...] = (),
    passages: list[dict[str, Any]] | None = None,
    **kw: Any,
) -> tuple[dict[str, Any], AnswerDispatcher]:
    """One task through a fresh engine; ``without`` leaves agents out, ``passages`` is what knowledge agents find."""
    cards, configs = world
    dispatcher = AnswerDispatcher(configs)
    dispatcher.passages = passages or []
    # no SLM here (this dispatcher answers as the data agents would): the written answers are tests/test_writer.py's
    engine = Engine(StoreDirectory([c for c in cards if c.agent_id not in without]), dispatcher, policy=policy,
                    write_answers=False)  # fmt: skip

    async def emit(_state: str, _extra: Mapping[str, Any]) -> None:
        return None

    outcome = await engine.run(Submission("t1", question, deadline_s=5, **kw), get_strategy(strategy), emit)
    return outcome.to_dict("t1"), dispatcher


async def test_a_read_goes_to_the_agent_at_the_named_place(world):
    t0 = time.perf_counter()
    r, d = await _ask(world, "How loud is it at Old Town Square?")
    assert r["state"] == "done" and r["tier"] == "edge", (r["reason"], r["trace"])
    assert r["value"] == 62.0 and "dB(A)" in r["answer"]
    assert [c[0] for c in d.calls] == ["noise-oldtown"]
    assert time.perf_counter() - t0 < 1.0


async def test_a_users_limit_replaces_the_rulebooks_value_but_keeps_its_direction(world):
    r, d = await _ask(world, "Is NO2 at Harbour Gate over the EU hourly limit of 200?")
    assert r["decision"] == "within" and "200" in r["answer"] and "25" not in r["answer"]
    assert d.calls[0][0] == "air-harbour"
    # "under 10" of a pollutant with an upper-bound rule is that bound at 10 (base 8: within), not a minimum
    r, _ = await _ask(world, "Is the PM2.5 at City Park under 10?")
    assert r["decision"] == "within" and "limit of 10" in r["answer"], r["answer"]


async def test_a_check_uses_the_rule_bound_to_the_modality_and_domain(world):
    r, d = await _ask(world, "Is the PM2.5 at City Park above the limit?")
    assert r["decision"] == "within" and "WHO" in r["answer"]  # base 8 against 15
    assert sorted(c[0] for c in d.calls) == ["air-park", "kb-city", "kb-clinic"]  # every rulebook asked, one rule fits
    r, _ = await _ask(world, "Is my temperature too high?")
    assert r["decision"] == "within" and "38" in r["answer"] and r["privacy"] == "private"
    # the fever rule (domain health) is not a kitchen limit: the value is stated, no judgement made
    r, _ = await _ask(world, "Is the kitchen temperature too high?")
    assert r["decision"] == "no_limit" and "21.5" in r["answer"]


async def test_compare_and_aggregate_fan_out(world):
    r, d = await _ask(world, "Is PM2.5 higher at City Park or Harbour Gate?")
    assert r["classification"]["operation"] == "compare" and set(r["values"]) == {"City Park", "Harbour Gate"}
    r, d = await _ask(world, "Which station has the highest NO2?")
    assert r["classification"]["operation"] == "aggregate" and r["answer"].startswith("The highest NO2 is at")
    assert {c[0] for c in d.calls} == {"air-park", "air-station", "air-oldtown", "air-harbour"}


@pytest.mark.parametrize("question", ["What is the PM2.5 level at Narnia Square?", "How full is bus 7?",
                                      "What was the NO2 at City Park yesterday?", "What's the ozone level at City Park?"])  # fmt: skip
async def test_what_the_edge_does_not_know_is_refused_without_asking_anyone(world, question):
    r, d = await _ask(world, question)
    assert r["tier"] == "none" and r["decision"] == "refused" and d.calls == [], r["answer"]


async def test_an_ambiguous_place_is_asked_back_with_the_options(world):
    r, d = await _ask(world, "What's the PM2.5 level?")
    assert r["decision"] == "clarify" and "City Park" in r["options"] and d.calls == []


@pytest.mark.parametrize("strategy", ["cloud-only", "random", "cascade", "capability-aware"])
async def test_private_questions_never_reach_the_cloud_in_process(world, strategy):
    for q in ("Do I have diabetes?", "Am I okay?", "What should I invest my savings in?"):
        r, d = await _ask(world, q, strategy)
        assert r["cloud_calls"] == 0 and "cloud" not in _kinds(world, d), (strategy, q)


def _kinds(world: Any, d: AnswerDispatcher) -> list[str]:
    _, configs = world
    return [next(c.kind for c in configs[a].capabilities if c.name == cap) for a, cap, _ in d.calls]


async def test_a_general_question_escalates_and_the_cloud_only_baseline_sends_world_questions_too(world):
    r, d = await _ask(world, "Who wrote Hamlet?")
    assert r["tier"] == "cloud" and _kinds(world, d)[-1] == "cloud"
    r, d = await _ask(world, "What is the NO2 level at Harbour Gate?", "cloud-only")
    assert r["tier"] == "cloud"  # the baseline plays a deployment without the edge
    r, d = await _ask(world, "What is the NO2 level at Harbour Gate?", "capability-aware")
    assert r["tier"] == "edge" and "cloud" not in _kinds(world, d)


async def test_a_private_site_policy_keeps_even_general_questions_off_the_cloud(world):
    """A health hub runs with privacy = "private": its policy is the floor of every task."""
    r, d = await _ask(world, "Who wrote Hamlet?", "cloud-only", policy="private")
    assert r["tier"] == "none" and r["privacy"] == "private" and "not sent to the cloud" in r["answer"]
    assert "cloud" not in _kinds(world, d)


async def test_a_users_lower_bound_is_a_minimum(world):
    r, _ = await _ask(world, "Is my SpO₂ below 93%?")
    assert r["decision"] == "within" and "above the minimum of 93" in r["answer"], r["answer"]
    assert "None" not in r["answer"] and r["privacy"] == "private"
    r, _ = await _ask(world, "Is it colder than 25 degrees in the kitchen?")
    assert r["decision"] == "below" and "21.5" in r["answer"]


async def test_camera_counts_of_two_places_are_compared(world):
    r, d = await _ask(world, "Are there more cars at Central Station or at Harbour Gate?")
    assert r["state"] == "done" and r["tier"] == "edge", (r["reason"], r["trace"])
    # cam-station seed 101 -> 1, cam-harbour seed 202 -> 2: more at Harbour Gate
    assert r["values"] == {"Central Station": 1.0, "Harbour Gate": 2.0} and r["decision"] == "Harbour Gate"
    cams = sorted(c[0] for c in d.calls if c[0].startswith("cam-"))
    assert cams == ["cam-harbour", "cam-station"] and sum(c[1] == "vision" for c in d.calls) == 2


async def test_a_document_question_goes_to_the_agent_whose_declared_topics_hold_its_words(world):
    r, d = await _ask(world, "What SpO2 should COPD patients aim for?")
    assert [c[0] for c in d.calls] == ["kb-clinic"]  # no sensor read: a question about the guidelines
    assert r["privacy"] == "private" and r["tier"] != "cloud"


async def test_a_passage_about_something_else_is_not_an_answer(world):
    r, d = await _ask(world, "What does NEWS2 measure?")
    assert [c[0] for c in d.calls] == ["kb-clinic"] and r["state"] == "done"
    # the dispatcher's knowledge agent now finds only an unrelated passage: refused, not answered with it
    unrelated = [{"doc": "oxygen_saturation.md", "title": "Measurement pitfalls",
                  "text": "Cold fingers and nail varnish cause falsely low readings."}]  # fmt: skip
    out, _ = await _ask(world, "What does NEWS2 measure?", passages=unrelated)
    assert out["answer"] is None or "nail varnish" not in str(out["answer"]), out
    assert out["tier"] != "cloud"


async def test_a_reading_only_the_askers_own_device_takes_is_private_even_without_my(world):
    """ "Current temperature?" with the health scenario's wearable the only thermometer: its data is private, so not
    even the cloud-only baseline may send the task out; with the kitchen's public thermometer too, it is asked back."""
    for strategy in ("cloud-only", "capability-aware"):
        out, _ = await _ask(world, "Current temperature?", strategy, without=("kitchen-temp",))
        assert out["privacy"] == "private" and out["tier"] != "cloud" and out["cloud_calls"] == 0, (strategy, out)
    r, d = await _ask(world, "Current temperature?", "cloud-only")
    assert r["decision"] == "clarify" and "Home Kitchen" in r["answer"] and not d.calls, r
