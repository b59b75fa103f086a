"""Worker pools: equivalent agents serve one capability through an MQTT 5 shared subscription.

A dead worker's in-flight shared-subscription messages are lost (Mosquitto does not redeliver them, upstream
#2662): the orchestrator re-dispatches to the pool as soon as a member is reported offline.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from collections import Counter

import pytest

from edgecoop.agents import Agent
from edgecoop.agents.config import CapabilitySpec, config_from_dict
from edgecoop.cms.mirror import CmsMirror
from edgecoop.errors import ConfigError
from edgecoop.orchestrator import Orchestrator
from tests.conftest import agent_config

WORKER = textwrap.dedent(
    """
    import asyncio, sys
    from edgecoop.agents import Agent
    from edgecoop.agents.config import config_from_dict
    from edgecoop.connection import BrokerSettings
    port, prefix, agent_id, kind, pool = sys.argv[1:6]
    cfg = config_from_dict({"agent": {"id": agent_id, "description": "pool worker"},
                            "capabilities": [{"kind": kind, "max_concurrency": 1, "pool": pool}]},
                           broker=BrokerSettings(port=int(port), keepalive=2), prefix=prefix)
    async def main():
        async with Agent(cfg) as a:
            print("up", flush=True)
            await a.serve_forever()
    asyncio.run(main())
    """
)


def _spawn(settings, topics, agent_id: str, kind: str, pool: str) -> subprocess.Popen[str]:
    argv = [sys.executable, "-c", WORKER, str(settings.port), topics.prefix, agent_id, kind, pool]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)


async def _up(proc: subprocess.Popen[str]) -> None:
    assert proc.stdout is not None
    assert (await asyncio.to_thread(proc.stdout.readline)).strip() == "up"


def _reap(procs: list[subprocess.Popen[str]]) -> None:
    for p in procs:
        p.kill()
        p.wait()
        if p.stdout is not None:
            p.stdout.close()


def test_pool_config_is_on_the_card_and_validated(settings, topics):
    cfg = agent_config("w1", settings, topics, capabilities=[{"kind": "echo", "pool": "echoes", "pool_group": "g1"}])
    assert (cfg.capabilities[0].pool, cfg.capabilities[0].pool_group) == ("echoes", "g1")
    card = Agent(cfg).card().to_dict()
    assert card["capabilities"][0]["pool"] == "echoes"
    assert Agent(agent_config("w2", settings, topics)).card().to_dict()["capabilities"][0]["pool"] == ""
    with pytest.raises(ConfigError):
        agent_config("w3", settings, topics, capabilities=[{"kind": "echo", "pool": "a/b"}])
    with pytest.raises(ConfigError, match="one capability per pool"):
        agent_config("w4", settings, topics, capabilities=[
            {"name": "e1", "kind": "echo", "pool": "p"}, {"name": "e2", "kind": "echo", "pool": "p"},
        ])  # fmt: skip


async def test_pool_workers_share_requests_and_answer_on_the_response_topic(make_agent, client):
    caps = [{"kind": "echo", "max_concurrency": 4, "pool": "echoes"}]
    async with make_agent("w1", capabilities=caps), make_agent("w2", capabilities=caps):
        replies = await asyncio.gather(
            *(client.req.pool_request("echoes", "echo", {"i": i}, timeout=10) for i in range(20))
        )
        assert [r.result["echo"]["i"] for r in replies] == list(range(20))
        by = Counter(r.agent_id for r in replies)
        assert set(by) == {"w1", "w2"} and sum(by.values()) == 20  # the broker spread them
        assert (await client.req.request("w1", "echo", {"direct": True}, timeout=5)).agent_id == "w1"
    assert client.req.in_flight == 0


async def test_a_dead_pool_worker_takes_no_more_requests(settings, topics, client):
    """Pool workers end their session with their connection: a killed worker's share goes to the others."""
    procs = [_spawn(settings, topics, f"w{i}", "echo", "echoes") for i in (1, 2)]
    try:
        for p in procs:
            await _up(p)
        async with CmsMirror(settings, topics=topics) as cms:
            await cms.wait_for(lambda s: s.count(online=True) == 2)
            os.kill(procs[0].pid, signal.SIGKILL)
            await cms.wait_for(lambda s: s.status("w1") is not None and not s.status("w1")[0], timeout=20)
        replies = await asyncio.gather(
            *(client.req.pool_request("echoes", "echo", {"i": i}, timeout=5) for i in range(10))
        )
        assert [r.agent_id for r in replies] == ["w2"] * 10
    finally:
        _reap(procs)


@pytest.mark.vision
async def test_worker_killed_mid_request_the_pool_still_gets_the_task_done(settings, topics):
    """Two vision workers in a pool; the one that took the request is killed; the task is done by the other."""
    from edgecoop.agents.scenes import synthetic_scene

    cam = config_from_dict(
        {"agent": {"id": "cam-slow", "location": {"name": "Test Street"}}}, broker=settings, prefix=topics.prefix,
        capabilities=(CapabilitySpec("camera", "camera", max_concurrency=4,
                                     options={"seed": 7, "scene": {"n_vehicles": 5, "frames": 600, "width": 640, "height": 480}}),),
    )  # fmt: skip
    procs = [_spawn(settings, topics, f"vision-{i}", "vision", "vision") for i in (1, 2)]
    try:
        for p in procs:
            await _up(p)
        async with Agent(cam), Orchestrator(settings, topics=topics) as orch, CmsMirror(settings, topics=topics) as cms:
            await cms.wait_for(lambda s: s.count(online=True) == 3)
            task = asyncio.create_task(orch.submit("How many vehicles passed the Test Street camera?"))

            def busy(store) -> str | None:
                return next((a for a in ("vision-1", "vision-2") if (c := store.card(a)) and c.load.busy), None)

            await cms.wait_for(lambda s: busy(s) is not None, timeout=30)
            victim = await cms.query(busy)
            os.kill(procs[int(victim[-1]) - 1].pid, signal.SIGKILL)
            r = await asyncio.wait_for(task, 60)
        survivor = "vision-2" if victim == "vision-1" else "vision-1"
        vision = [(t["agent"], t["ok"], t.get("error", "")) for t in r["trace"] if t["step"] == "vision"]
        assert vision[0][:2] == ("pool:vision", False) and "went offline" in vision[0][2], vision
        assert vision[-1][:2] == (survivor, True), vision
        truth = synthetic_scene(7, n_vehicles=5, frames=600, width=640, height=480).truth.vehicles
        assert r["state"] == "done" and abs(r["value"] - truth) <= 1
    finally:
        _reap(procs)
