"""A pool of orchestrators: one shared submit topic, one run per task id, answers from the broker's task log, and
failover without loss when a member is SIGKILLed. Real Mosquitto, real agents, real orchestrator processes."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from typing import Any

import pytest

from edgecoop.agents import Agent
from edgecoop.connection import BrokerSettings, Connection, Message
from edgecoop.orchestrator import Orchestrator
from edgecoop.orchestrator.pool import Record, TaskLog
from edgecoop.scenarios.loader import load_scenario
from edgecoop.taskclient import TaskClient
from edgecoop.topics import Topics
from edgecoop.wire import decode

STATIONS = {"air-park": "City Park", "air-station": "Central Station", "air-oldtown": "Old Town Square",
            "air-harbour": "Harbour Gate"}  # fmt: skip
QUESTIONS = [f"What is the {q} level at {place}?" for place in STATIONS.values() for q in ("PM2.5", "NO2")]


def _stations(
    settings: BrokerSettings, topics: Topics, tmp_path, executed: Counter[str], delay_s: float
) -> list[Agent]:
    """The urban scenario's air stations with durable outboxes on disk; every execution of a request is counted
    per task id (and takes ``delay_s``, so that members die while tasks are at the agents)."""
    configs = load_scenario("urban", settings, prefix=topics.prefix, include=set(STATIONS))
    agents = [Agent(dataclasses.replace(c, state_dir=tmp_path / c.agent_id)) for c in configs]
    for agent in agents:
        for handler in agent.handlers.values():
            real = handler.handle

            async def handle(data: Any, call: Any, _real: Any = real) -> Any:
                executed[call.task_id] += 1
                await asyncio.sleep(delay_s)
                return await _real(data, call)

            handler.handle = handle  # type: ignore[method-assign]
    return agents


class Replies:
    """Every reply published to a client's reply topic, by task id (a second subscriber beside the client)."""

    def __init__(self, settings: BrokerSettings, topics: Topics, client_id: str) -> None:
        self.by_task: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.first_at: dict[str, float] = {}
        self.conn = Connection(settings, f"{client_id}-spy", subscriptions=[(topics.reply(client_id), 1)],
                               handler=self._on, clean_start=True)  # fmt: skip

    def _on(self, message: Message) -> None:
        corr = getattr(message.properties, "CorrelationData", b"")
        task_id = corr.decode() if isinstance(corr, bytes) else ""
        self.by_task[task_id].append(decode(message.payload if isinstance(message.payload, bytes) else b"")[0])
        self.first_at.setdefault(task_id, time.monotonic())


async def _retained_log(settings: BrokerSettings, topics: Topics) -> dict[str, Record]:
    """The pool's task log as the broker holds it (a late joiner's view)."""
    seen: dict[str, Record] = {}
    barrier = asyncio.Event()

    def on(message: Message) -> None:
        if str(message.topic) == topics.reply("log-reader"):
            barrier.set()
        elif message.payload:
            rec = Record.from_dict(decode(message.payload if isinstance(message.payload, bytes) else b"")[0])
            seen[rec.task_id] = rec

    subs = [(topics.all_task_logs(), 1), (topics.reply("log-reader"), 1)]
    async with Connection(settings, "log-reader", subscriptions=subs, handler=on, clean_start=True) as conn:
        await conn.publish(topics.reply("log-reader"), b"barrier")  # after every retained message of the subscribe
        async with asyncio.timeout(20):
            await barrier.wait()
    return seen


@pytest.mark.timeout(120)
async def test_a_pool_runs_each_task_once_and_answers_resubmissions_from_any_member(settings, topics, tmp_path):
    executed: Counter[str] = Counter()
    agents = _stations(settings, topics, tmp_path, executed, delay_s=0.0)
    async with contextlib.AsyncExitStack() as stack:
        for a in agents:
            await stack.enter_async_context(a)
        members = [
            await stack.enter_async_context(
                Orchestrator(settings, topics=topics, orchestrator_id=f"orch-{i}", pool="city", db_path=":memory:")
            )
            for i in range(2)
        ]
        replies = Replies(settings, topics, "pool-client")
        await stack.enter_async_context(replies.conn)
        client = await stack.enter_async_context(TaskClient(settings, topics=topics, client_id="pool-client"))
        results = await asyncio.gather(
            *(client.submit(QUESTIONS[i % len(QUESTIONS)], task_id=f"t{i:02d}", timeout=60) for i in range(40))
        )
        assert [r["state"] for r in results] == ["done"] * 40, [r.get("answer") for r in results]
        # the shared subscription spread the tasks; each ran on exactly one member and once at an agent
        ran = Counter(r["orchestrator"] for r in results)
        assert set(ran) == {"orch-0", "orch-1"}, ran
        assert sum(m.counters["done"] for m in members) == 40
        assert executed == Counter({f"t{i:02d}": 1 for i in range(40)})
        # re-submissions (another client, the same ids, many times) reach either member: answered with the
        # recorded result, never run again
        async with TaskClient(settings, topics=topics, client_id="pool-again") as again:
            for _ in range(3):  # a client has one submission per task id in flight
                repeats = await asyncio.gather(
                    *(again.submit(QUESTIONS[0], task_id=f"t{i:02d}", timeout=30) for i in range(10))
                )
                assert repeats == results[:10]
        assert executed == Counter({f"t{i:02d}": 1 for i in range(40)})
        assert sum(m.counters["duplicate"] for m in members) >= 30
        assert {k: len(v) for k, v in replies.by_task.items()} == {f"t{i:02d}": 1 for i in range(40)}
    log = await _retained_log(settings, topics)
    assert {t: (r.state, r.result) for t, r in log.items()} == {r["task_id"]: ("done", r) for r in results}


@pytest.mark.timeout(60)
async def test_simultaneous_claims_of_one_task_have_one_winner_everywhere(settings, topics):
    """Two members claim the same task id at the same moment (a re-send racing the original): every member sees
    the same winner, and the retained record ends up the winner's."""
    logs: list[TaskLog] = []
    conns: list[Connection] = []
    async with contextlib.AsyncExitStack() as stack:
        for i in range(3):
            holder: list[TaskLog] = []
            conn = Connection(settings, f"m{i}", subscriptions=[(topics.all_task_logs(), 1)],
                              handler=lambda m, h=holder: h[0].handle(m), clean_start=True)  # fmt: skip
            tl = TaskLog(topics, f"m{i}", 1000 + i, conn.publish, expiry_s=60)
            holder.append(tl)
            logs.append(tl)
            conns.append(await stack.enter_async_context(conn))
        upkeep = [asyncio.create_task(tl.run()) for tl in logs]
        try:
            for round_ in range(10):
                task_id = f"race-{round_}"
                won = await asyncio.gather(*(tl.claim(task_id, {"question": "q"}, None) for tl in logs))
                assert all(w is not None for w in won)
                owners = {(w.owner, w.gen) for w in won if w is not None}
                assert len(owners) == 1, owners  # one winner, the same for everybody
                assert sum(tl.mine(w) for tl, w in zip(logs, won, strict=True) if w is not None) == 1
            # the losers' claims came later and were published last: the winners re-assert theirs
            await asyncio.sleep(0)
            async with asyncio.timeout(20):
                while True:
                    retained = await _retained_log(settings, topics)
                    if all(retained[f"race-{r}"].owner == logs[0].get(f"race-{r}").owner for r in range(10)):  # type: ignore[union-attr]
                        break
                    await asyncio.sleep(0.5)
            # the winner's result is final for every member; a second result for the task is refused
            first = logs[0].get("race-0")
            assert first is not None
            winner = next(tl for tl in logs if tl.mine(first))
            assert await winner.finish("race-0", {"state": "done", "answer": "42"})
            loser = next(tl for tl in logs if not tl.mine(first))
            assert not await loser.finish("race-0", {"state": "done", "answer": "other"})
        finally:
            for t in upkeep:
                t.cancel()


ORCHESTRATOR_CMD = [sys.executable, "-m", "edgecoop.cli", "orchestrator"]


class Member:
    """One orchestrator of the pool as its own process (``edgecoop orchestrator --pool``), restartable."""

    def __init__(self, member_id: str, settings: BrokerSettings, topics: Topics, tmp_path) -> None:
        config = tmp_path / "orchestrator.toml"
        config.write_text("[admission]\nclient_rate = 0\n")  # one test client sends everything: no rate limit
        self.id = member_id
        self.argv = [*ORCHESTRATOR_CMD, "--config", str(config), "--broker", settings.url, "--prefix", topics.prefix,
                     "--pool", "city", "--id", member_id, "--db", str(tmp_path / f"{member_id}.db")]  # fmt: skip
        self.proc: subprocess.Popen[str] | None = None
        self.starts = 0

    def start(self) -> None:
        """Start and wait for its ready line (it is connected, reconciled and taking tasks then)."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("orchestrator"), line
        self.proc = proc
        self.starts += 1

    def kill(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.proc.stdout.close()
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc.stdout.close()
            self.proc = None


async def _failover_stream(settings: BrokerSettings, topics: Topics, tmp_path, *, tasks: int, kills: int,
                           seed: int, in_flight: int, delay_s: float) -> dict[str, Any]:  # fmt: skip
    """``tasks`` tasks over a pool of three member processes; ``kills`` SIGKILLs of a random running member at
    random points of the stream, each restarted at once (as systemd would). Asserts that nothing is lost or run
    twice and returns the figures."""
    rng = random.Random(seed)
    executed: Counter[str] = Counter()
    agents = _stations(settings, topics, tmp_path, executed, delay_s=delay_s)
    members = [Member(f"orch-{i}", settings, topics, tmp_path) for i in range(3)]
    kill_points = sorted(rng.sample(range(tasks // 20, tasks - tasks // 20), kills))
    killed_at: list[tuple[float, str]] = []
    answered = 0
    progress = asyncio.Condition()
    results: dict[str, dict[str, Any]] = {}
    latencies: dict[str, float] = {}
    t0 = time.monotonic()
    async with contextlib.AsyncExitStack() as stack:
        for a in agents:
            await stack.enter_async_context(a)
        stack.callback(lambda: [m.stop() for m in members])
        await asyncio.gather(*(asyncio.to_thread(m.start) for m in members))
        replies = Replies(settings, topics, "stream")
        await stack.enter_async_context(replies.conn)
        client = await stack.enter_async_context(
            TaskClient(settings, topics=topics, client_id="stream", resend_interval=1.0)
        )
        sem = asyncio.Semaphore(in_flight)
        restarts: list[asyncio.Task[None]] = []

        async def one(i: int) -> None:
            nonlocal answered
            task_id = f"task-{i:03d}"
            async with sem:
                started = time.monotonic()
                results[task_id] = await client.submit(QUESTIONS[i % len(QUESTIONS)], task_id=task_id, timeout=120)
                latencies[task_id] = time.monotonic() - started
            async with progress:
                answered += 1
                progress.notify_all()

        async def chaos() -> None:
            for point in kill_points:
                async with progress:
                    await progress.wait_for(lambda p=point: answered >= p)
                running = [m for m in members if m.proc is not None]
                if not running:
                    await asyncio.gather(*restarts)
                    running = [m for m in members if m.proc is not None]
                victim = rng.choice(running)
                victim.kill()
                killed_at.append((time.monotonic(), victim.id))
                restarts.append(asyncio.create_task(asyncio.to_thread(victim.start)))

        chaos_task = asyncio.create_task(chaos())
        await asyncio.gather(*(one(i) for i in range(tasks)))
        await chaos_task
        await asyncio.gather(*restarts)
        wall = time.monotonic() - t0
        await asyncio.sleep(0.5)  # late duplicates of answers (re-sends answered twice) arrive too
    ids = [f"task-{i:03d}" for i in range(tasks)]
    assert len(killed_at) == kills and all(m.starts >= 1 for m in members)
    # every task id: one terminal result, and it is done (the stations are all up)
    not_done = {t: (r["state"], r.get("answer")) for t, r in results.items() if r["state"] != "done"}
    assert sorted(results) == ids and not not_done, not_done
    # every answer the client was sent for a task id is the same result (re-sends may be answered again)
    differing = {t: len({repr(sorted(r.items())) for r in rs}) for t, rs in replies.by_task.items()}
    assert set(differing) == set(ids) and set(differing.values()) == {1}, differing
    # every durable request executed once at its agent, however many members asked for it
    assert executed == Counter(dict.fromkeys(ids, 1)), {t: n for t, n in executed.items() if n != 1}
    log = await _retained_log(settings, topics)
    assert sorted(log) == ids and all(log[t].terminal and log[t].result == results[t] for t in ids)
    taken_over = sorted((replies.first_at[t], t) for t in ids if log[t].gen > 1)
    assert taken_over, "no kill caught a task in progress"
    gaps: list[float] = []
    for when, _ in taken_over:
        before = [k for k, _ in killed_at if k <= when]
        gaps.append(when - before[-1])
    replayed = sum(a.counters["replayed"] + a.counters["duplicate_inflight"] for a in agents)
    lat = sorted(latencies.values())
    return {
        "tasks": tasks, "kills": [m for _, m in killed_at], "wall_s": round(wall, 1),
        "taken_over": len(taken_over), "resent_by_client": client.resent,
        "failover_gap_s": {"min": round(min(gaps), 3), "max": round(max(gaps), 3)},
        "agent_replays": replayed, "replies": sum(len(v) for v in replies.by_task.values()),
        "latency_p50_s": round(lat[len(lat) // 2], 3), "latency_max_s": round(lat[-1], 3),
    }  # fmt: skip


@pytest.mark.timeout(240)
async def test_sigkill_of_pool_members_during_a_200_task_stream_loses_nothing_and_runs_nothing_twice(
    settings, topics, tmp_path
):
    figures = await _failover_stream(settings, topics, tmp_path, tasks=200, kills=5, seed=11, in_flight=12,
                                     delay_s=0.4)  # fmt: skip
    print("pool failover:", figures)


def _status(member: str, online: bool, epoch: int) -> Message:
    from edgecoop.messages import Status
    from edgecoop.wire import encode

    topics = Topics("liveness/v1")
    return Message(topics.orchestrator_status(member), encode(Status(member, online, epoch).to_dict()), 1, False,
                   False, None)  # fmt: skip


def test_liveness_and_takeover_choice_follow_the_members_statuses():
    """Which claims are orphaned, and which member takes each over (the logic the process tests rely on)."""
    topics = Topics("liveness/v1")
    offered: list[list[str]] = []

    async def publish(*_: Any, **__: Any) -> None:  # nothing is published in this test
        raise AssertionError("no publication expected")

    logs = {m: TaskLog(topics, m, 100, publish, on_orphans=lambda r: offered.append([x.task_id for x in r]))
            for m in ("m1", "m2", "m3")}  # fmt: skip
    for tl in logs.values():
        for m in logs:
            tl.handle(_status(m, True, 100))
        for i in range(30):
            tl.records[f"t{i}"] = Record(f"t{i}", 1, "m1", 100, "claimed", {"question": "q"}, None)
        tl.records["ended"] = Record("ended", 1, "m1", 100, "done", {"question": "q"}, None, {"state": "done"})
        tl.start()
    assert not offered and not logs["m2"].orphaned(logs["m2"].records["t0"])
    for tl in logs.values():
        tl.handle(_status("m1", False, 99))  # an older incarnation's late will: fenced by its epoch
    assert not offered
    for tl in logs.values():
        tl.handle(_status("m1", False, 100))  # m1 died
    # every unfinished task of m1 is offered to exactly one live member; the ended one to none
    taken = Counter(t for batch in offered for t in batch)
    assert taken == Counter({f"t{i}": 1 for i in range(30)})
    assert {logs["m2"].successor(f"t{i}") for i in range(30)} == {"m2", "m3"}  # spread over both survivors
    assert all(logs["m2"].successor(t) == logs["m3"].successor(t) for t in taken)  # the same choice everywhere
    # m1 back as a new process (a newer epoch): its old claims stay orphans, and it may take some over itself
    logs["m1"].epoch = 200
    for tl in logs.values():
        tl.handle(_status("m1", True, 200))
    assert logs["m1"].orphaned(logs["m1"].records["t0"]) and logs["m2"].orphaned(logs["m2"].records["t0"])
    assert {logs["m2"].successor(f"t{i}") for i in range(30)} == {"m1", "m2", "m3"}
