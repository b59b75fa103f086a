"""Agent, orchestrator and CMS faults over real Mosquitto: frozen and killed processes, fast reconnect cycles,
an orchestrator killed mid-dispatch, a CMS mirror that was down while cards changed."""

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest

from edgecoop.agents import Agent
from edgecoop.agents.config import CapabilitySpec, config_from_dict
from edgecoop.cms.mirror import CmsMirror
from edgecoop.orchestrator import Orchestrator
from edgecoop.taskclient import TaskClient


async def wait_until(predicate, timeout: float = 20.0, what: str = "condition") -> None:
    """Poll a cheap in-process predicate (the predicate is the correctness condition, not the sleep)."""
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110 - counters in other components have no event to wait on
            await asyncio.sleep(0.02)


def _camera(settings, topics, frames=600, size=(640, 480)):
    return config_from_dict(
        {"agent": {"id": "cam-slow", "location": {"name": "Test Street"}}}, broker=settings, prefix=topics.prefix,
        capabilities=(CapabilitySpec("camera", "camera", max_concurrency=8, options={
            "seed": 7, "scene": {"n_vehicles": 5, "frames": frames, "width": size[0], "height": size[1]}}),),
    )  # fmt: skip


VISION_AGENT = textwrap.dedent(
    """
    import asyncio, sys
    from edgecoop.agents import Agent
    from edgecoop.agents.config import config_from_dict
    from edgecoop.connection import BrokerSettings
    cfg = config_from_dict({"agent": {"id": sys.argv[3], "description": "video analytics"},
                            "capabilities": [{"kind": "vision", "max_concurrency": 1}]},
                           broker=BrokerSettings(port=int(sys.argv[1]), keepalive=5), prefix=sys.argv[2])
    async def main():
        async with Agent(cfg) as a:
            print("up", flush=True)
            await a.serve_forever()
    asyncio.run(main())
    """
)


@pytest.mark.vision
@pytest.mark.timeout(90)
async def test_frozen_agent_is_detected_and_its_late_result_is_never_applied(settings, topics):
    proc = subprocess.Popen([sys.executable, "-c", VISION_AGENT, str(settings.port), topics.prefix, "vision-a"],
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    survivor = config_from_dict({"agent": {"id": "vision-b"}, "capabilities": [{"kind": "vision"}]}, broker=settings,
                                prefix=topics.prefix)  # fmt: skip
    agents = [Agent(_camera(settings, topics)), Agent(survivor)]
    try:
        assert (await asyncio.to_thread(proc.stdout.readline)).strip() == "up"
        for a in agents:
            await a.__aenter__()
        async with Orchestrator(settings, topics=topics) as orch, CmsMirror(settings, topics=topics) as watch:
            await watch.wait_for(lambda s: s.count(online=True) == 3)
            task = asyncio.create_task(orch.submit("How many vehicles passed the Test Street camera?"))
            await watch.wait_for(lambda s: s.card("vision-a") is not None and s.card("vision-a").load.busy, timeout=20)
            os.kill(proc.pid, signal.SIGSTOP)  # frozen: the socket stays open, only keepalive can tell
            frozen_at = time.monotonic()
            await watch.wait_for(lambda s: s.status("vision-a") is not None and not s.status("vision-a")[0], timeout=20)
            detected_s = time.monotonic() - frozen_at
            r = await asyncio.wait_for(task, 60)
            os.kill(proc.pid, signal.SIGCONT)  # it resumes, finishes and answers - far too late
            await watch.wait_for(lambda s: s.status("vision-a") is not None and s.status("vision-a")[0], timeout=30)
            await wait_until(lambda: orch.requester.late_replies >= 1, timeout=30)
            stored = await orch.task(r["task_id"])
        assert detected_s < 15, detected_s  # keepalive 5 s: the broker's will within 1.5 x keepalive + slack
        vision = [(t["agent"], t["ok"]) for t in r["trace"] if t["step"] == "vision"]
        assert vision == [("vision-a", False), ("vision-b", True)]
        assert r["state"] == "done" and stored["result"]["answer"] == r["answer"]  # one terminal state, unchanged
    finally:
        with contextlib_suppress():
            os.kill(proc.pid, signal.SIGCONT)
        proc.kill()
        proc.wait()
        proc.stdout.close()
        for a in agents:
            await a.__aexit__(None, None, None)


def contextlib_suppress():
    import contextlib

    return contextlib.suppress(ProcessLookupError)


async def test_fifty_fast_reconnects_give_no_false_offline(make_agent, settings, topics):
    """Each drop fires a will; a will from an older connection must never mark the current one offline."""
    async with CmsMirror(settings, topics=topics) as watch, make_agent("flappy") as agent:
        for _ in range(50):
            before = agent.conn.counters.connects
            agent.conn.session.paho.socket().shutdown(2)  # cut the TCP connection under it
            await wait_until(lambda b=before: agent.conn.counters.connects > b and agent.conn.connected.is_set())
        await agent.conn.wait_connected(10)
        await watch.sync()
        # the broker's wills (offline, old epochs) all arrived by now or are fenced: the current epoch is online
        await watch.wait_for(lambda s: s.status("flappy") == (True, agent.epoch), timeout=15)
        await watch.sync()
        assert await watch.query(lambda s: s.status("flappy")) == (True, agent.epoch)
        assert agent.conn.counters.connects == 51


ORCHESTRATOR_CMD = [sys.executable, "-m", "edgecoop.cli", "orchestrator"]


@pytest.mark.vision
@pytest.mark.timeout(120)
async def test_orchestrator_killed_mid_dispatch_recovers_every_task(settings, topics, tmp_path):
    db = tmp_path / "tasks.db"
    vision = Agent(config_from_dict({"agent": {"id": "vision-1"}, "capabilities": [{"kind": "vision"}]},
                                    broker=settings, prefix=topics.prefix, state_dir=tmp_path / "vision"))  # fmt: skip
    agents = [Agent(_camera(settings, topics, frames=240, size=(320, 240))), vision]
    argv = [*ORCHESTRATOR_CMD, "--broker", settings.url, "--prefix", topics.prefix, "--db", str(db)]

    def start() -> subprocess.Popen:
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().startswith("orchestrator")
        return p

    for a in agents:
        await a.__aenter__()
    orch = await asyncio.to_thread(start)
    try:
        async with TaskClient(settings, topics=topics, resend_interval=1.0) as client:
            tasks = [asyncio.create_task(client.submit("How many vehicles passed the Test Street camera?",
                                                       task_id=f"t{i}", timeout=100)) for i in range(4)]  # fmt: skip
            await wait_until(lambda: vision.statistics()["inflight"] > 0, timeout=30)
            orch.kill()  # SIGKILL mid-dispatch: tasks in SQLite as received/running
            orch.wait()
            orch.stdout.close()
            served_while_down = vision.counters["served"]
            await wait_until(lambda: vision.statistics()["inflight"] == 0 and vision.statistics()["queued"] == 0)
            orch = await asyncio.to_thread(start)  # same database: it recovers the unfinished tasks
            results = await asyncio.gather(*tasks)
        assert [r["state"] for r in results] == ["done"] * 4
        assert {r["value"] for r in results} == {results[0]["value"]}
        # every vision request ran once: what finished while the orchestrator was down is replayed from the
        # agent's outbox (same request id), not recomputed
        assert vision.counters["served"] == 4, (vision.counters, served_while_down)
        assert vision.counters["replayed"] + vision.counters["duplicate_inflight"] >= 1
    finally:
        orch.send_signal(signal.SIGTERM)
        orch.wait(10)
        if orch.stdout and not orch.stdout.closed:
            orch.stdout.close()
        for a in agents:
            await a.__aexit__(None, None, None)
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        states = dict(conn.execute("SELECT state, count(*) FROM tasks GROUP BY state").fetchall())
    assert states == {"done": 4}


async def test_mirror_that_was_down_equals_the_retained_state_after_restart(make_agent, settings, topics, tmp_path):
    db = tmp_path / "cms.db"
    a1, a2, a3 = make_agent("keep"), make_agent("goes-away"), make_agent("goes-offline")
    for a in (a1, a2, a3):
        await a.__aenter__()
    async with CmsMirror(settings, topics=topics, db_path=db) as mirror:
        await mirror.wait_for(lambda s: s.count(online=True) == 3)
    # while the mirror is down: one deregisters, one goes offline, two new ones appear
    await a2.deregister()
    await a2.__aexit__(None, None, None)
    await a3.__aexit__(None, None, None)
    newcomers = [make_agent("new-1"), make_agent("new-2")]
    for a in newcomers:
        await a.__aenter__()
    try:
        async with CmsMirror(settings, topics=topics, db_path=db) as back, CmsMirror(settings, topics=topics) as fresh:
            await back.sync()
            await fresh.sync()
            strip = lambda v: {k: {f: x for f, x in c.items() if f not in ("load", "ts")} for k, c in v.items()}  # noqa: E731
            assert strip(await back.snapshot()) == strip(await fresh.snapshot())
            assert set(await back.snapshot()) == {"keep", "goes-offline", "new-1", "new-2"}
            assert back.counters["reconciled"] >= 1
            assert await back.query(lambda s: s.integrity_ok())
    finally:
        for a in (a1, *newcomers):
            await a.__aexit__(None, None, None)
