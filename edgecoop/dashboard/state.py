"""The dashboard's bounded, in-memory picture of the platform, fed by MQTT messages.

Everything here is plain data and synchronous: :class:`DashboardState` takes decoded wire maps, updates
itself and returns the change as ``(event, data)`` pairs that the server fans out over Server-Sent Events.
All containers are bounded, each with a stated drop policy:

* agents: at most ``max_agents`` (new agents beyond it are refused and counted; retained cards re-arrive);
* tasks: the last ``max_tasks`` (oldest evicted first);
* sensors: at most ``max_series`` series (new series beyond it are refused and counted), each keeping its last
  ``readings_per_sensor`` readings;
* edge/cloud split: per-minute buckets of the last ``split_minutes`` minutes;
* orchestrators: at most ``max_orchestrators`` (status and overload alarm each).

What the numbers mean, so that the page never flatters: a finished task counts under ``edge`` or ``cloud`` only
when it is ``done`` there; ``failed`` and ``timed_out`` count as ``failed`` whatever tier they tried; a task done
with no tier (the orchestrator refused it or asked back) counts as ``none``. Comparison runs (task ids starting
with ``baseline-`` or ``bench-``: the demo's cloud-only baseline, benchmarks) are kept apart: marked
``comparison``, counted in ``comparison`` and never in the split or its totals.

Untrusted text (card descriptions, questions, answers) is kept as data and length-capped; the page renders it
with ``textContent`` only.
"""

from __future__ import annotations

import math
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from edgecoop.errors import SchemaError, TopicError
from edgecoop.messages import CapabilityCard, Reading, Status
from edgecoop.topics import validate_id

__all__ = [
    "BASELINE_TASK_PREFIX",
    "COMPARISON_PREFIXES",
    "OUTCOMES",
    "TASK_STATES",
    "TERMINAL_STATES",
    "TIERS",
    "DashboardState",
    "Event",
    "is_comparison",
    "parse_task_event",
]

#: Every state a task event may carry, in lifecycle order.
TASK_STATES = ("received", "classified", "planned", "step_done", "escalated", "degraded", "done", "failed", "timed_out")
TERMINAL_STATES = frozenset({"done", "failed", "timed_out"})
TIERS = ("edge", "cloud", "none")
#: how a finished task counts: done at the edge, done in the cloud, done with no tier (refused, asked back), failed
OUTCOMES = ("edge", "cloud", "none", "failed")
#: the task id prefix of a baseline run (the demo's cloud-only comparison)
BASELINE_TASK_PREFIX = "baseline-"
#: task ids of comparison runs (a baseline, a benchmark): shown apart, never counted as live traffic
COMPARISON_PREFIXES = (BASELINE_TASK_PREFIX, "bench-")
_MAX_ORCHESTRATORS = 64
_SHAPES = ("single", "sequential", "parallel", "cloud")
_MAX_TEXT = 500
_MAX_ANSWER = 4000
_MAX_STEPS = 32
_MAX_HISTORY = 32

#: One change: the SSE event name and its JSON-able data.
Event = tuple[str, dict[str, Any]]


def _text(value: object, limit: int = _MAX_TEXT) -> str:
    if not isinstance(value, str):
        return ""
    return value if len(value) <= limit else value[: limit - 1] + "…"


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    f = float(value)
    return f if math.isfinite(f) else None


def is_comparison(task_id: str) -> bool:
    """A comparison run (the demo's cloud-only baseline, a benchmark), by its task id's prefix."""
    return task_id.startswith(COMPARISON_PREFIXES)


def _outcome(state: str, tier: str) -> str:
    if state != "done":
        return "failed"
    return tier if tier in ("edge", "cloud") else "none"


def _tier(value: object) -> str:
    return value if isinstance(value, str) and value in TIERS else ""


def _step(d: object) -> dict[str, Any] | None:
    if not isinstance(d, Mapping):
        return None
    step: dict[str, Any] = {
        "agent": _text(d.get("agent"), 64),
        "capability": _text(d.get("capability"), 64),
        "tier": _tier(d.get("tier")) or "edge",
    }
    if (ms := _number(d.get("ms"))) is not None:
        step["ms"] = ms
    if isinstance(d.get("ok"), bool):
        step["ok"] = d["ok"]
    return step


def _classification(d: object) -> dict[str, Any] | None:
    if not isinstance(d, Mapping):
        return None
    coop = d.get("cooperation")
    out: dict[str, Any] = {
        "cooperation": [_text(c, 32) for c in coop[:8] if isinstance(c, str)] if isinstance(coop, list) else [],
        "domain": _text(d.get("domain"), 64),
        "privacy": _text(d.get("privacy"), 32),
    }
    difficulty = d.get("difficulty")
    out["difficulty"] = _number(difficulty) if _number(difficulty) is not None else _text(difficulty, 32)
    if isinstance(d.get("edge_capable"), bool):
        out["edge_capable"] = d["edge_capable"]
    return out


def _plan(d: object) -> dict[str, Any] | None:
    if not isinstance(d, Mapping):
        return None
    shape = d.get("shape")
    steps = d.get("steps")
    return {
        "shape": shape if isinstance(shape, str) and shape in _SHAPES else "single",
        "steps": [s for s in map(_step, steps[:_MAX_STEPS]) if s] if isinstance(steps, list) else [],
    }


def parse_task_event(d: Mapping[str, Any], topic_task_id: str) -> dict[str, Any]:
    """Validate a decoded task event; return only known, sanitised fields. Raise :class:`SchemaError`."""
    if d.get("type") != "task_event":
        raise SchemaError(f"task event: type is {d.get('type')!r}, expected 'task_event'")
    try:
        task_id = validate_id(d.get("task_id"), "task id")
    except TopicError as exc:
        raise SchemaError(f"task event: {exc}") from exc
    if task_id != topic_task_id:
        raise SchemaError(f"task event: task_id {task_id!r} does not match its topic ({topic_task_id!r})")
    state = d.get("state")
    if state not in TASK_STATES:
        raise SchemaError(f"task event: unknown state {state!r}")
    ts = _number(d.get("ts"))
    if ts is None:
        raise SchemaError("task event: missing or non-numeric ts")
    event: dict[str, Any] = {"task_id": task_id, "state": state, "ts": ts}
    if "question" in d:
        event["question"] = _text(d["question"])
    if (c := _classification(d.get("classification"))) is not None:
        event["classification"] = c
    if (p := _plan(d.get("plan"))) is not None:
        event["plan"] = p
    if (s := _step(d.get("step"))) is not None:
        event["step"] = s
    if "answer" in d:
        event["answer"] = _text(d["answer"], _MAX_ANSWER)
    if tier := _tier(d.get("tier")):
        event["tier"] = tier
    if isinstance(d.get("strategy"), str):
        event["strategy"] = _text(d["strategy"], 32)
    for key in ("latency_ms", "cost", "confidence"):  # confidence: a degraded answer's (the edge model's)
        if (n := _number(d.get(key))) is not None:
            event[key] = n
    return event


@dataclass
class _Agent:
    agent_id: str
    card: dict[str, Any] | None = None
    online: bool | None = None
    epoch: int = 0
    status_ts: float = 0.0
    updated: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.agent_id,
            "online": self.online,
            "epoch": self.epoch,
            "status_ts": self.status_ts,
            "updated": self.updated,
            "card": self.card,
        }


@dataclass
class _Series:
    agent: str
    sensor: str
    unit: str
    points: deque[tuple[float, float]]

    def to_json(self) -> dict[str, Any]:
        return {"agent": self.agent, "sensor": self.sensor, "unit": self.unit, "points": [list(p) for p in self.points]}


@dataclass
class DashboardState:
    """Bounded state plus counters; every ``apply_*`` method returns the events to broadcast."""

    max_tasks: int = 200
    readings_per_sensor: int = 120
    max_agents: int = 2000
    max_series: int = 500
    split_minutes: int = 60
    agents: dict[str, _Agent] = field(default_factory=dict)
    tasks: OrderedDict[str, dict[str, Any]] = field(default_factory=OrderedDict)
    series: dict[tuple[str, str], _Series] = field(default_factory=dict)
    #: minute (epoch seconds // 60) -> counts per outcome of tasks that finished in that minute (not comparisons)
    split: OrderedDict[int, Counter[str]] = field(default_factory=OrderedDict)
    totals: Counter[str] = field(default_factory=Counter)
    #: finished comparison runs (baseline, benchmark), by outcome: shown apart, never in the split
    comparison: Counter[str] = field(default_factory=Counter)
    counters: Counter[str] = field(default_factory=Counter)
    #: orchestrator id -> {"id", "online", "epoch", "status_ts", "alarm"}
    orchestrators: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: the dashboard's own broker connection: without it, every other number here is stale
    broker: dict[str, Any] = field(default_factory=lambda: {"connected": False, "since": 0.0, "url": ""})

    # -- agents -------------------------------------------------------------------------------------------
    def _agent(self, agent_id: str) -> _Agent | None:
        agent = self.agents.get(agent_id)
        if agent is None:
            if len(self.agents) >= self.max_agents:
                self.counters["agents_refused"] += 1
                return None
            agent = self.agents[agent_id] = _Agent(agent_id)
        return agent

    def apply_card(self, agent_id: str, data: Mapping[str, Any] | None) -> list[Event]:
        """A retained card; ``None`` (empty payload) means the agent deregistered."""
        if data is None:
            if self.agents.pop(agent_id, None) is None:
                return []
            return [("agent_removed", {"id": agent_id})]
        card = CapabilityCard.from_dict(data)
        if card.agent_id != agent_id:
            raise SchemaError(f"card: agent_id {card.agent_id!r} does not match its topic ({agent_id!r})")
        agent = self._agent(agent_id)
        if agent is None:
            return []
        summary = card.to_dict()
        del summary["v"], summary["type"]
        agent.card = summary
        agent.updated = time.time()
        return [("agent", agent.to_json())]

    def apply_status(self, agent_id: str, data: Mapping[str, Any] | None) -> list[Event]:
        if data is None:  # cleared by deregistration; the card removal removes the agent
            agent = self.agents.get(agent_id)
            if agent is None:
                return []
            agent.online = None
            return [("agent", agent.to_json())]
        status = Status.from_dict(data)
        if status.agent_id != agent_id:
            raise SchemaError(f"status: agent_id {status.agent_id!r} does not match its topic ({agent_id!r})")
        agent = self.agents.get(agent_id)
        if agent is not None and status.epoch < agent.epoch:
            # a Last Will of an older connection arriving after the newer connection's birth (field notes)
            self.counters["stale_status"] += 1
            return []
        agent = agent or self._agent(agent_id)
        if agent is None:
            return []
        agent.online, agent.epoch, agent.status_ts = status.online, status.epoch, status.ts
        agent.updated = time.time()
        return [("agent", agent.to_json())]

    # -- sensors ------------------------------------------------------------------------------------------
    def apply_reading(self, agent_id: str, sensor: str, data: Mapping[str, Any]) -> list[Event]:
        reading = Reading.from_dict(data)
        if (reading.agent_id, reading.sensor) != (agent_id, sensor):
            raise SchemaError(f"reading: {reading.agent_id}/{reading.sensor} does not match its topic")
        key = (agent_id, sensor)
        series = self.series.get(key)
        if series is None:
            if len(self.series) >= self.max_series:
                self.counters["series_refused"] += 1
                return []
            series = self.series[key] = _Series(agent_id, sensor, "", deque(maxlen=self.readings_per_sensor))
        series.unit = _text(reading.unit, 16)
        ts = reading.ts or time.time()
        series.points.append((ts, reading.value))
        return [
            ("reading", {"agent": agent_id, "sensor": sensor, "unit": series.unit, "ts": ts, "value": reading.value})
        ]

    # -- tasks --------------------------------------------------------------------------------------------
    def apply_task_event(self, event: Mapping[str, Any], now: float | None = None) -> list[Event]:
        """Merge one sanitised task event (see :func:`parse_task_event`) into its task record."""
        task_id: str = event["task_id"]
        state: str = event["state"]
        task = self.tasks.get(task_id)
        if task is None:
            task = {
                "task_id": task_id,
                "state": state,
                "question": "",
                "started": event["ts"],
                "updated": event["ts"],
                "history": [],
                "steps": [],
                "classification": None,
                "plan": None,
                "answer": None,
                "tier": "",
                "latency_ms": None,
                "cost": None,
                "strategy": "",
                "comparison": is_comparison(task_id),
            }
            self.tasks[task_id] = task
            while len(self.tasks) > self.max_tasks:
                self.tasks.popitem(last=False)
                self.counters["tasks_evicted"] += 1
        finished_before = task["state"] in TERMINAL_STATES
        # events arrive in order on one topic; still never move a finished task back to "in flight"
        if not finished_before or state in TERMINAL_STATES:
            task["state"] = state
        task["updated"] = max(task["updated"], event["ts"])
        if len(task["history"]) < _MAX_HISTORY:
            task["history"].append({"state": state, "ts": event["ts"]})
        for key in ("question", "classification", "plan", "answer", "tier", "latency_ms", "cost", "strategy",
                    "confidence"):  # fmt: skip
            if key in event:
                task[key] = event[key]
        if "step" in event and len(task["steps"]) < _MAX_STEPS:
            task["steps"].append(event["step"])
        events: list[Event] = [("task", task)]
        if state in TERMINAL_STATES and not finished_before:
            outcome = _outcome(state, task["tier"])
            if task["comparison"]:
                self.comparison[outcome] += 1
                events.append(("split", self.split_json()))
                return events
            minute = int((now if now is not None else time.time()) // 60)
            bucket = self.split.get(minute)
            if bucket is None:
                bucket = self.split[minute] = Counter()
                for old in [m for m in self.split if m <= minute - self.split_minutes]:
                    del self.split[old]
                self.split = OrderedDict(sorted(self.split.items()))  # a clock step back must not reorder
            bucket[outcome] += 1
            self.totals[outcome] += 1
            events.append(("split", self.split_json()))
        return events

    def split_json(self) -> dict[str, Any]:
        return {
            "minutes": [{"t": m * 60, **{o: c[o] for o in OUTCOMES}} for m, c in self.split.items()],
            "totals": {o: self.totals[o] for o in OUTCOMES},
            "comparison": {o: self.comparison[o] for o in OUTCOMES},
        }

    # -- orchestrators and the broker ---------------------------------------------------------------------
    def _orchestrator(self, orchestrator_id: str) -> dict[str, Any] | None:
        orch = self.orchestrators.get(orchestrator_id)
        if orch is None:
            if len(self.orchestrators) >= _MAX_ORCHESTRATORS:
                self.counters["orchestrators_refused"] += 1
                return None
            orch = self.orchestrators[orchestrator_id] = {
                "id": orchestrator_id, "online": None, "epoch": 0, "status_ts": 0.0, "alarm": None,
            }  # fmt: skip
        return orch

    def apply_orchestrator_status(self, orchestrator_id: str, data: Mapping[str, Any] | None) -> list[Event]:
        """The retained online/offline of an orchestrator (its Last Will says offline); empty = cleared."""
        if data is None:
            if self.orchestrators.pop(orchestrator_id, None) is None:
                return []
            return [("orchestrator_removed", {"id": orchestrator_id})]
        status = Status.from_dict(data)
        if status.agent_id != orchestrator_id:
            raise SchemaError(f"orchestrator status: id {status.agent_id!r} does not match its topic")
        orch = self.orchestrators.get(orchestrator_id)
        if orch is not None and status.epoch < orch["epoch"]:
            self.counters["stale_status"] += 1  # an older connection's will after the newer birth
            return []
        orch = orch or self._orchestrator(orchestrator_id)
        if orch is None:
            return []
        orch.update(online=status.online, epoch=status.epoch, status_ts=status.ts)
        return [("orchestrator", orch)]

    def apply_orchestrator_alarm(self, orchestrator_id: str, data: Mapping[str, Any] | None) -> list[Event]:
        """The retained overload alarm (``active`` or cleared) an orchestrator publishes (docs/reliability.md)."""
        orch = self._orchestrator(orchestrator_id)
        if orch is None:
            return []
        if data is None:
            orch["alarm"] = None
            return [("orchestrator", orch)]
        if data.get("type") != "alarm" or not isinstance(data.get("active"), bool):
            raise SchemaError("alarm: expected type 'alarm' and a boolean 'active'")
        suspects = data.get("suspects")
        alarm: dict[str, Any] = {
            "alarm": _text(data.get("alarm"), 64) or "alarm",
            "active": data["active"],
            "suspects": [
                {"agent_id": _text(x.get("agent_id"), 64), "outstanding": _number(x.get("outstanding"))}
                for x in (suspects[:5] if isinstance(suspects, list) else [])
                if isinstance(x, Mapping)
            ],
        }
        for key in ("dropped", "dropped_total", "since", "ts"):
            if (n := _number(data.get(key))) is not None:
                alarm[key] = n
        orch["alarm"] = alarm
        return [("orchestrator", orch)]

    def set_broker(self, connected: bool, url: str, now: float | None = None) -> list[Event]:
        """The dashboard's own broker connection went up or down: while down, nothing on the page is live."""
        if connected == self.broker["connected"] and url == self.broker["url"]:
            return []
        self.broker = {"connected": connected, "since": now if now is not None else time.time(), "url": url}
        return [("broker", dict(self.broker))]

    # -- snapshot -----------------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        return {
            "v": 1,
            "now": time.time(),
            "agents": [a.to_json() for a in sorted(self.agents.values(), key=lambda a: a.agent_id)],
            "tasks": list(self.tasks.values()),
            "sensors": [s.to_json() for s in self.series.values()],
            "split": self.split_json(),
            "counters": dict(self.counters),
            "orchestrators": [self.orchestrators[k] for k in sorted(self.orchestrators)],
            "broker": dict(self.broker),
        }
