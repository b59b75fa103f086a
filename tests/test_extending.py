"""docs/extending.md followed to the letter: its files are written out and run against the session's broker.

Every fenced block preceded by ``<!-- file: NAME -->`` is written to a temporary folder as ``NAME``; the tests then do
what the page says (import the modules, load the agent files, ask) and check what it says happens.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgecoop.agents import Agent
from edgecoop.agents.config import load_agent_config
from edgecoop.agents.handlers import base as handler_base
from edgecoop.connection import BrokerSettings
from edgecoop.errors import RemoteError
from edgecoop.orchestrator import Orchestrator
from edgecoop.orchestrator.strategies import STRATEGIES
from edgecoop.topics import Topics

PAGE = Path(__file__).resolve().parents[1] / "docs" / "extending.md"
_FILE_BLOCK = re.compile(r"^<!-- file: (?P<name>\S+) -->\n```[^\n]*\n(?P<body>.*?)^```$", re.MULTILINE | re.DOTALL)


def page_files() -> dict[str, str]:
    return {m["name"]: m["body"] for m in _FILE_BLOCK.finditer(PAGE.read_text(encoding="utf-8"))}


def test_the_page_has_every_file_the_recipes_use():
    assert set(page_files()) == {
        "wordcount.py", "counter.toml", "run_counter.py", "ask_counter.py",
        "lowest_latency.py", "air-slow.toml", "air-fast.toml",
        "greenhouse/agents/soil-2.toml", "greenhouse/agents/kb-grower.toml", "greenhouse/rules.toml",
        "greenhouse/knowledge/watering.md",
    }  # fmt: skip


@pytest.fixture
def recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The page's files in a folder on sys.path; registries and imported modules are restored afterwards."""
    for name, body in page_files().items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(body, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(handler_base, "_REGISTERED", dict(handler_base._REGISTERED))
    strategies = dict(STRATEGIES)
    modules = set(sys.modules)
    try:
        yield tmp_path
    finally:
        STRATEGIES.clear()
        STRATEGIES.update(strategies)
        for name in set(sys.modules) - modules:
            if name in {"wordcount", "run_counter", "ask_counter", "lowest_latency"}:
                del sys.modules[name]


# -- a new handler kind --------------------------------------------------------------------------------------
async def test_new_handler_kind(recipe: Path, settings: BrokerSettings, topics: Topics):
    import ask_counter  # type: ignore[import-not-found]
    import run_counter  # type: ignore[import-not-found]  # noqa: F401  (imports wordcount: registers the kind)

    assert handler_base.handler_class("wordcount").__name__ == "WordCountHandler"
    # run_counter.main(), pointed at the test broker and prefix
    async with Agent(load_agent_config(recipe / "counter.toml", broker=settings, prefix=topics.prefix)) as agent:
        card = agent.card()
        assert [(c.name, c.kind, c.cooperation) for c in card.capabilities] == [
            ("wordcount", "wordcount", "computation")
        ]
        assert await ask_counter.count_words(settings, "to be or not to be", topics) == 6
        with pytest.raises(RemoteError) as err:
            await agent.requester.request("counter", "wordcount", {}, timeout=5)
        assert err.value.code == "bad_input"
        assert await ask_counter.count_words(settings, "still serving", topics) == 2


# -- a new strategy ----------------------------------------------------------------------------------------
async def _read_agent(orch: Orchestrator, strategy: str) -> tuple[str, Any, str]:
    r = await orch.submit("What is the PM2.5 at Test Park?", strategy=strategy)
    assert r["state"] == "done", r
    agents = [t["agent"] for t in r["trace"] if t["ok"]]
    return agents[0], r["value"], r["tier"]


async def test_new_strategy(recipe: Path, settings: BrokerSettings, topics: Topics):
    import lowest_latency  # type: ignore[import-not-found]

    assert STRATEGIES["lowest-latency"] is lowest_latency.LowestLatency
    configs = [
        load_agent_config(recipe / f, broker=settings, prefix=topics.prefix) for f in ("air-slow.toml", "air-fast.toml")
    ]
    async with Agent(configs[0]), Agent(configs[1]), Orchestrator(settings, topics=topics) as orch:
        assert await _read_agent(orch, "capability-aware") == ("air-a", 9, "edge")
        assert await _read_agent(orch, "lowest-latency") == ("air-b", 9, "edge")
    async with (
        Agent(configs[0]),
        Agent(configs[1]),
        Orchestrator(settings, topics=topics, strategy="lowest-latency") as orch,
    ):
        r = await orch.submit("What is the PM2.5 at Test Park?")
        assert [t["agent"] for t in r["trace"] if t["ok"]] == ["air-b"]


# -- a new scenario ----------------------------------------------------------------------------------------
async def test_new_scenario(recipe: Path, settings: BrokerSettings, topics: Topics):
    files = sorted((recipe / "greenhouse" / "agents").glob("*.toml"))
    assert [f.name for f in files] == ["kb-grower.toml", "soil-2.toml"]
    configs = [load_agent_config(f, broker=settings, prefix=topics.prefix) for f in files]
    async with Agent(configs[0]), Agent(configs[1]), Orchestrator(settings, topics=topics) as orch:
        r = await orch.submit("What is the soil moisture in Greenhouse 2?")
        assert (r["state"], r["tier"], r["classification"]["operation"]) == ("done", "edge", "read"), r
        assert [t["agent"] for t in r["trace"] if t["ok"]] == ["soil-2"] and r["value"] == 24

        r = await orch.submit("Is the tomato house too dry?")
        assert (r["state"], r["tier"], r["classification"]["operation"]) == ("done", "edge", "check"), r
        assert {t["agent"] for t in r["trace"] if t["ok"]} == {"soil-2", "kb-grower"}
        assert r["decision"] == "too dry" and "30" in r["answer"], r

        r = await orch.submit("When should the tomato beds be watered?")
        assert (r["state"], r["tier"], r["classification"]["operation"]) == ("done", "edge", "lookup"), r
        assert "watering.md" in str(r["sources"]) and "30 percent" in r["answer"], r

        r = await orch.submit("What is the soil moisture in Greenhouse 7?")
        assert (r["tier"], r["decision"]) == ("none", "refused"), r
        assert r["cloud_calls"] == 0
