"""Harness for the network-fault and overload tests: the urban air stations, one of them behind a NetProxy.

Everything is real: a private Mosquitto on a free loopback port (stopped by PID), the agents, the orchestrator
with its CMS mirror and SQLite task store, a TaskClient submitting over MQTT, and a raw subscriber that logs
every status message the broker delivers (the ground truth for "was the agent ever declared dead").
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
import statistics
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgecoop.agents import Agent
from edgecoop.broker import MosquittoProcess
from edgecoop.broker.configs import development_config
from edgecoop.broker.manager import free_port
from edgecoop.connection import BrokerSettings, Connection, Message
from edgecoop.orchestrator import Orchestrator
from edgecoop.scenarios.loader import load_scenario
from edgecoop.taskclient import TaskClient
from edgecoop.topics import Topics
from edgecoop.wire import decode
from tests.netproxy import NetProxy

STATIONS = {"air-park": "City Park", "air-station": "Central Station", "air-oldtown": "Old Town Square"}
PROXIED = "air-park"
TERMINAL = frozenset({"done", "failed", "timed_out"})


def broker_config(port: int, workdir: Path, *, max_queued: int | None = None) -> str:
    """The development config (sys_interval 1), optionally with a small per-client queue limit."""
    text = development_config(port, data_dir=workdir, log_file=workdir / "mosquitto.log")
    if max_queued is not None:
        text, n = re.subn(r"^max_queued_messages \d+$", f"max_queued_messages {max_queued}", text, flags=re.M)
        assert n == 1, text
    return text


def private_broker(workdir: Path, *, max_queued: int | None = None) -> MosquittoProcess:
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    return MosquittoProcess(port, workdir=workdir, config_text=broker_config(port, workdir, max_queued=max_queued))


@dataclass(frozen=True, slots=True)
class StatusEvent:
    t: float  # time.monotonic() on arrival
    agent: str
    online: bool
    epoch: int


class StatusLog:
    """Every status message for every agent, in arrival order, with event waits."""

    def __init__(self) -> None:
        self.events: list[StatusEvent] = []
        self.changed = asyncio.Condition()

    async def on_message(self, message: Message) -> None:
        payload = message.payload if isinstance(message.payload, bytes) else b""
        if not payload:
            return
        data, _ = decode(payload)
        ev = StatusEvent(time.monotonic(), str(data["agent_id"]), data["state"] == "online", int(data["epoch"]))
        async with self.changed:
            self.events.append(ev)
            self.changed.notify_all()

    def offline(self, agent: str, since: float = 0.0) -> list[StatusEvent]:
        return [e for e in self.events if e.agent == agent and not e.online and e.t >= since]

    def online(self, agent: str, since: float = 0.0) -> list[StatusEvent]:
        return [e for e in self.events if e.agent == agent and e.online and e.t >= since]

    async def wait_for(self, predicate: Callable[[], Any], timeout: float) -> None:
        async with asyncio.timeout(timeout), self.changed:
            await self.changed.wait_for(predicate)


@dataclass
class Outcome:
    task_id: str
    question: str
    submitted: float
    result: dict[str, Any]
    seconds: float

    @property
    def state(self) -> str:
        return str(self.result["state"])

    def agents(self) -> list[str]:
        return [t["agent"] for t in self.result.get("trace", [])]


@dataclass
class Urban:
    broker: MosquittoProcess
    proxy: NetProxy
    settings: BrokerSettings
    topics: Topics
    agents: dict[str, Agent]
    orch: Orchestrator
    client: TaskClient
    statuses: StatusLog
    outcomes: dict[str, Outcome] = field(default_factory=dict)

    async def ask(self, place: str, task_id: str, *, quantity: str = "PM2.5", timeout: float = 120.0) -> Outcome:
        question = f"What is the {quantity} level at {place}?"
        t0 = time.monotonic()
        r = await self.client.submit(question, task_id=task_id, timeout=timeout)
        out = Outcome(task_id, question, t0, r, time.monotonic() - t0)
        self.outcomes[task_id] = out
        return out

    async def store_counts(self) -> dict[str, int]:
        assert self.orch.store is not None
        counts: dict[str, int] = await self.orch._worker.run(self.orch.store.counts)
        return counts

    def served(self, agent: str) -> int:
        return int(self.agents[agent].counters["served"])

    def asked(self, agent: str) -> int:
        """Tasks that sent at least one request to ``agent`` (one durable request id per task here)."""
        return sum(1 for o in self.outcomes.values() if agent in o.agents())

    async def cms_online(self, agent: str) -> bool | None:
        st = await self.orch.mirror.query(lambda store: store.status(agent))
        return None if st is None else bool(st[0])


@contextlib.asynccontextmanager
async def urban(
    tmp_path: Path,
    broker: MosquittoProcess,
    *,
    keepalive: int = 5,
    orchestrator: Mapping[str, Any] | None = None,
) -> AsyncIterator[Urban]:
    """The three air stations (``PROXIED`` behind a NetProxy), an orchestrator and a TaskClient."""
    settings = BrokerSettings(port=broker.port, keepalive=keepalive)
    topics = Topics("faults/v1")
    statuses = StatusLog()
    watcher = Connection(
        settings,
        "status-watcher",
        subscriptions=[(topics.all_status(), 1)],
        handler=statuses.on_message,
        clean_start=True,
    )
    async with NetProxy(broker.port) as proxy, watcher:
        via_proxy = dataclasses.replace(settings, port=proxy.port)
        configs = load_scenario("urban", settings, prefix=topics.prefix, include=set(STATIONS))
        agents: dict[str, Agent] = {}
        async with contextlib.AsyncExitStack() as stack:
            for config in configs:
                broker_settings = via_proxy if config.agent_id == PROXIED else settings
                c = dataclasses.replace(config, state_dir=tmp_path / config.agent_id, broker=broker_settings)
                agents[c.agent_id] = await stack.enter_async_context(Agent(c))
            orch = await stack.enter_async_context(
                Orchestrator(settings, topics=topics, db_path=tmp_path / "tasks.db", **dict(orchestrator or {}))
            )
            client = await stack.enter_async_context(TaskClient(settings, topics=topics, resend_interval=2.0))
            await statuses.wait_for(lambda: all(statuses.online(a) for a in STATIONS), timeout=10)
            yield Urban(broker, proxy, settings, topics, agents, orch, client, statuses)


def pct(values: list[float], q: float) -> float:
    """The q-quantile (0..1) of ``values`` (nearest rank)."""
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def summary(values: list[float]) -> str:
    if not values:
        return "n=0"
    return (
        f"n={len(values)} p50={statistics.median(values) * 1000:.0f}ms p95={pct(values, 0.95) * 1000:.0f}ms "
        f"max={max(values) * 1000:.0f}ms"
    )
