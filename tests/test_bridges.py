"""Sites bridged through a regional hub: three real Mosquitto instances on loopback, generated bridge configs.

Site ``a`` and site ``b`` each run their own broker with the bridge from ``edgecoop.broker.bridge_config``;
the hub is a plain broker (agents connected to it are the ``cloud`` site). Covered: routing without loops or
duplicates, cross-site discovery for a late joiner, a task at site a answered by an agent only at site b,
local-then-near-then-cloud preference, and a hub killed by PID and restarted with every task terminal.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from edgecoop.agents import Agent
from edgecoop.broker import MosquittoProcess, bridge_config, development_config, free_port
from edgecoop.cms.mirror import CmsMirror
from edgecoop.connection import BrokerSettings, Connection, Message
from edgecoop.errors import RequestTimeout, TopicError
from edgecoop.orchestrator import Orchestrator
from edgecoop.rpc import Requester
from edgecoop.topics import Kind, ParsedTopic, Topics
from tests.conftest import agent_config

SITES = ("a", "b")
TERMINAL = {"done", "failed", "timed_out"}


@dataclass
class Federation:
    hub: MosquittoProcess
    sites: dict[str, MosquittoProcess]
    topics: Topics
    stack: contextlib.AsyncExitStack = field(default_factory=contextlib.AsyncExitStack)

    def settings(self, site: str) -> BrokerSettings:
        broker = self.hub if site == "cloud" else self.sites[site]
        return BrokerSettings(port=broker.port, keepalive=5)

    def agent(self, agent_id: str, site: str, **kw: Any) -> Agent:
        return Agent(agent_config(agent_id, self.settings(site), self.topics, site=site, **kw))

    async def start(self, *agents: Agent) -> None:
        for a in agents:
            await self.stack.enter_async_context(a)

    async def requester(self, site: str, broker_site: str | None = None) -> Requester:
        """A requester at ``site`` (connected to that site's broker, or to ``broker_site``'s)."""
        cid = f"rq-{site}-{uuid.uuid4().hex[:6]}"
        conn = Connection(
            self.settings(broker_site or site),
            cid,
            subscriptions=[
                Requester.subscription(self.topics, cid),
                Requester.site_subscription(self.topics, site, cid),
            ],
            clean_start=True,
        )
        req = Requester(conn, self.topics, site=site)
        conn._handler = req.handle
        await self.stack.enter_async_context(conn)
        return req

    async def wait_routed(self, timeout: float = 30.0) -> None:
        """Until a message addressed to each site through the hub arrives there (the bridges are up both ways)."""
        async with asyncio.timeout(timeout):
            for src, dst in (("a", "b"), ("b", "a"), ("cloud", "a"), ("cloud", "b")):
                await _probe(self, src, dst)


async def _probe(fed: Federation, src: str, dst: str) -> None:
    got = asyncio.Event()
    cid = f"probe-{uuid.uuid4().hex[:6]}"
    topic = fed.topics.site_reply(dst, cid)
    async with (
        Connection(fed.settings(dst), cid, subscriptions=[(topic, 1)], handler=lambda m: got.set(), clean_start=True),
        Connection(fed.settings(src), f"{cid}-tx", clean_start=True) as tx,
    ):
        while not got.is_set():  # a bridge that is still connecting drops nothing it has queued, but we cannot
            await tx.publish(topic, b"probe", qos=1)  # know when its subscriptions at the hub are in place
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.5):
                    await got.wait()


def _site_broker(tmp_path: Any, site: str, hub_port: int, topics: Topics) -> MosquittoProcess:
    port = free_port()
    workdir = tmp_path / site
    workdir.mkdir()
    config = development_config(port, data_dir=workdir, log_file=workdir / "mosquitto.log") + bridge_config(
        name=f"{site}-uplink",
        site=site,
        remote_host="127.0.0.1",
        remote_port=hub_port,
        prefix=topics.prefix,
        restart_timeout=(1, 2),
    )
    return MosquittoProcess(port, config_text=config, workdir=workdir)


@pytest.fixture
def brokers(tmp_path, topics) -> Iterator[tuple[MosquittoProcess, dict[str, MosquittoProcess]]]:
    hub = MosquittoProcess(workdir=tmp_path / "hub")  # no persistence: the bridges restore its retained state
    sites: dict[str, MosquittoProcess] = {}
    try:
        hub.start()
        for s in SITES:
            sites[s] = _site_broker(tmp_path, s, hub.port, topics).start()
        yield hub, sites
    finally:
        for b in (*sites.values(), hub):
            b.cleanup()


@pytest.fixture
async def fed(brokers, topics) -> AsyncIterator[Federation]:
    hub, sites = brokers
    federation = Federation(hub, sites, topics)
    async with federation.stack:
        await federation.wait_routed()
        yield federation


class Spy:
    """Everything under the prefix that one broker delivers."""

    def __init__(self, fed: Federation, site: str) -> None:
        self.seen: list[tuple[str, bytes, bytes | None]] = []
        self.conn = Connection(
            fed.settings(site),
            f"spy-{site}-{uuid.uuid4().hex[:6]}",
            subscriptions=[(f"{fed.topics.prefix}/#", 1)],
            handler=self.on_message,
            clean_start=True,
        )

    def on_message(self, m: Message) -> None:
        corr = getattr(m.properties, "CorrelationData", None)
        self.seen.append((str(m.topic), m.payload if isinstance(m.payload, bytes) else b"", corr))

    def traffic(self, part: str) -> list[tuple[str, bytes | None]]:
        return [(t, c) for t, _, c in self.seen if f"/{part}/" in t]


async def test_cross_site_requests_route_back_without_loops_or_duplicates(fed: Federation):
    spies = {s: Spy(fed, s) for s in ("a", "b", "cloud")}
    for spy in spies.values():
        await fed.stack.enter_async_context(spy.conn)
    await fed.start(fed.agent("echo-a", "a"), fed.agent("echo-b", "b"), fed.agent("echo-c", "cloud"))
    at_a, at_b = await fed.requester("a"), await fed.requester("b")
    calls = [(at_a, "echo-b", "b"), (at_a, "echo-c", "cloud"), (at_a, "echo-a", "a"), (at_b, "echo-a", "a")]
    for req, agent, site in calls:
        replies = await asyncio.gather(
            *(req.request(agent, "echo", {"i": i}, timeout=10, site=site) for i in range(10))
        )
        assert [(r.agent_id, r.result["echo"]["i"]) for r in replies] == [(agent, i) for i in range(10)]
    # a sentinel through every bridge path: whatever a loop would have echoed is delivered by then
    for src, dst in (("a", "b"), ("b", "a"), ("cloud", "a"), ("cloud", "b")):
        await _probe(fed, src, dst)

    for name, spy in spies.items():
        rpc = collections.Counter(
            (t, c) for t, _, c in spy.seen if ("/req/" in t or "/reply/" in t) and "/reply/probe-" not in t
        )
        assert rpc and max(rpc.values()) == 1, f"a request or reply arrived twice at {name}"
        state = collections.Counter((t, p) for t, p, _ in spy.seen if t.endswith(("/card", "/status")))
        assert state and max(state.values()) == 1, f"a card or status arrived twice at {name}"
    hub = spies["cloud"]
    # local traffic stays local: the hub never sees a plain request or reply topic
    assert not [t for t, _ in hub.traffic("agents") if "/req/" in t and "/sites/" not in t]
    assert not [t for t, _ in hub.traffic("reply") if "/sites/" not in t]
    # cross-site traffic crosses exactly where it must: 10 a->b and 10 a->cloud requests, 10 b->a
    hub_requests = collections.Counter(t.split("/sites/")[1].split("/")[0] for t, _ in hub.traffic("req"))
    assert hub_requests == {"b": 10, "cloud": 10, "a": 10}
    site_b_requests = [t for t, _ in spies["b"].traffic("req") if "echo-b" in t]
    assert len(site_b_requests) == 10 and all("/sites/b/agents/echo-b/req/" in t for t in site_b_requests)
    # the replies to a's cross-site requests arrive at a once each (10 from b, 10 from the cloud)
    replies_at_a = [t for t, c in spies["a"].traffic("reply") if t == fed.topics.site_reply("a", at_a.conn.client_id)]
    assert len(replies_at_a) == 20


async def test_late_joiner_at_site_a_sees_site_b_and_cloud_cards(fed: Federation):
    await fed.start(
        *(fed.agent(f"cam-b{i}", "b", description=f"camera {i} at site b") for i in range(3)),
        fed.agent("llm-cloud", "cloud", description="cloud gateway"),
        fed.agent("kb-a", "a"),
    )
    async with CmsMirror(fed.settings("a"), topics=fed.topics) as late:
        await late.wait_for(lambda s: s.count(online=True) == 5, timeout=20)
        sites = {a: c["site"] for a, c in (await late.snapshot()).items()}
    assert sites == {"cam-b0": "b", "cam-b1": "b", "cam-b2": "b", "llm-cloud": "cloud", "kb-a": "a"}
    # the CLI marks each agent with its site and the network cost of reaching it from here
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "edgecoop.cli", "cms", "query", "--broker", fed.settings("a").url,
        "--prefix", fed.topics.prefix, "--from-site", "a", "--site-cost", "b=1", "--json",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await proc.communicate()
    assert proc.returncode == 0
    costs = {r["agent_id"]: (r["site"], r["network_cost"]) for r in json.loads(out)}
    assert costs == {"cam-b0": ("b", 1.0), "cam-b1": ("b", 1.0), "cam-b2": ("b", 1.0), "llm-cloud": ("cloud", 5.0),
                     "kb-a": ("a", 0.0)}  # fmt: skip


def _air(fed: Federation, agent_id: str, site: str) -> Agent:
    """A PM2.5 station at City Park; every copy has the same card apart from its id and site."""
    return fed.agent(
        agent_id,
        site,
        description="Air-quality station at City Park measuring fine particles (PM2.5)",
        location={"name": "City Park"},
        capabilities=[
            {
                "name": "air",
                "kind": "sensor",
                "max_concurrency": 8,
                "options": {
                    "sensors": [{"name": "pm25", "modality": "pm25", "unit": "µg/m³", "rate_hz": 1.0, "base": 8}]
                },
            }
        ],
    )


QUESTION = "What is the PM2.5 level at City Park?"


async def test_task_at_site_a_is_answered_by_an_agent_only_at_site_b(fed: Federation):
    air = _air(fed, "air-b", "b")
    await fed.start(air)
    async with Orchestrator(fed.settings("a"), topics=fed.topics, site="a", strategy="edge-only") as orch:
        await orch.mirror.wait_for(lambda s: s.count(online=True) == 1, timeout=20)
        r = await orch.submit(QUESTION)
    assert r["state"] == "done" and r["tier"] == "edge", r
    step = next(t for t in r["trace"] if t["ok"])
    assert (step["agent"], step["site"], step["network_cost"]) == ("air-b", "b", 5.0)
    assert isinstance(r["value"], float) and air.counters["served"] == 1


async def test_a_pool_per_site_serves_its_own_tasks_and_private_tasks_never_leave_the_site(fed: Federation):
    """Site a runs a pool of two orchestrators, site b a pool of one, both named "city": submissions and task logs
    are not bridged, so each pool takes its own site's tasks; a public task at a is served by b's station over the
    bridge, a private one is refused at a and nothing of it reaches site b or the hub."""
    from edgecoop.taskclient import TaskClient

    air = _air(fed, "air-b", "b")
    await fed.start(air)
    hub_spy, b_spy = Spy(fed, "cloud"), Spy(fed, "b")
    await fed.start(hub_spy.conn, b_spy.conn)  # type: ignore[arg-type]  # connections, not agents

    def member(site: str, n: int) -> Orchestrator:
        return Orchestrator(fed.settings(site), topics=fed.topics, site=site, pool="city",
                            orchestrator_id=f"{site}-{n}", strategy="edge-only")  # fmt: skip

    async with contextlib.AsyncExitStack() as stack:
        members = [await stack.enter_async_context(member(site, n)) for site, n in (("a", 1), ("a", 2), ("b", 1))]
        for m in members:
            await m.mirror.wait_for(lambda s: s.count(online=True) == 1, timeout=20)
        at_a = await stack.enter_async_context(TaskClient(fed.settings("a"), topics=fed.topics, client_id="ca"))
        at_b = await stack.enter_async_context(TaskClient(fed.settings("b"), topics=fed.topics, client_id="cb"))
        public = await asyncio.gather(*(at_a.submit(QUESTION, task_id=f"pa{i}", timeout=30) for i in range(6)))
        local = await asyncio.gather(*(at_b.submit(QUESTION, task_id=f"pb{i}", timeout=30) for i in range(3)))
        served = air.counters["served"]
        private = await at_a.submit(QUESTION, task_id="private-a", privacy="private", timeout=30)
    assert all(r["state"] == "done" and r["orchestrator"] in ("a-1", "a-2") for r in public), public
    assert {r["trace"][-1]["agent"] for r in public} == {"air-b"}  # over the bridge: no station at a
    assert all(r["state"] == "done" and r["orchestrator"] == "b-1" for r in local), local
    assert private["state"] == "failed" and "stays at its site" in private["reason"], private
    assert air.counters["served"] == served  # the private task's request was never sent
    from edgecoop.wire import decode

    def ended_at_hub() -> bool:
        return any(t.endswith("/tasks/events/private-a") and decode(p)[0].get("state") == "failed"
                   for t, p, _ in hub_spy.seen)  # fmt: skip

    async with asyncio.timeout(10):  # its events cross to the hub (QoS 0, behind the answer), the last one too
        while not ended_at_hub():  # noqa: ASYNC110
            await asyncio.sleep(0.05)
    for spy in (hub_spy, b_spy):  # no request of it; its events (bridged out for dashboards) carry only its state
        assert not [t for t, payload, _ in spy.seen if "/req/" in t and b"private-a" in payload]
        events = [decode(p)[0] for t, p, _ in spy.seen if t.endswith("/tasks/events/private-a")]
        assert not [e for e in events if {"question", "answer", "trace", "plan", "classification"} & set(e)], events
    # each site's task log stays at its site (a's tasks are logged at a only, b's at b only)
    assert not [t for t, _, _ in b_spy.seen if "/tasks/log/pa" in t]
    assert not [t for t, _, _ in hub_spy.seen if "/tasks/log/" in t]


async def test_local_agents_first_then_near_sites_then_cloud(fed: Federation):
    # without the site ranking, the tie-break by agent id would pick air-1 (cloud) first, then air-2 (b)
    local, near, cloud = _air(fed, "air-3", "a"), _air(fed, "air-2", "b"), _air(fed, "air-1", "cloud")
    for agent in (local, near, cloud):
        await agent.__aenter__()
    try:
        async with (
            Orchestrator(fed.settings("a"), topics=fed.topics, orchestrator_id="orch-a", site="a",
                         site_costs={"b": 1, "cloud": 10}) as at_a,
            Orchestrator(fed.settings("b"), topics=fed.topics, orchestrator_id="orch-b", site="b",
                         site_costs={"a": 1, "cloud": 10}) as at_b,
        ):  # fmt: skip
            for orch in (at_a, at_b):
                await orch.mirror.wait_for(lambda s: s.count(online=True) == 3, timeout=20)

            async def first(orch: Orchestrator) -> str:
                r = await orch.submit(QUESTION)
                assert r["state"] == "done", r
                return str(next(t["agent"] for t in r["trace"] if t["ok"]))

            assert (await first(at_a), await first(at_b)) == ("air-3", "air-2")  # each site its own
            await local.__aexit__(None, None, None)  # site a's station goes: the near site, not the cloud
            await at_a.mirror.wait_for(lambda s: s.status("air-3") == (False, local.epoch), timeout=20)
            assert await first(at_a) == "air-2"
            await near.__aexit__(None, None, None)
            await at_a.mirror.wait_for(lambda s: s.status("air-2") == (False, near.epoch), timeout=20)
            assert await first(at_a) == "air-1"  # the cloud is the last resort
    finally:
        for agent in (local, near, cloud):
            await agent.__aexit__(None, None, None)


async def test_hub_killed_and_restarted_every_task_terminal_nothing_lost(fed: Federation):
    air = _air(fed, "air-b", "b")
    await fed.start(air)
    orch = Orchestrator(fed.settings("a"), topics=fed.topics, site="a", strategy="edge-only")
    await fed.stack.enter_async_context(orch)
    await orch.mirror.wait_for(lambda s: s.count(online=True) == 1, timeout=20)
    assert (await orch.submit(QUESTION))["state"] == "done"

    fed.hub.stop(signal.SIGKILL)  # by PID; the hub keeps nothing (no persistence)
    # a long cut: the task fails cleanly within its deadline instead of hanging
    cut = await asyncio.wait_for(orch.submit(QUESTION, deadline_s=3), 10)
    assert cut["state"] in {"failed", "timed_out"} and cut["reason"], cut
    # requests in flight when the hub comes back: the site broker queued them for the bridge
    queued: list[str] = []
    three = asyncio.Event()

    def seen(m: Message) -> None:
        queued.append(str(m.topic))
        if len(queued) == 3:
            three.set()

    watch = Connection(fed.settings("a"), "watch-a", subscriptions=[(fed.topics.site_inbound("b"), 1)], handler=seen)
    await fed.stack.enter_async_context(watch)
    in_flight = [asyncio.create_task(orch.submit(QUESTION, deadline_s=30)) for _ in range(3)]
    await asyncio.wait_for(three.wait(), 10)  # the three requests are in site a's broker, queued for the bridge
    fed.hub.start()
    results = await asyncio.wait_for(asyncio.gather(*in_flight), 40)
    assert {r["state"] for r in results} <= TERMINAL, results
    assert all(r["state"] == "done" or "no reply" in r["reason"] for r in results), results

    await fed.wait_routed()
    after = await asyncio.gather(*(orch.submit(QUESTION) for _ in range(5)))
    assert [r["state"] for r in after] == ["done"] * 5
    for task_id in [cut["task_id"], *(r["task_id"] for r in results + after)]:
        assert (await orch.task(task_id))["state"] in TERMINAL
    # nothing lost after the heal: the restarted hub and a late joiner at a have site b's card and status again
    for site in ("cloud", "a"):
        async with CmsMirror(fed.settings(site), topics=fed.topics) as late:
            await late.wait_for(lambda s: s.status("air-b") == (True, air.epoch), timeout=20)
    # the queued requests were executed at most once each (expired ones are dropped by the agent)
    assert air.counters["served"] <= 1 + 1 + 3 + 5 + getattr(orch.requester, "resent", 0)


async def test_unknown_site_of_a_requester_is_not_reachable_and_times_out(fed: Federation):
    """A requester without a site-qualified reply route cannot be answered across sites: it times out, cleanly."""
    await fed.start(fed.agent("echo-b", "b"))
    cid = f"rq-{uuid.uuid4().hex[:6]}"
    conn = Connection(fed.settings("a"), cid, subscriptions=[Requester.subscription(fed.topics, cid)], clean_start=True)
    req = Requester(conn, fed.topics)  # no site: local topics only
    conn._handler = req.handle
    await fed.stack.enter_async_context(conn)
    with pytest.raises(RequestTimeout):
        await req.request("echo-b", "echo", {}, timeout=1, site="b")
    assert req.in_flight == 0


def test_site_topics_parse_and_route():
    t = Topics("x/v1")
    assert t.parse(t.site_request("b", "cam-1", "vision")) == ParsedTopic(Kind.REQUEST, "cam-1", "vision", "b")
    assert t.parse(t.site_reply("a", "orch")) == ParsedTopic(Kind.REPLY, "orch", site="a")
    with pytest.raises(TopicError):
        t.parse("x/v1/sites/a/agents/+/req/vision")
    text = bridge_config(name="a-uplink", site="a", remote_host="hub", remote_port=1883, prefix="x/v1")
    topics = [line for line in text.splitlines() if line.startswith("topic ")]
    assert topics == [
        "topic x/v1/agents/+/card both 1",
        "topic x/v1/agents/+/status both 1",
        "topic x/v1/sites/a/# in 1",
        "topic x/v1/sites/# out 1",
        "topic x/v1/tasks/events/# out 0",
    ]


def test_site_costs_and_orchestrator_site_flags(tmp_path):
    from edgecoop.cli import _orchestrator_settings, build_parser
    from edgecoop.cms.sites import SiteCosts, parse_site_costs
    from edgecoop.errors import ConfigError

    args = build_parser().parse_args(["orchestrator", "--site", "a", "--site-cost", "b=1", "--site-cost", "cloud=10"])
    conf, _, _ = _orchestrator_settings(args)
    assert (conf["site"], parse_site_costs(conf["site_costs"])) == ("a", {"b": 1.0, "cloud": 10.0})
    toml = tmp_path / "orchestrator.toml"
    toml.write_text('[orchestrator]\nsite = "b"\nsite_costs = { a = 1, cloud = 10 }\n')
    conf, _, _ = _orchestrator_settings(build_parser().parse_args(["orchestrator", "--config", str(toml)]))
    assert (conf["site"], parse_site_costs(conf["site_costs"])) == ("b", {"a": 1.0, "cloud": 10.0})
    for bad in (["b"], ["b=near"], ["a/b=1"]):
        with pytest.raises(ConfigError):
            parse_site_costs(bad)
    with pytest.raises(ConfigError):
        SiteCosts("a", {"b": -1})
    costs = SiteCosts("a", {"b": 1, "cloud": 10})
    assert [costs.cost(s) for s in ("a", "b", "cloud", "elsewhere", None)] == [0.0, 1.0, 10.0, 5.0, 0.0]
    assert SiteCosts().cost("b") == 0.0 and not SiteCosts().is_remote("b")


def test_near_first_keeps_relevance_first():
    from edgecoop.cms.discovery import Match
    from edgecoop.cms.sites import SiteCosts

    def m(agent: str, score: float, site: str) -> Match:
        return Match(agent, score, {"site": site})

    costs = SiteCosts("a", {"b": 1, "cloud": 10})
    ranked = [m("cloud-1", 9.0, "cloud"), m("b-1", 9.0, "b"), m("a-1", 9.0, "a"), m("a-2", 5.0, "a")]
    # exact ties only (place-bound data): a farther exact match still beats a weaker local one
    assert [x.agent_id for x in costs.near_first(ranked)] == ["a-1", "b-1", "cloud-1", "a-2"]
    # a band of 0.5: the local agent within half the best score goes first
    assert [x.agent_id for x in costs.near_first(ranked, band=0.5)] == ["a-1", "a-2", "b-1", "cloud-1"]
    assert costs.near_first([m("x", 1.0, "b"), m("y", 3.0, "a")], band=0.5)[0].agent_id == "y"
    assert [x.agent_id for x in SiteCosts().near_first(ranked)] == ["cloud-1", "b-1", "a-1", "a-2"]
