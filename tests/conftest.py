"""Test fixtures: one real Mosquitto per test session on a free loopback port, unique topic prefixes per test."""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from edgecoop.agents import Agent
from edgecoop.agents.config import config_from_dict
from edgecoop.broker import MosquittoProcess
from edgecoop.connection import BrokerSettings, Connection
from edgecoop.rpc import Requester
from edgecoop.topics import Topics


@pytest.fixture(scope="session")
def broker() -> Iterator[MosquittoProcess]:
    """The session's broker: never the machine's own Mosquitto on 1883."""
    with MosquittoProcess() as b:
        yield b


@pytest.fixture
def private_broker(tmp_path) -> Iterator[MosquittoProcess]:
    """A broker of this test alone, for tests that stop or kill it."""
    b = MosquittoProcess(workdir=tmp_path / "broker", persistence=True)
    with b:
        yield b


@pytest.fixture
def settings(broker: MosquittoProcess) -> BrokerSettings:
    return BrokerSettings(port=broker.port, keepalive=5)


@pytest.fixture
def topics(request: pytest.FixtureRequest) -> Topics:
    name = "".join(c for c in request.node.name if c.isalnum())[:30]
    return Topics(f"t{uuid.uuid4().hex[:8]}{name}/v1")


def agent_config(agent_id: str, settings: BrokerSettings, topics: Topics, **agent: Any):
    caps = agent.pop("capabilities", [{"kind": "echo", "max_concurrency": 8}])
    overrides = {k: agent.pop(k) for k in ("state_dir", "load_interval_s", "max_queue") if k in agent}
    data = {"agent": {"id": agent_id, **agent}, "capabilities": caps}
    return config_from_dict(data, broker=settings, prefix=topics.prefix, **overrides)


@pytest.fixture
def make_agent(settings: BrokerSettings, topics: Topics):
    def factory(agent_id: str, **agent: Any) -> Agent:
        return Agent(agent_config(agent_id, settings, topics, **agent))

    return factory


@dataclass
class Client:
    conn: Connection
    req: Requester


@pytest.fixture
async def client(settings: BrokerSettings, topics: Topics) -> AsyncIterator[Client]:
    cid = f"tc-{uuid.uuid4().hex[:8]}"
    conn = Connection(settings, cid, subscriptions=[Requester.subscription(topics, cid)], clean_start=True)
    req = Requester(conn, topics)
    conn._handler = req.handle
    async with conn:
        yield Client(conn, req)


@pytest.fixture(autouse=True)
def fail_on_error_logs(request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Handler exceptions that production only logs make a test fail (unless it provokes them on purpose)."""
    caplog.set_level(logging.WARNING, logger="edgecoop")
    yield
    if request.node.get_closest_marker("allow_error_logs"):
        return
    errors = [r for r in caplog.get_records("call") if r.levelno >= logging.ERROR and r.name.startswith("edgecoop")]
    assert not errors, "errors were logged: " + "; ".join(r.getMessage() for r in errors)


def pytest_report_header(config: pytest.Config) -> str:
    return f"edgecoop tests: private Mosquitto per session; CPU count {os.cpu_count()}"
