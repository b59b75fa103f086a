"""Scheduling strategies: which tier serves a task, and which agents serve each step.

All strategies see the same candidates from the CMS; they differ in how they use the classification, the
semantic match and the live load. Privacy is not a strategy's business, and neither is the edge's own world: the engine asks a strategy
for a tier only for public, general open questions; every other task is served at the edge or refused.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from typing import ClassVar

from edgecoop.cms.discovery import Match
from edgecoop.errors import ConfigError
from edgecoop.orchestrator.spec import TaskSpec

__all__ = ["STRATEGIES", "Strategy", "get_strategy"]


def _load(m: Match) -> tuple[int, int]:
    load = m.card.get("load", {})
    return int(load.get("queue", 0)) + int(load.get("inflight", 0)), int(bool(load.get("busy")))


class Strategy:
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    #: use the place/need text to rank candidates (semantic match)
    semantic: ClassVar[bool] = False
    #: after an edge answer with low confidence or an edge failure, try the cloud
    escalate: ClassVar[bool] = False
    #: a baseline that plays a deployment without the edge: every public task goes to the cloud, world questions
    #: included (they then get the cloud's "no access to that data"); private and site tasks never do
    cloud_everything: ClassVar[bool] = False

    def __init__(self, seed: int = 0) -> None:
        self.rng = random.Random(seed)

    def tier(self, c: TaskSpec) -> str:
        """'edge' or 'cloud' for a task the cloud may serve."""
        return "edge" if c.edge_capable else "cloud"

    def order(self, candidates: Sequence[Match], key: str) -> list[Match]:
        """Order candidates for one step (first = first try); ``key`` identifies the step type."""
        return list(candidates)


class CloudOnly(Strategy):
    name = "cloud-only"
    description = "baseline: every public task goes to the cloud LLM, as in a deployment without the edge"
    cloud_everything = True

    def tier(self, c: TaskSpec) -> str:
        return "cloud"


class EdgeOnly(Strategy):
    name = "edge-only"
    description = "never the cloud; best semantic match on the edge"
    semantic = True

    def tier(self, c: TaskSpec) -> str:
        return "edge"

    def order(self, candidates: Sequence[Match], key: str) -> list[Match]:
        return sorted(candidates, key=lambda m: (-m.score, _load(m)))


class RandomStrategy(Strategy):
    name = "random"
    description = "random tier, random agent of the right kind"

    def tier(self, c: TaskSpec) -> str:
        return self.rng.choice(("edge", "cloud"))

    def order(self, candidates: Sequence[Match], key: str) -> list[Match]:
        out = list(candidates)
        self.rng.shuffle(out)
        return out


class RoundRobin(Strategy):
    name = "round-robin"
    description = "edge when the intent allows it; agents of the right kind in turn"

    def __init__(self, seed: int = 0) -> None:
        super().__init__(seed)
        self._counters: dict[str, itertools.count[int]] = {}

    def order(self, candidates: Sequence[Match], key: str) -> list[Match]:
        ordered = sorted(candidates, key=lambda m: m.agent_id)
        if not ordered:
            return []
        n = next(self._counters.setdefault(key, itertools.count())) % len(ordered)
        return ordered[n:] + ordered[:n]


class LeastLoaded(Strategy):
    name = "least-loaded"
    description = "edge when the intent allows it; the agent with the shortest queue"

    def order(self, candidates: Sequence[Match], key: str) -> list[Match]:
        return sorted(candidates, key=lambda m: (_load(m), m.agent_id))


class CapabilityAware(Strategy):
    name = "capability-aware"
    description = "edge when the intent allows it; semantic match of the need against cards, then live load"
    semantic = True

    def order(self, candidates: Sequence[Match], key: str) -> list[Match]:
        return sorted(candidates, key=lambda m: (-round(m.score, 3), _load(m), m.agent_id))


class Cascade(CapabilityAware):
    name = "cascade"
    description = "always try the edge first; escalate to the cloud on failure or low confidence"
    escalate = True

    def tier(self, c: TaskSpec) -> str:
        return "edge"


STRATEGIES: dict[str, type[Strategy]] = {
    s.name: s for s in (CloudOnly, EdgeOnly, RandomStrategy, RoundRobin, LeastLoaded, CapabilityAware, Cascade)
}


def get_strategy(name: str, seed: int = 0) -> Strategy:
    try:
        return STRATEGIES[name](seed)
    except KeyError:
        raise ConfigError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}") from None
