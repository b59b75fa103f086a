"""Nothing is lost when the broker restarts: every task id reaches exactly one terminal state, every durable
request is executed once. Real Mosquitto processes, stopped with SIGTERM and SIGKILL by PID."""

import asyncio
import dataclasses
import random
import signal
from collections import Counter

import pytest

from edgecoop.agents import Agent
from edgecoop.broker import MosquittoProcess
from edgecoop.connection import BrokerSettings
from edgecoop.orchestrator import Orchestrator
from edgecoop.scenarios.loader import load_scenario
from edgecoop.taskclient import TaskClient
from edgecoop.topics import Topics

STATIONS = {"air-park": "City Park", "air-station": "Central Station", "air-oldtown": "Old Town Square",
            "air-harbour": "Harbour Gate"}  # fmt: skip


async def _stream(broker: MosquittoProcess, tmp_path, *, tasks: int, restarts: list[int]) -> None:
    settings = BrokerSettings(port=broker.port, keepalive=5)
    topics = Topics("rel/v1")
    configs = load_scenario("urban", settings, prefix=topics.prefix, include=set(STATIONS))
    # durable outboxes on disk
    agents = [Agent(dataclasses.replace(c, state_dir=tmp_path / c.agent_id)) for c in configs]
    for a in agents:
        await a.__aenter__()
    questions = [
        (f"What is the {q} level at {place}?", aid) for aid, place in STATIONS.items() for q in ("PM2.5", "NO2")
    ]
    results: dict[str, dict] = {}
    progress = asyncio.Condition()
    signals = [signal.SIGTERM if i % 2 == 0 else signal.SIGKILL for i in range(len(restarts))]
    try:
        async with (
            Orchestrator(settings, topics=topics, db_path=tmp_path / "tasks.db", max_concurrent=8) as orch,
            TaskClient(settings, topics=topics, resend_interval=2.0) as client,
        ):
            sem = asyncio.Semaphore(20)

            async def one(i: int) -> None:
                q, _ = questions[i % len(questions)]
                async with sem:
                    r = await client.submit(q, task_id=f"task-{i:03d}", timeout=120)
                async with progress:
                    results[f"task-{i:03d}"] = r
                    progress.notify_all()

            async def chaos() -> None:
                for point, sig in zip(restarts, signals, strict=True):
                    async with progress:
                        await progress.wait_for(lambda p=point: len(results) >= p)
                    await asyncio.to_thread(broker.restart, sig)

            chaos_task = asyncio.create_task(chaos())
            await asyncio.gather(*(one(i) for i in range(tasks)))
            await chaos_task
            counts = await orch._worker.run(orch.store.counts)
            assert await orch._worker.run(orch.store.integrity_ok)
        failed = [(t, r.get("answer"), r["trace"]) for t, r in results.items() if r["state"] != "done"]
        assert counts == {"done": tasks}, (counts, failed[:5])
        assert sorted(results) == [f"task-{i:03d}" for i in range(tasks)]
        wrong = []
        for tid, r in results.items():
            _, station = questions[int(tid[5:]) % len(questions)]
            steps = [t for t in r["trace"] if t["ok"]]
            if r["state"] != "done" or [t["agent"] for t in steps] != [station]:
                wrong.append((tid, r["state"], r.get("answer"), [t["agent"] for t in r["trace"]]))
        assert not wrong, wrong
        # each durable request (one per task here) executed at most once, however often it was sent
        served = Counter({a.agent_id: a.counters["served"] for a in agents})
        asked = Counter(t["agent"] for r in results.values() for t in r["trace"])
        for aid in STATIONS:
            assert served[aid] <= asked[aid], (aid, served[aid], asked[aid])
        assert sum(served.values()) == tasks
        # the broker really went away: every agent reconnected (back-to-back restarts can share one reconnect)
        connects = [a.conn.counters.connects for a in agents]
        assert min(connects) > len(restarts) // 2, connects
    finally:
        for a in agents:
            await a.__aexit__(None, None, None)


@pytest.mark.timeout(240)
async def test_broker_sigterm_and_sigkill_during_a_200_task_stream_lose_nothing(tmp_path):
    rng = random.Random(2026)
    restarts = sorted(rng.sample(range(5, 195), 10))  # 5 x SIGTERM and 5 x SIGKILL at random points
    with MosquittoProcess(workdir=tmp_path / "broker", persistence=True) as broker:
        await _stream(broker, tmp_path, tasks=200, restarts=restarts)


@pytest.mark.timeout(180)
async def test_restarts_without_broker_persistence_lose_nothing(tmp_path):
    with MosquittoProcess(workdir=tmp_path / "broker", persistence=False) as broker:
        await _stream(broker, tmp_path, tasks=60, restarts=[10, 30, 45])
