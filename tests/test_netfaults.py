"""Network faults between one agent and the broker, through a loopback TCP proxy (tests/netproxy.py).

Issue 5, item 4: a 30 s partition, a connection reset every few seconds, and a slow but live link. Every task id
reaches exactly one terminal state, nothing is lost after the link heals, a durable request is executed at most
once, and a slow link never gets a live agent declared dead. Real Mosquitto, real agents, real orchestrator.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter

import pytest

from tests.faults import PROXIED, STATIONS, TERMINAL, Outcome, StatusEvent, Urban, pct, private_broker, summary, urban

log = logging.getLogger("tests.netfaults")
PARK, STATION = STATIONS[PROXIED], STATIONS["air-station"]


async def _stream(u: Urban, place: str, prefix: str, every: float, stop: asyncio.Event) -> list[Outcome]:
    """Submit one task for ``place`` every ``every`` seconds until ``stop``; return every outcome."""
    running: list[asyncio.Task[Outcome]] = []
    while not stop.is_set():
        running.append(asyncio.create_task(u.ask(place, f"{prefix}-{len(running):03d}")))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(every):  # the submission cadence, not a correctness condition
                await stop.wait()
    return list(await asyncio.gather(*running))


def _check_exactly_once(u: Urban, counts: dict[str, int]) -> None:
    """Every task id has one terminal state in the store and in its answer; no durable request ran twice."""
    assert set(counts) <= TERMINAL, counts
    assert sum(counts.values()) == len(u.outcomes), (counts, len(u.outcomes))
    assert all(o.state in TERMINAL for o in u.outcomes.values())
    for aid in STATIONS:
        assert u.served(aid) <= u.asked(aid), (aid, u.served(aid), u.asked(aid))


def _report(name: str, **figures: object) -> None:
    line = f"{name}: " + ", ".join(f"{k}={v}" for k, v in figures.items())
    log.warning("%s", line)  # shown by -rA / on failure; the figures quoted in docs/reliability.md
    print(line)


@pytest.mark.timeout(150)
async def test_a_30s_partition_ends_every_task_and_loses_nothing_after_it_heals(tmp_path):
    with private_broker(tmp_path / "broker") as broker:
        async with urban(tmp_path, broker) as u:
            warm = [await u.ask(PARK, f"warm-{i}") for i in range(3)]
            assert all(o.state == "done" for o in warm)
            stop = asyncio.Event()
            t_pause = time.monotonic()
            u.proxy.pause()
            park = asyncio.create_task(_stream(u, PARK, "pause-park", 1.5, stop))
            station = asyncio.create_task(_stream(u, STATION, "pause-station", 1.5, stop))
            # the broker fires the agent's Last Will (keepalive 5 s): a true verdict, the link is dead
            await u.statuses.wait_for(lambda: u.statuses.offline(PROXIED, t_pause), timeout=20)
            detected = u.statuses.offline(PROXIED, t_pause)[0].t - t_pause
            await asyncio.sleep(max(0.0, t_pause + 30 - time.monotonic()))  # hold the partition for 30 s
            u.proxy.resume()
            t_resume = time.monotonic()
            await u.statuses.wait_for(lambda: u.statuses.online(PROXIED, t_resume), timeout=30)
            back = u.statuses.online(PROXIED, t_resume)[0].t - t_resume
            stop.set()
            during_park, during_station = await park, await station
            after = [await u.ask(PARK, f"after-{i}") for i in range(5)]
            counts = await u.store_counts()
            events = [e for e in u.statuses.events if e.agent == PROXIED]  # before the agents say goodbye
            cms_online = await u.cms_online(PROXIED)

        _check_exactly_once(u, counts)
        park_states = Counter(o.state for o in during_park)
        failed = [o for o in during_park if o.state != "done"]
        _report(
            "partition 30s",
            tasks=len(u.outcomes),
            store=counts,
            park_during=dict(park_states),
            will_after_s=round(detected, 1),
            back_after_resume_s=round(back, 1),
            park_terminal=summary([o.seconds for o in during_park]),
            station=summary([o.seconds for o in during_station]),
            offline_verdicts=sum(not e.online for e in events),
            refused_during_pause=u.proxy.stats.refused,
            replayed=u.agents[PROXIED].counters["replayed"],
            expired=u.agents[PROXIED].counters["expired"],
        )
        # keepalive 5 s: Mosquitto fires the will after 1.5 x keepalive, later when the client was idle
        assert 5.0 <= detected <= 16.0, detected
        offline = [e for e in events if not e.online]
        assert len(offline) == 1, events  # exactly the one true verdict
        assert cms_online is True
        # a task for the partitioned place failed with the reason (its agent silent, then offline), or waited and was
        # answered by that place; never by another place, never by the cloud (a world question)
        for o in failed:
            reason = o.result["reason"]
            assert any(k in reason for k in ("no online agent", "offline", "no reply from air-park")), reason
            assert o.result["tier"] == "edge" and o.result["cloud_calls"] == 0, o.result
        for o in during_park:
            if o.state == "done":
                assert o.agents()[-1] == PROXIED, o.agents()
        # the rest of the system did not notice; after the heal everything is answered by the healed agent
        assert all(o.state == "done" for o in during_station), Counter(o.state for o in during_station)
        # ... nor waited: tasks for the partitioned agent hold no slot another task needs (they once did: 2 s)
        assert pct([o.seconds for o in during_station], 0.95) < 0.5, summary([o.seconds for o in during_station])
        assert all(o.state == "done" and o.agents() == [PROXIED] for o in after), [o.result for o in after]
        assert u.agents[PROXIED].conn.counters.connects == 2


@pytest.mark.timeout(120)
async def test_a_reset_every_3s_loses_no_task_and_every_offline_is_the_reset_connection(tmp_path):
    with private_broker(tmp_path / "broker") as broker:
        async with urban(tmp_path, broker) as u:
            u.proxy.throttle(None, latency_s=0.1)  # requests and replies spend time on the wire: resets hit them
            stop = asyncio.Event()
            park = [asyncio.create_task(_stream(u, PARK, f"reset-park{k}", 0.25, stop)) for k in range(2)]
            station = asyncio.create_task(_stream(u, STATION, "reset-station", 1.0, stop))
            resets: list[tuple[float, int]] = []
            for _ in range(8):
                await asyncio.sleep(3.0)  # the fault schedule: a reset every 3 s, whatever is in flight
                resets.append((time.monotonic(), u.proxy.reset()))
            t_last = resets[-1][0]
            await u.statuses.wait_for(lambda: u.statuses.online(PROXIED, t_last), timeout=30)
            stop.set()
            during = [o for t in park for o in await t]
            during_station = await station
            # idle now: the event loop must be too (a writer callback left behind by a reconnect spun it at 100 %)
            cpu0, wall0 = time.process_time(), time.monotonic()
            await asyncio.sleep(2.0)
            idle_cpu = (time.process_time() - cpu0) / (time.monotonic() - wall0)
            after = [await u.ask(PARK, f"after-{i}") for i in range(3)]
            counts = await u.store_counts()
            events = [e for e in u.statuses.events if e.agent == PROXIED]
            cms_online = await u.cms_online(PROXIED)
            connects = u.agents[PROXIED].conn.counters.connects

        _check_exactly_once(u, counts)
        offline = [e for e in events if not e.online]
        applied: list[StatusEvent] = []
        stale: list[StatusEvent] = []
        newest = 0
        for e in events:
            if e.online:
                newest = max(newest, e.epoch)
            else:
                (applied if e.epoch >= newest else stale).append(e)
        back = []
        for t, _ in resets:
            nxt = [e.t for e in events if e.online and e.t >= t]
            back.append(round(nxt[0] - t, 2) if nxt else None)
        _report(
            "reset every 3s",
            tasks=len(u.outcomes),
            store=counts,
            resets=sum(n for _, n in resets),
            offline_verdicts=len(applied),
            stale_wills_fenced=len(stale),
            connects=connects,
            online_again_after_s=back,
            idle_cpu=f"{idle_cpu:.0%}",
            park_terminal=summary([o.seconds for o in during]),
            station=summary([o.seconds for o in during_station]),
            retried_tasks=sum(1 for o in during if len(o.agents()) > 1),
            requests_resent=u.orch.requester.resent,
            replayed=u.agents[PROXIED].counters["replayed"],
            outbox_resent=u.agents[PROXIED].counters["outbox_resent"],
            duplicates=u.agents[PROXIED].counters["duplicate_inflight"],
        )
        assert counts == {"done": len(u.outcomes)}, [
            o.result["reason"] for o in u.outcomes.values() if o.state != "done"
        ]
        assert all(o.agents()[-1] == PROXIED for o in during + after)
        assert all(o.state == "done" for o in during_station)
        # not stalled by the resets (a stall used to cost the 10 s of a lost SUBACK); the bound is loose because a
        # loaded 2-core CI machine put p95 at 1.6 s once while every task still finished
        assert pct([o.seconds for o in during_station], 0.95) < 3.0, summary([o.seconds for o in during_station])
        # every offline the CMS applies is the will of a connection that was reset (at most one per reset); a
        # will older than an online already seen is fenced by its epoch; the CMS ends with the agent online
        assert len(applied) <= sum(n for _, n in resets), events
        assert len({e.epoch for e in offline}) == len(offline)
        assert cms_online is True
        assert connects >= 1 + len(applied)
        # back within a few round trips every time: a reset during the subscribe/birth phase used to leave the
        # agent waiting 10 s for a SUBACK; a descriptor left in the selector hung the next connect for 3 s
        assert all(b is not None and b < 3.0 for b in back), back
        assert idle_cpu < 0.3, idle_cpu


@pytest.mark.timeout(120)
async def test_a_slow_but_live_link_is_never_declared_dead(tmp_path):
    with private_broker(tmp_path / "broker") as broker:
        async with urban(tmp_path, broker) as u:
            baseline = [await u.ask(PARK, f"base-{i}") for i in range(3)]
            t_slow = time.monotonic()
            u.proxy.throttle(2000, latency_s=0.25)  # 16 kbit/s, 0.5 s round trip: a poor cellular link
            stop = asyncio.Event()
            park = asyncio.create_task(_stream(u, PARK, "slow-park", 1.0, stop))
            station = asyncio.create_task(_stream(u, STATION, "slow-station", 1.0, stop))
            await asyncio.sleep(25.0)  # five keepalive periods on the slow link
            stop.set()
            during, during_station = await park, await station
            u.proxy.throttle(None)
            counts = await u.store_counts()
            events = [e for e in u.statuses.events if e.agent == PROXIED and e.t >= t_slow]
            cms_online = await u.cms_online(PROXIED)
            connects = u.agents[PROXIED].conn.counters.connects

        _check_exactly_once(u, counts)
        _report(
            "slow link 2000 B/s + 250 ms",
            tasks=len(u.outcomes),
            store=counts,
            offline_verdicts=sum(not e.online for e in events),
            connects=connects,
            proxy_connections=u.proxy.stats.accepted,
            baseline=summary([o.seconds for o in baseline]),
            park_terminal=summary([o.seconds for o in during]),
            station=summary([o.seconds for o in during_station]),
            bytes_down=u.proxy.stats.bytes_down,
            bytes_up=u.proxy.stats.bytes_up,
        )
        assert not events, events  # no will, no reconnect: the CMS never saw it offline
        assert cms_online is True
        assert connects == 1 and u.proxy.stats.accepted == 1
        assert counts == {"done": len(u.outcomes)}
        # answered by the slow agent itself, first attempt (no re-dispatch, no "went offline")
        assert all(o.agents() == [PROXIED] for o in during), [o.result["trace"] for o in during]
        assert min(o.seconds for o in during) >= 0.5  # the link really was slow
