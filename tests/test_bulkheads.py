"""Overload of the orchestrator itself (issue 15): bulkheads per tier, bounded fair queues refused at once,
per-client rate limits, the cloud budget.

The flood test is the issue's scenario over the session broker: 5,000 open questions of 1,990 characters from one
client (``mosquitto_pub -l``) while another client asks a sensor agent's value; it runs the same code as
``edgecoop bench overload`` (edgecoop.benchmarks.overload). The rest are the parts on their own: pure unit tests
of the admission structures, and small broker tests of the refusal contract and the budget.
"""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import time
from collections import Counter

import pytest

from edgecoop.agents import Agent
from edgecoop.benchmarks.overload import CHEAP_QUESTION, OverloadParams, _cloud_agent, flood_question, measure
from edgecoop.connection import BrokerSettings
from edgecoop.errors import CloudBudgetExceeded, ConfigError, Overloaded
from edgecoop.orchestrator import FastParser, Orchestrator, get_strategy
from edgecoop.orchestrator.admission import (
    Admission,
    AdmissionSettings,
    Bulkhead,
    CloudBudget,
    IntakeQueue,
    RateLimiter,
    client_of,
    rejection,
    tier_of,
)
from edgecoop.orchestrator.parser import privacy_of
from edgecoop.orchestrator.vocabulary import Vocabulary
from edgecoop.rpc import ReplyContext
from edgecoop.scenarios.loader import load_scenario
from edgecoop.taskclient import TaskClient
from edgecoop.wire import Format

# -- the admission structures, without a broker ---------------------------------------------------------------


async def test_a_bulkhead_runs_its_limit_queues_its_bound_and_refuses_beyond_at_once():
    b = Bulkhead("cloud", limit=2, queue=3, share=1.0)
    running = [b.offer("a"), b.offer("b")]
    assert all(t.granted for t in running) and b.running == 2
    queued = [b.offer("a"), b.offer("b"), b.offer("c")]
    assert not any(t.granted for t in queued) and b.queued == 3
    with pytest.raises(Overloaded) as refused:
        b.offer("d")
    assert refused.value.code == "overloaded" and refused.value.limit == "queue:cloud"
    assert refused.value.retry_after_s >= 1.0
    forced = b.offer("local", force=True)  # in-process callers wait instead
    assert b.queued == 4 and not forced.granted
    running[0].release()
    assert await queued[0].wait(1) >= 0 and b.running == 2 and b.queued == 3
    for t in [running[1], *queued, forced]:
        t.release()
    assert b.running == 0 and b.queued == 0 and b.peak_running == 2 and b.peak_queued == 4


async def test_freed_slots_go_round_robin_and_one_client_holds_at_most_its_share_while_others_wait():
    b = Bulkhead("slm", limit=4, queue=100, share=0.5)  # a client's share: 2 slots, 50 queue places
    flood = [b.offer("flooder") for _ in range(4)]
    assert all(t.granted for t in flood[:4])  # nobody else waits: it may use every slot
    more = [b.offer("flooder") for _ in range(6)]
    polite = [b.offer("polite") for _ in range(2)]
    # two slots free up: the polite client, below its share, gets both before the flooder gets any
    flood[0].release()
    flood[1].release()
    assert [t.granted for t in polite] == [True, True] and not any(t.granted for t in more)
    flood[2].release()
    assert more[0].granted  # nobody under its share waits: the flooder's turn (work-conserving)
    with pytest.raises(Overloaded, match="share") as refused:
        for _ in range(100):
            b.offer("flooder")
    assert refused.value.limit == "share:slm"
    b.offer("another")  # the queue itself still has room for others


async def test_a_waiting_ticket_gives_up_its_place_at_its_deadline():
    b = Bulkhead("vision", limit=1, queue=5, share=1.0)
    holder = b.offer("a")
    waiter = b.offer("b")
    with pytest.raises(TimeoutError):
        await waiter.wait(0.01)
    assert b.queued == 0 and waiter.released
    holder.release()
    assert b.running == 0


def test_the_rate_limiter_allows_a_burst_then_the_rate_and_keeps_a_bounded_table():
    r = RateLimiter(rate=10.0, burst=3, max_clients=2)
    assert [r.take("a", 0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert r.take("a", 0.0) == pytest.approx(0.1)
    assert r.take("a", 0.1) == 0.0  # one token back after 1/rate seconds
    r.take("b", 0.1)
    r.take("c", 0.1)
    assert len(r) == 2 and r.evicted == 1  # least recently used evicted: memory bounded by max_clients
    assert RateLimiter(rate=0.0, burst=1, max_clients=1).take("x", 0.0) == 0.0  # 0 = no limit


def test_the_cloud_budget_charges_before_the_call_and_refuses_naming_the_budget():
    counters: Counter[str] = Counter()
    budget = CloudBudget(AdmissionSettings(cloud_budget=0.01, cloud_window_s=60), counters)
    for _ in range(5):
        budget.charge("cloud-llm", 0.002)
    with pytest.raises(CloudBudgetExceeded) as refused:
        budget.charge("cloud-llm", 0.002)
    assert "cloud budget" in str(refused.value) and "0.01 spend per 60 s" in str(refused.value)
    assert refused.value.retry_after_s >= 1.0 and counters["cloud_budget_refused"] == 1
    with pytest.raises(CloudBudgetExceeded):
        budget.check()
    assert budget.window() == (pytest.approx(0.01), 5)
    # the window slides: once its slices are older than the window, the budget is free again
    for s in budget._slices:
        s[0] -= 61
    budget.check()
    # an agent that declares no cost is charged what it last reported
    assert budget.charge("quiet-cloud", 0.0) == 0.0
    budget.settle("quiet-cloud", 0.0, 0.004)
    assert budget.estimate("quiet-cloud", 0.0) == 0.004
    calls = CloudBudget(AdmissionSettings(cloud_budget=0, cloud_calls=2), Counter())
    calls.charge("c", 1.0)
    calls.charge("c", 1.0)
    with pytest.raises(CloudBudgetExceeded, match="2 calls"):
        calls.charge("c", 1.0)


async def test_the_intake_queue_takes_clients_in_turn_within_its_bounds():
    q = IntakeQueue(max_items=10, max_bytes=10_000, share=0.5)
    for i in range(5):
        q.put("flood", f"f{i}", 100)
    with pytest.raises(Overloaded) as refused:
        q.put("flood", "f5", 100)
    assert refused.value.limit == "share:intake"
    q.put("cheap", "c0", 100)
    assert [await q.get() for _ in range(3)] == ["f0", "c0", "f1"]
    with pytest.raises(Overloaded, match="waiting to be read"):
        q.put("big", "b", 9_999)
    assert q.peak_items == 6 and q.items == 3


def test_settings_merge_with_the_defaults_and_refuse_nonsense():
    s = AdmissionSettings(limits={"cloud": 2})
    assert (
        s.limits["cloud"] == 2
        and s.limits["read"] == 64
        and s.task_bound == sum(s.limits.values()) + sum(s.queues.values())
    )
    with pytest.raises(ConfigError, match="unknown tier 'gpu'"):
        AdmissionSettings(limits={"gpu": 1})
    with pytest.raises(ConfigError, match="client_share"):
        AdmissionSettings(client_share=0)
    with pytest.raises(ConfigError, match=r"queues\.read"):
        AdmissionSettings(queues={"read": -1})


def test_the_tier_comes_from_the_spec_and_its_plan():
    cards = {c.agent_id: Agent(c).card().to_dict() for c in load_scenario("urban", BrokerSettings(), with_cloud=False)}
    vocab = Vocabulary()
    vocab.update(cards)
    parser = FastParser()

    def tier(question: str, strategy: str = "capability-aware", summarize: bool = False) -> str:
        spec = parser.parse(question, vocab)
        return tier_of(spec, privacy_of(spec, vocab), question, strategy=get_strategy(strategy), summarize=summarize)

    assert tier(CHEAP_QUESTION) == "read"
    assert tier("Is NO2 at Central Station above the WHO limit?") == "read"
    assert tier("How many vehicles passed the Harbour Gate camera?") == "vision"
    assert tier("How many vehicles passed the Harbour Gate camera?", summarize=True) == "slm"
    assert tier(flood_question(7, 1990)) == "cloud"
    assert tier("Explain how a heat pump works.", "cascade") == "slm"  # edge first; the cloud only via the gate
    assert tier("What is the PM2.5 level at Narnia Square?") == "read"  # refused at once


def test_the_refusal_and_the_identity_of_a_client():
    route = ReplyContext("edgecoop/v1/reply/cli-7", None, Format.JSON)
    assert client_of({"question": "q"}, route) == "edgecoop/v1/reply/cli-7"
    assert client_of({"question": "q", "client": "node-red"}, route) == "node-red"
    assert client_of({"question": "q"}, None) == "anonymous"
    r = rejection("t-1", Overloaded("the cloud queue is full", limit="queue:cloud", retry_after_s=3.0))
    assert r["state"] == "rejected" and r["task_id"] == "t-1" and r["retry_after_s"] == 3.0
    assert r["error"] == {"code": "overloaded", "message": "the cloud queue is full", "limit": "queue:cloud",
                          "retry_after_s": 3.0}  # fmt: skip


async def test_intake_refuses_a_client_over_its_rate_before_anything_is_queued():
    a = Admission(AdmissionSettings(client_rate=1.0, client_burst=2, inline_chars=100, understanding_queue=1))
    assert a.intake("x", "short") is None and a.intake("x", "short") is None
    with pytest.raises(Overloaded) as refused:
        a.intake("x", "short")
    assert refused.value.limit == "client_rate" and a.counters["rejected_client_rate"] == 1
    long = "q" * 200
    t1 = a.intake("y", long)  # a long question takes the understanding worker or its one queue place
    t2 = a.intake("z", long)
    with pytest.raises(Overloaded) as full:
        a.intake("w", long)
    assert full.value.limit == "understanding" and a.pending == 4
    for t, c in ((t1, "y"), (t2, "z")):
        assert t is not None
        t.release()
        a.done_pending(c)
    a.done_pending("x")
    a.done_pending("x")
    assert a.pending == 0


# -- over the session broker ------------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("mosquitto_pub") is None, reason="needs mosquitto_pub (mosquitto-clients)")
@pytest.mark.timeout(150)
async def test_a_flood_of_expensive_questions_does_not_starve_cheap_reads(settings, topics):
    """5,000 open questions of 1,990 characters from one client, as fast as ``mosquitto_pub -l`` sends them,
    while another client reads a sensor every 20 ms: the reads keep p99 < 100 ms, the flood gets ``overloaded``
    refusals beyond the bounds, cloud calls stay within the budget, memory within its bound, and the service is
    normal right after."""
    # the flood phase spans at least 8 s of reads (~300): the reads are closed-loop, so the stall while the
    # orchestrator reads through the 10 MB burst shows as one slow read (its max), not as its p99
    params = OverloadParams(
        baseline_reads=150, flood_window_s=8.0, after_s=3.0,
        admission=AdmissionSettings(cloud_budget=0.01, cloud_window_s=60),
    )  # fmt: skip
    r = await measure(settings, topics.prefix, params)
    summary = {k: r[k] for k in ("flood_slowest", "cheap", "refusals_by_limit", "flood_states", "cloud_calls",
                                 "rss_growth_mb")}  # fmt: skip
    # cheap reads: answered, right, fast, during the flood as without it. The target is the p99 < 100 ms on
    # an otherwise idle machine; when other work slows even this run's no-flood baseline, the flood may not cost
    # the reads more than that baseline again (the benchmark's committed run has the figures)
    bound = max(100.0, 2 * r["baseline_p99_ms"])
    assert r["cheap"]["not_done"] == 0, summary
    assert r["cheap"]["flood"]["n"] >= 150, summary
    assert r["flood_p99_ms"] < bound, summary
    # normal within a few seconds: every flood submission answered, nothing admitted left, reads as before
    assert r["flood_answered_s"] < 10 and r["admission_drained"], summary
    assert r["after_p99_ms"] < bound, summary
    # every flood submission was answered: refused at once with a retry-after, or done (answered or refused by the
    # cloud budget); the refusals are beyond the bounds: what was admitted fits them
    assert r["flood_answers"] == params.flood and r["flood_unanswered"] == 0, summary
    assert r["refusals"] >= params.flood - 200 and set(r["refusal_codes"]) == {"overloaded"}, summary
    assert r["retry_after_s"]["min"] >= 1.0, summary
    assert r["refusals"] + r["flood_done"] == params.flood, summary
    tiers = r["admission"]["tiers"]
    for t in tiers.values():
        assert t["peak_running"] <= t["limit"] and t["peak_queued"] <= t["queue"], tiers
    # the cloud: within the budget (0.01 at 0.002 per call = 5 calls) and its concurrency; the rest refused by it
    assert r["cloud_calls"] <= 5 and r["cloud_spend"] <= 0.01 + 1e-9 and r["budget_refusals"] >= 1, summary
    assert r["cloud_peak_concurrent"] <= params.admission.cloud_max_concurrent, summary
    assert r["budget_refusals"] + r["flood_cloud_answers"] == r["flood_done"], summary
    assert "cloud budget" in r["after_open_question"]["answer"], r["after_open_question"]
    # memory: every queue stayed within its bound, and the process grew by little
    adm = r["admission"]
    assert adm["peak_pending"] <= adm["bound"]["pending"] and adm["peak_active"] <= adm["bound"]["tasks"], adm
    assert adm["intake"]["peak_items"] <= adm["bound"]["intake_messages"], adm
    assert adm["intake"]["peak_bytes"] <= adm["bound"]["intake_bytes"], adm
    assert adm["refusals"]["dropped"] == 0, adm
    assert r["rss_growth_mb"] < 64, summary


async def test_a_full_cloud_tier_refuses_at_once_and_never_delays_an_edge_read(settings, topics):
    """The cloud tier full of slow calls (limit 1, queue 1): a third open question is refused at once with
    ``overloaded`` and a retry-after (a terminal answer for the TaskClient), while an edge read from the same
    client is answered without waiting for them."""
    params = OverloadParams(cloud_latency_ms=3000)
    agents = [Agent(c) for c in load_scenario("urban", settings, prefix=topics.prefix, include={"air-station"})]
    agents.append(_cloud_agent(settings, topics.prefix, params))
    admission = AdmissionSettings(limits={"cloud": 1}, queues={"cloud": 1}, client_share=1.0)
    for a in agents:
        await a.__aenter__()
    try:
        async with (
            Orchestrator(settings, topics=topics, admission=admission) as orch,
            TaskClient(settings, topics=topics) as client,
        ):
            both_admitted = asyncio.Event()  # one calling the cloud, one waiting for its slot
            admit = orch.admission.admit

            def watched_admit(*args, **kwargs):
                ticket = admit(*args, **kwargs)
                if orch.counters["admitted_cloud"] == 2:
                    both_admitted.set()
                return ticket

            orch.admission.admit = watched_admit
            slow = [asyncio.create_task(client.submit(f"Explain how a heat pump works, part {i}.", timeout=30))
                    for i in range(2)]  # fmt: skip
            await asyncio.wait_for(both_admitted.wait(), 10)
            t0 = time.monotonic()
            refused = await client.submit("Explain how a heat pump works, part 3.", timeout=10)
            assert refused["state"] == "rejected" and refused["error"]["code"] == "overloaded", refused
            assert refused["limit"] == "queue:cloud" and refused["retry_after_s"] >= 1, refused
            read = await client.submit(CHEAP_QUESTION, timeout=10)
            assert read["state"] == "done" and read["tier"] == "edge" and read["value"] is not None, read
            assert time.monotonic() - t0 < 2.0  # neither waited for the 3-second cloud calls
            done = await asyncio.gather(*slow)
            assert [d["tier"] for d in done] == ["cloud", "cloud"], done
            assert orch.counters["rejected_queue_cloud"] == 1 and not orch.admission.active
    finally:
        for a in reversed(agents):
            await a.__aexit__(None, None, None)


async def test_beyond_the_cloud_budget_open_questions_get_a_refusal_naming_it(settings, topics):
    params = dataclasses.replace(OverloadParams(), cloud_latency_ms=5)
    cloud = _cloud_agent(settings, topics.prefix, params)
    handler = cloud.handlers["cloud"]
    admission = AdmissionSettings(cloud_budget=0.004, cloud_window_s=3600)  # two calls at 0.002
    async with cloud, Orchestrator(settings, topics=topics, admission=admission) as orch:
        answers = [await orch.submit(f"Explain how a heat pump works, part {i}.") for i in range(3)]
        assert [a["tier"] for a in answers] == ["cloud", "cloud", "none"], answers
        assert answers[2]["decision"] == "refused" and "cloud budget" in answers[2]["answer"], answers[2]
        assert "0.004 spend per 3600 s" in answers[2]["answer"] and answers[2]["cloud_calls"] == 0
        assert handler.calls == 2 and orch.counters["cloud_budget_refused"] >= 1
        assert orch.admission.stats()["cloud"]["window_spend"] == pytest.approx(0.004)
