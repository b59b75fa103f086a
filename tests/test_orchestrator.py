"""The Task Orchestrator end to end over a real broker, with real camera, vision (OpenCV) and rulebook agents."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from edgecoop.agents import Agent
from edgecoop.agents.config import CapabilitySpec, config_from_dict
from edgecoop.agents.scenes import synthetic_scene
from edgecoop.cms.mirror import CmsMirror
from edgecoop.orchestrator import Orchestrator
from edgecoop.scenarios.loader import load_scenario

pytestmark = pytest.mark.vision
TRAFFIC = {"cam-station", "cam-harbour", "cam-oldtown", "vision-jetson", "vision-pi"}


def _traffic_agents(settings, topics, ids=TRAFFIC):
    configs = load_scenario("urban", settings, prefix=topics.prefix, include=set(ids))
    agents = [Agent(c) for c in configs]
    # the city rulebook without its (separately tested) document index
    kb = load_scenario("urban", settings, prefix=topics.prefix, include={"kb-city"})[0]
    import dataclasses

    agents.append(
        Agent(dataclasses.replace(kb, capabilities=tuple(c for c in kb.capabilities if c.kind == "rulebook")))
    )
    return agents


async def _start(agents):
    for a in agents:
        await a.__aenter__()


async def _stop(agents):
    for a in agents:
        await a.__aexit__(None, None, None)


async def test_sequential_pipeline_camera_vision_rule(settings, topics):
    agents = _traffic_agents(settings, topics)
    await _start(agents)
    try:
        async with Orchestrator(settings, topics=topics) as orch:
            r = await orch.submit("Is there a traffic jam near Central Station? Should we reroute buses?")
            truth = synthetic_scene(101, n_vehicles=11, n_pedestrians=5, frames=120).truth.vehicles
            assert r["state"] == "done" and r["tier"] == "edge"
            assert r["classification"]["operation"] == "check"
            assert r["plan"]["shape"] == "sequential"
            steps = [t["step"] for t in r["trace"] if t["ok"]]
            assert steps[0] == "camera" and set(steps[1:]) == {"vision", "rule"}
            assert [t["agent"] for t in r["trace"] if t["step"] == "camera"] == ["cam-station"]  # semantic match
            assert abs(r["value"] - truth) <= 1
            assert r["decision"] == ("reroute" if truth >= 8 else "keep")
            stored = await orch.task(r["task_id"])
            assert stored["state"] == "done" and stored["result"]["answer"] == r["answer"]
    finally:
        await _stop(agents)


async def test_round_robin_takes_turns_among_equivalent_agents_but_never_another_place(settings, topics):
    """Strategies differ in whom they ask among agents that can serve (vision agents in turn), but no strategy
    answers with another place's data: the camera is always the one at the named place."""
    agents = _traffic_agents(settings, topics)
    await _start(agents)
    try:
        async with Orchestrator(settings, topics=topics, strategy="round-robin") as orch:
            cams, vision = set(), set()
            for _ in range(4):
                r = await orch.submit("How many vehicles passed the Harbour Gate camera?")
                cams |= {t["agent"] for t in r["trace"] if t["step"] == "camera" and t["ok"]}
                vision |= {t["agent"] for t in r["trace"] if t["step"] == "vision" and t["ok"]}
            assert cams == {"cam-harbour"}
            assert vision == {"vision-jetson", "vision-pi"}
    finally:
        await _stop(agents)


AGENT_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    from edgecoop.agents import Agent
    from edgecoop.agents.config import config_from_dict
    from edgecoop.connection import BrokerSettings
    cfg = config_from_dict({"agent": {"id": "vision-a", "description": "video analytics"},
                            "capabilities": [{"kind": "vision", "max_concurrency": 1}]},
                           broker=BrokerSettings(port=int(sys.argv[1]), keepalive=2), prefix=sys.argv[2])
    async def main():
        async with Agent(cfg) as a:
            print("up", flush=True)
            await a.serve_forever()
    asyncio.run(main())
    """
)


async def test_agent_death_mid_task_is_redispatched(settings, topics):
    """vision-a is killed while it works on the task; the orchestrator re-dispatches to vision-b at once."""
    slow_cam = config_from_dict(
        {"agent": {"id": "cam-slow", "location": {"name": "Test Street"}}}, broker=settings, prefix=topics.prefix,
        capabilities=(CapabilitySpec("camera", "camera", max_concurrency=4,
                                     options={"seed": 7, "scene": {"n_vehicles": 5, "frames": 600, "width": 640, "height": 480}}),),
    )  # fmt: skip
    survivor = config_from_dict(
        {"agent": {"id": "vision-b"}, "capabilities": [{"kind": "vision"}]}, broker=settings, prefix=topics.prefix
    )
    proc = subprocess.Popen([sys.executable, "-c", AGENT_SCRIPT, str(settings.port), topics.prefix],
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    agents = [Agent(slow_cam), Agent(survivor)]
    try:
        assert (await asyncio.to_thread(proc.stdout.readline)).strip() == "up"
        await _start(agents)
        async with Orchestrator(settings, topics=topics) as orch, CmsMirror(settings, topics=topics) as watch:
            await watch.wait_for(lambda s: s.count(online=True) == 3)
            task = asyncio.create_task(orch.submit("How many vehicles passed the Test Street camera?"))
            # vision-a sorts first among equals: wait until it is busy with our task, then kill it
            await watch.wait_for(lambda s: s.card("vision-a") is not None and s.card("vision-a").load.busy, timeout=20)
            os.kill(proc.pid, signal.SIGKILL)
            r = await asyncio.wait_for(task, 60)
        vision = [t for t in r["trace"] if t["step"] == "vision"]
        assert [(t["agent"], t["ok"]) for t in vision] == [("vision-a", False), ("vision-b", True)]
        assert "offline" in vision[0]["error"]
        assert (
            r["state"] == "done"
            and abs(r["value"] - synthetic_scene(7, n_vehicles=5, frames=600, width=640, height=480).truth.vehicles)
            <= 1
        )
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        await _stop(agents)


async def test_no_agent_means_a_failed_task_with_a_reason(settings, topics):
    async with Orchestrator(settings, topics=topics, strategy="edge-only") as orch:
        r = await orch.submit("How many vehicles passed the Central Station camera?")
    # no camera was ever seen: refused with the reason at once (nothing to wait for, nothing to guess)
    assert r["tier"] == "none" and r["decision"] == "refused" and r["cloud_calls"] == 0, r
    assert "no agent" in r["answer"] or "no camera" in r["answer"], r["answer"]


async def test_bad_submissions_get_error_replies(settings, topics, broker):
    async with Orchestrator(settings, topics=topics) as orch:
        for body in [
            b"{}",
            b'{"question": ""}',
            b'{"question": "x", "strategy": "fastest"}',
            b"\xc1",
            b'{"question": 5}',
        ]:
            out = await _mosquitto_exchange(broker, topics, body)
            reply = json.loads(out)
            assert reply["state"] == "rejected" and reply["error"]["code"] in ("bad_schema", "bad_payload")
        assert orch.counters["bad_submission"] >= 5  # one per publish; a publish may be repeated


async def _mosquitto_exchange(broker, topics, body: bytes, reply_topic="answers/test") -> bytes:
    """Exactly what the README shows: mosquitto_sub for the answer, mosquitto_pub with a response topic."""
    sub = await asyncio.create_subprocess_exec(
        "mosquitto_sub", "-V", "5", "-p", str(broker.port), "-t", reply_topic, "-C", "1", "-W", "60",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    message = (
        body.decode(errors="replace")
        if body != b"\xc1"
        else "\udcc1".encode(errors="surrogateescape").decode("latin-1")
    )
    assert sub.stdout is not None
    # mosquitto_sub has no readiness signal: publish, and publish again while no answer came (a rejected submission
    # is answered every time; a task without a task_id is simply run again)
    for _ in range(10):
        pub = await asyncio.create_subprocess_exec(
            "mosquitto_pub", "-V", "5", "-p", str(broker.port), "-t", topics.task_submit(),
            "-D", "publish", "response-topic", reply_topic, "-D", "publish", "content-type", "application/json",
            "-m", message,
        )  # fmt: skip
        await pub.wait()
        try:
            line = await asyncio.wait_for(sub.stdout.readline(), 5)
        except TimeoutError:
            continue
        await sub.wait()
        return line
    sub.kill()
    await sub.wait()
    return b""


async def test_mosquitto_pub_task_is_answered(settings, topics, broker):
    agents = _traffic_agents(settings, topics)
    await _start(agents)
    try:
        async with Orchestrator(settings, topics=topics):
            body = json.dumps({"question": "How many vehicles passed the Old Town Square camera?"}).encode()
            reply = json.loads(await _mosquitto_exchange(broker, topics, body))
        assert reply["state"] == "done" and reply["tier"] == "edge"
        assert "vehicles passed the camera at Old Town Square" in reply["answer"]
    finally:
        await _stop(agents)


async def test_duplicate_task_id_runs_once(settings, topics):
    agents = _traffic_agents(settings, topics, ids={"cam-station", "vision-pi"})
    await _start(agents)
    try:
        async with Orchestrator(settings, topics=topics) as orch:
            a = await orch.submit("How many vehicles passed the Central Station camera?", task_id="t-1")
            await orch.accept(
                {"question": "How many vehicles passed the Central Station camera?", "task_id": "t-1"}, None
            )
            assert orch.counters["duplicate"] == 1 and orch.counters["accepted"] == 1
            assert (await orch.task("t-1"))["result"]["answer"] == a["answer"]
    finally:
        await _stop(agents)
