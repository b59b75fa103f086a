"""The typed task specification the Classifier Engine produces: what a question asks, about what, where.

A specification names only things the live vocabulary knows (modalities, places, objects, knowledge agents);
what the parser could not resolve is stated (``unknown``, ``ask``), so the engine refuses or asks back instead of
guessing.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["PRIVACY_ORDER", "Limit", "Operation", "Target", "TaskSpec", "strictest"]


class Operation(enum.StrEnum):
    READ = "read"  # a live or recent value of one modality at one place
    CHECK = "check"  # a value against a limit (the rulebook's or the user's)
    AGGREGATE = "aggregate"  # one modality over every place that measures it
    COMPARE = "compare"  # one modality at two or more places
    COUNT = "count"  # objects seen by a camera, counted by a vision agent
    SUMMARISE = "summarise"  # every personal vital sign together
    LOOKUP = "lookup"  # what a document, rule or guideline says
    OPEN = "open"  # anything else: general knowledge, beyond the edge's own world


#: the cooperation types and collaboration shape of each operation (for cards, dashboards and the paper's terms)
SHAPES: dict[Operation, tuple[tuple[str, ...], str]] = {
    Operation.READ: (("data",), "single"),
    Operation.CHECK: (("data", "knowledge"), "parallel"),
    Operation.AGGREGATE: (("data",), "parallel"),
    Operation.COMPARE: (("data",), "parallel"),
    Operation.COUNT: (("data", "computation"), "sequential"),
    Operation.SUMMARISE: (("data", "knowledge"), "parallel"),
    Operation.LOOKUP: (("knowledge",), "single"),
    Operation.OPEN: (("computation",), "single"),
}

PRIVACY_ORDER = ("public", "site", "private")


def strictest(*classes: str | None) -> str:
    """The strictest privacy class among ``classes``; anything unknown counts as private (fail closed)."""
    rank = 0
    for c in classes:
        if c is None:
            continue
        rank = max(rank, PRIVACY_ORDER.index(c) if c in PRIVACY_ORDER else 2)
    return PRIVACY_ORDER[rank]


@dataclass(frozen=True, slots=True)
class Target:
    modality: str  # a sensor modality, or a countable object class ("vehicles")
    place: str | None = None  # a card location name; None = every place (aggregate) or the only one
    agg: str = "latest"  # latest | mean | max | min
    window_s: int = 0


@dataclass(frozen=True, slots=True)
class Limit:
    value: float
    unit: str = ""
    #: "max" (the value should stay at or under it: "over 40?") or "min" (at or over it: "below 93 %?")
    kind: str = "max"


@dataclass(frozen=True, slots=True)
class TaskSpec:
    operation: Operation
    targets: tuple[Target, ...] = ()
    limit: Limit | None = None
    personal: bool = False
    confidence: float = 1.0
    #: the knowledge agent a look-up goes to (best match of its declared domains and tags)
    knowledge_agent: str | None = None
    #: why the edge cannot serve it as asked ("no place called Narnia Square"): the engine refuses with this
    unknown: str = ""
    #: a clarifying question and its options ("which place: ..."): the engine asks back
    ask: str = ""
    options: tuple[str, ...] = ()
    #: the open question looks like general knowledge (not about this edge world or the asker)
    general: bool = False
    parser: str = "fast"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def edge_capable(self) -> bool:
        return self.operation is not Operation.OPEN

    @property
    def cooperation(self) -> tuple[str, ...]:
        return SHAPES[self.operation][0]

    @property
    def shape(self) -> str:
        return SHAPES[self.operation][1]

    @property
    def modality(self) -> str | None:
        return self.targets[0].modality if self.targets else None

    @property
    def place(self) -> str | None:
        return self.targets[0].place if self.targets else None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["operation"] = self.operation.value
        d["targets"] = [asdict(t) for t in self.targets]
        d["limit"] = asdict(self.limit) if self.limit else None
        d["options"] = list(self.options)
        d["cooperation"] = list(self.cooperation)
        d["shape"] = self.shape
        # the names dashboards and older clients read
        d["intent"] = self.operation.value
        d["quantity"] = self.modality
        d["place"] = self.place
        return d
