"""The A2A-over-MQTT gateway, driven by clients we did not write: EMQX's ``a2a-over-mqtt`` SDK (its requester, with
its own retry profile, and its discovery helpers) and the official ``a2a-sdk`` types, which every card and every
reply must parse into (proto-JSON, REQUIRED fields present). Real Mosquitto (the session broker), real agents, a
real orchestrator; each test uses its own A2A org so retained ``$a2a`` cards never leak between tests."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

pytest.importorskip("a2a_over_mqtt")
pytest.importorskip("a2a")

from a2a.types import AgentCard, StreamResponse
from a2a.utils.proto_utils import validate_proto_required_fields
from a2a_over_mqtt import (
    REPLY_ARTIFACT,
    REPLY_ERROR,
    REPLY_SUBMITTED,
    REPLY_TERMINAL,
    A2ARequest,
    MqttConfig,
    Requester,
    TopicSpace,
    build_card,
    make_properties,
    parse_card,
)
from google.protobuf import json_format

from edgecoop.agents import Agent
from edgecoop.connection import Connection
from edgecoop.interop import A2AGateway
from edgecoop.interop.a2a import PROTOCOL_BINDING
from edgecoop.orchestrator import Orchestrator
from edgecoop.scenarios.loader import load_scenario


def _org(topics) -> str:
    return topics.prefix.split("/")[0][:40]


def validate_card(doc: dict[str, Any]) -> AgentCard:
    """The official A2A v1.0 types: unknown fields and wrong types raise, REQUIRED fields must be set."""
    card = json_format.ParseDict(doc, AgentCard())
    validate_proto_required_fields(card)
    return card


def validate_stream_item(body: dict[str, Any]) -> None:
    assert body["jsonrpc"] == "2.0"
    if "result" in body:
        item = json_format.ParseDict(body["result"], StreamResponse())  # task | message | statusUpdate | artifactUpdate
        validate_proto_required_fields(item)


class Discovery:
    """What an A2A client sees: the SDK's discovery filter per unit, cards parsed with the SDK's parse_card, the
    a2a-status user properties of each retained card."""

    def __init__(self, port: int, org: str, units: list[str]) -> None:
        self.cfg = MqttConfig(port=port, host="127.0.0.1")
        self.spaces = [TopicSpace(org=org, unit=u) for u in units]
        self.cards: dict[str, dict[str, Any]] = {}
        self.status: dict[str, dict[str, str]] = {}
        self.changed = asyncio.Event()

    async def run(self, ready: asyncio.Event) -> None:
        async with aiomqtt.Client(**self.cfg.client_kwargs(identifier=f"disc-{uuid.uuid4().hex[:6]}")) as client:
            for space in self.spaces:
                await client.subscribe(space.discovery_wildcard(), qos=1)
            ready.set()
            async for m in client.messages:
                agent = str(m.topic).rsplit("/", 1)[-1]
                if not m.payload:
                    self.cards.pop(agent, None)
                    self.status.pop(agent, None)
                else:
                    self.cards[agent] = parse_card(m.payload)
                    self.status[agent] = dict(getattr(m.properties, "UserProperty", []) or [])
                self.changed.set()

    async def until(self, predicate, timeout: float = 20.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                self.changed.clear()
                await self.changed.wait()


@pytest.fixture
async def discovery(settings, topics) -> AsyncIterator[Any]:
    tasks: list[asyncio.Task[None]] = []

    async def start(units: list[str]) -> Discovery:
        d = Discovery(settings.port, _org(topics), units)
        ready = asyncio.Event()
        tasks.append(asyncio.create_task(d.run(ready)))
        await asyncio.wait_for(ready.wait(), 10)
        return d

    yield start
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def requester(settings, topics, unit: str, **kw: Any) -> Requester:
    return Requester(MqttConfig(host="127.0.0.1", port=settings.port), TopicSpace(org=_org(topics), unit=unit),
                     requester_id="tester", **kw)  # fmt: skip


async def ask(req: Requester, agent: str, payload: str) -> list[tuple[str, str]]:
    out = []
    async with asyncio.timeout(60):
        async for kind, content in req.stream(agent, payload, uuid.uuid4().hex[:16]):
            out.append((kind, content))
    return out


def send(text: str, *, task_id: str | None = None, **variables: str) -> str:
    return A2ARequest(text=text, request_id=uuid.uuid4().hex[:8], task_id=task_id, variables=variables).to_json()


class RawClient:
    """An MQTT 5 client that sends whatever bytes it is given, for the malformed-input tests."""

    def __init__(self, settings, topics, unit: str = "elsewhere") -> None:
        self.cfg = MqttConfig(host="127.0.0.1", port=settings.port)
        self.reply_topic = TopicSpace(org=_org(topics), unit=unit).reply("raw", uuid.uuid4().hex[:8])
        self.replies: dict[bytes, list[dict[str, Any]]] = {}
        self.arrived = asyncio.Event()

    async def __aenter__(self) -> RawClient:
        self._client = aiomqtt.Client(**self.cfg.client_kwargs(identifier=f"raw-{uuid.uuid4().hex[:6]}"))
        await self._client.__aenter__()
        await self._client.subscribe(self.reply_topic, qos=1)
        self._task = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        await self._client.__aexit__(None, None, None)

    async def _read(self) -> None:
        async for m in self._client.messages:
            corr = bytes(getattr(m.properties, "CorrelationData", b"") or b"")
            self.replies.setdefault(corr, []).append(json.loads(m.payload))
            self.arrived.set()

    async def send(self, topic: str, payload: bytes, *, response_topic: str | None = "", corr: str | None = None):
        corr = corr if corr is not None else uuid.uuid4().hex[:12]
        rt = self.reply_topic if response_topic == "" else response_topic
        await self._client.publish(topic, payload, qos=1, properties=make_properties(rt, corr))
        return corr.encode()

    async def reply(self, corr: bytes, timeout: float = 10.0) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            while not self.replies.get(corr):
                self.arrived.clear()
                await self.arrived.wait()
        return self.replies[corr][0]


# -- discovery --------------------------------------------------------------------------------------------------
def test_our_binding_name_is_the_sdks():
    card = build_card(name="x", description="y", url="mqtt://127.0.0.1:1883")
    assert card["supportedInterfaces"][0]["protocolBinding"] == PROTOCOL_BINDING
    # (the SDK's own default card is not valid A2A v1.0: its generated skill has no tags, a REQUIRED field)
    with pytest.raises(Exception, match="Validation failed"):
        validate_card(card)


@pytest.mark.timeout(120)
async def test_every_scenario_agent_is_discovered_with_a_valid_a2a_card(settings, topics, discovery, monkeypatch):
    monkeypatch.setenv("EDGECOOP_CLOUD_URL", "http://127.0.0.1:9/v1")  # never called: only its card is needed
    # every agent of both scenarios but the two SLM ones (a GGUF model each: the llm-marked tests cover them)
    configs = load_scenario("urban", settings, prefix=topics.prefix, exclude={"slm-edge", "slm-gateway"})
    configs += load_scenario("health", settings, prefix=topics.prefix, with_cloud=False, exclude={"phone-slm"})
    agents = [Agent(c) for c in configs]
    units = sorted({c.site for c in configs} | {"district-1"})
    disc = await discovery(units)
    try:
        for a in agents:
            await a.__aenter__()
        async with A2AGateway(settings, topics=topics, org=_org(topics), site="district-1"):
            names = {c.agent_id for c in configs} | {"city"}
            await disc.until(lambda: names <= set(disc.cards) and all(
                disc.status[n].get("a2a-status") == ("online" if n != "city" else "offline") for n in names))  # fmt: skip
            for name, doc in disc.cards.items():
                card = validate_card(doc)
                assert disc.status[name]["a2a-status-source"] == "agent"
                assert card.supported_interfaces[0].url == settings.url
                if name == "city":
                    continue
                assert card.skills and all(s.examples and s.tags for s in card.skills)
                [ext] = card.capabilities.extensions
                params = json_format.MessageToDict(ext.params)
                assert params["agentId"] == name and params["privacy"] in ("public", "site", "private")
                assert {"hardware", "models", "sensors", "load"} <= set(params)
            wearable = disc.cards["wearable"]
            dev = wearable["capabilities"]["extensions"][0]["params"]
            assert dev["site"] == "home-1" and dev["privacy"] == "private"
            assert {s["id"] for s in wearable["skills"]} == {"vitals"}
            print(json.dumps(disc.cards["air-park"], indent=1))  # the closing note quotes one
    finally:
        for a in agents:
            await a.__aexit__(None, None, None)


# -- requests ----------------------------------------------------------------------------------------------------
async def test_a_data_request_through_the_sdk_requester(settings, topics):
    [config] = load_scenario("urban", settings, prefix=topics.prefix, include={"air-park"})
    async with Agent(config), A2AGateway(settings, topics=topics, org=_org(topics), orchestrator=None) as gw:
        # the SDK addresses agents of its own unit (its TopicSpace): air-park is in district-1
        replies = await ask(requester(settings, topics, "district-1"), "air-park", send("pm25"))
        [(kind, text)] = replies
        assert kind == REPLY_TERMINAL and text.startswith("pm25 = "), replies
        assert gw.counters["requests"] == 1


async def test_private_agents_refuse_requesters_of_other_units(settings, topics):
    [config] = load_scenario("health", settings, prefix=topics.prefix, include={"wearable"})
    async with Agent(config), A2AGateway(settings, topics=topics, org=_org(topics), orchestrator=None) as gw:
        # the SDK only addresses agents of its own unit: a requester of another unit is a raw MQTT 5 client
        async with RawClient(settings, topics, "district-1") as raw:
            topic = TopicSpace(org=_org(topics), unit="home-1").request("wearable")
            reply = await raw.reply(await raw.send(topic, send("heart_rate").encode()))
        assert reply["error"]["code"] == -32000
        assert reply["error"]["message"] == "Permission denied: wearable serves requesters of unit home-1 only"
        assert reply["error"]["data"][0]["reason"] == "PERMISSION_DENIED"
        inside = await ask(requester(settings, topics, "home-1"), "wearable", send("heart_rate"))
        assert inside[-1][0] == REPLY_TERMINAL and "heart_rate" in inside[-1][1]
        assert gw.counters["refused_outside_site"] == 1


async def test_a_retry_of_the_same_task_id_runs_once(settings, topics, make_agent, client):
    """The SDK retries with new Correlation Data after its first-reply timeout; the gateway answers the retry
    with the existing task, and the agent executes once."""
    agent = make_agent("slow-echo", capabilities=[{"kind": "echo", "options": {"delay_s": 1.2}}])
    seen: list[str] = []
    watch = Connection(settings, f"w-{uuid.uuid4().hex[:6]}", subscriptions=[(topics.agent_requests("slow-echo"), 1)],
                       handler=lambda m: seen.append(str(m.topic)), clean_start=True)  # fmt: skip
    async with agent, watch, A2AGateway(settings, topics=topics, org=_org(topics), orchestrator=None) as gw:
        req = requester(settings, topics, "default", first_reply_timeout=0.4)
        payload = send("hello", task_id=str(uuid.uuid4()))
        replies = await ask(req, "slow-echo", payload)
        assert replies[-1][0] == REPLY_TERMINAL and '"text": "hello"' in replies[-1][1]
        assert gw.counters["deduplicated"] >= 1
        again = await ask(requester(settings, topics, "default"), "slow-echo", payload)  # a later retry
        assert again == [replies[-1]]
        other_context = json.loads(payload)
        other_context["params"]["message"]["contextId"] = str(uuid.uuid4())
        mismatch = await ask(requester(settings, topics, "default"), "slow-echo", json.dumps(other_context))
        assert mismatch == [(REPLY_ERROR, "context_id mismatch: this Task.id has another contextId")]
        await client.req.request("slow-echo", "echo", {}, timeout=5)  # a barrier through the same agent
        assert len(seen) == 2  # the A2A task once (not once per attempt nor per retry), then the barrier


async def test_streaming_echo_through_send_streaming_message(settings, topics, make_agent):
    async with make_agent("streamer"), A2AGateway(settings, topics=topics, org=_org(topics), orchestrator=None):
        async with RawClient(settings, topics, "default") as raw:
            body = json.loads(send("one two three"))
            body["method"] = "SendStreamingMessage"
            topic = TopicSpace(org=_org(topics), unit="default").request("streamer")
            corr = await raw.send(topic, json.dumps(body).encode())
            async with asyncio.timeout(10):
                while not raw.replies.get(corr) or "statusUpdate" not in raw.replies[corr][-1].get("result", {}):
                    raw.arrived.clear()
                    await raw.arrived.wait()
            items = raw.replies[corr]
        for item in items:
            validate_stream_item(item)
        chunks = [i["result"]["artifactUpdate"]["artifact"]["parts"][0]["text"] for i in items
                  if i["result"].get("artifactUpdate", {}).get("artifact", {}).get("artifactId") == "stream"]  # fmt: skip
        assert chunks == ["one", "two", "three"]
        assert "task" in items[0]["result"]
        assert items[-1]["result"]["statusUpdate"]["status"]["state"] == "TASK_STATE_COMPLETED"
        # the SDK's own classification of the same stream
        with_sdk = await ask(requester(settings, topics, "default"), "streamer", json.dumps({**body, "params": {
            **body["params"], "message": {**body["params"]["message"], "taskId": str(uuid.uuid4())}}}))  # fmt: skip
        kinds = [k for k, _ in with_sdk]
        assert kinds[0] == REPLY_SUBMITTED and kinds[-1] == REPLY_TERMINAL and kinds.count(REPLY_ARTIFACT) >= 4


async def test_malformed_json_rpc_gets_error_replies_and_the_gateway_keeps_serving(settings, topics, make_agent):
    async with make_agent("echo-a"), A2AGateway(settings, topics=topics, org=_org(topics), orchestrator=None) as gw:
        topic = TopicSpace(org=_org(topics), unit="default").request("echo-a")
        async with RawClient(settings, topics, "default") as raw:
            cases = {
                b"\xff not json": -32700,
                b"[1, 2]": -32600,
                b'{"jsonrpc": "1.0", "id": 1, "method": "SendMessage"}': -32600,
                b'{"jsonrpc": "2.0", "id": 2, "method": "Frobnicate", "params": {}}': -32601,
                b'{"jsonrpc": "2.0", "id": 3, "method": "SendMessage", "params": {"message": '
                b'{"parts": [{"text": "x"}]}}}': -32005,
                b'{"jsonrpc": "2.0", "id": 4, "method": "SendMessage", "params": {"message": '
                b'{"taskId": "not-a-uuid", "parts": [{"text": "x"}]}}}': -32005,
                b'{"jsonrpc": "2.0", "id": 5, "method": "SendMessage", "params": {"message": "x"}}': -32602,
                b'{"jsonrpc": "2.0", "id": 6, "method": "GetTask", "params": {"id": "nope"}}': -32001,
                b'{"jsonrpc": "2.0", "id": 7, "method": "SendMessage", "params": {"message": {"taskId": "'
                + str(uuid.uuid4()).encode()
                + b'", "parts": [{"text": "x"}], "metadata": {"skill": "missing"}}}}': -32602,
            }
            for payload, code in cases.items():
                corr = await raw.send(topic, payload)
                reply = await raw.reply(corr)
                assert reply["error"]["code"] == code, (payload, reply)
                if code == -32005:
                    assert reply["error"]["data"] == {"a2a_error": "transport_protocol_error"}
            # no reply path, or a reply path outside $a2a/v1/reply/: dropped, never written
            await raw.send(topic, b'{"jsonrpc": "2.0", "id": 8, "method": "SendMessage"}', response_topic=None)
            await raw.send(topic, b"{}", response_topic=topics.card("echo-a"))
            ok = await ask(requester(settings, topics, "default"), "echo-a", send("still here"))
            assert ok[-1][0] == REPLY_TERMINAL and "still here" in ok[-1][1]
        assert gw.counters["no_reply_path"] == 1 and gw.counters["bad_response_topic"] == 1
        assert gw.counters["internal_errors"] == 0


# -- the orchestrator as an A2A agent ------------------------------------------------------------------------------
@pytest.mark.timeout(90)
async def test_ask_the_city_submits_a_task_and_private_tasks_stay_in_their_unit(settings, topics, discovery):
    configs = load_scenario("urban", settings, prefix=topics.prefix, include={"air-park", "air-station", "kb-city"})
    configs += load_scenario("health", settings, prefix=topics.prefix, include={"wearable"})
    agents = [Agent(c) for c in configs]
    disc = await discovery(["district-1"])
    try:
        for a in agents:
            await a.__aenter__()
        async with A2AGateway(settings, topics=topics, org=_org(topics), site="district-1") as gw:
            await disc.until(lambda: disc.status.get("city", {}).get("a2a-status") == "offline")
            async with Orchestrator(settings, topics=topics):
                await disc.until(lambda: disc.status.get("city", {}).get("a2a-status") == "online")
                validate_card(disc.cards["city"])
                inside = requester(settings, topics, "district-1")
                replies = await ask(inside, "city", send("What is the PM2.5 level at City Park?"))
                kind, text = replies[-1]
                assert (kind == REPLY_TERMINAL and "PM2.5" in text) or "pm25" in text.lower(), replies
                async with RawClient(settings, topics, "elsewhere") as outside:
                    topic = TopicSpace(org=_org(topics), unit="district-1").request("city")
                    refused = await outside.reply(
                        await outside.send(topic, send("What is my heart rate?").encode()), 60
                    )
                    public = await outside.reply(
                        await outside.send(topic, send("What is the NO2 level at Central Station?").encode()), 60
                    )
                assert refused["error"]["code"] == -32000, refused
                assert "private tasks answer requesters of unit district-1 only" in refused["error"]["message"]
                assert public["result"]["task"]["status"]["state"] == "TASK_STATE_COMPLETED", public
                validate_stream_item(public)
            await disc.until(lambda: disc.status.get("city", {}).get("a2a-status") == "offline")
            assert gw.counters["refused_outside_site"] == 1
    finally:
        for a in agents:
            await a.__aexit__(None, None, None)


# -- presence ------------------------------------------------------------------------------------------------------
AGENT = """
import asyncio, sys
from edgecoop.agents import Agent
from edgecoop.agents.config import config_from_dict
from edgecoop.connection import BrokerSettings
cfg = config_from_dict({"agent": {"id": sys.argv[3]}, "capabilities": [{"kind": "echo"}]},
                       broker=BrokerSettings(port=int(sys.argv[1]), keepalive=5), prefix=sys.argv[2])
async def main():
    async with Agent(cfg) as a:
        print("up", flush=True)
        await a.serve_forever()
asyncio.run(main())
"""


@pytest.mark.timeout(60)
async def test_agent_death_and_deregistration_and_the_gateways_own_last_will(settings, topics, discovery, make_agent):
    disc = await discovery(["default"])
    proc = subprocess.Popen([sys.executable, "-c", AGENT, str(settings.port), topics.prefix, "mortal"],
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    gateway = None
    try:
        assert (await asyncio.to_thread(proc.stdout.readline)).strip() == "up"
        async with make_agent("leaver") as leaver:
            gateway = subprocess.Popen(
                [str(Path(sys.executable).with_name("edgecoop")), "a2a-gateway", "--broker", settings.url, "--prefix",
                 topics.prefix, "--org", _org(topics), "--no-orchestrator"],
                stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            online = {"a2a-status": "online", "a2a-status-source": "agent"}
            await disc.until(lambda: disc.status.get("mortal") == online and disc.status.get("leaver") == online)
            os.kill(proc.pid, signal.SIGKILL)  # the agent dies: its edgecoop Last Will, then its A2A card offline
            await disc.until(lambda: disc.status["mortal"].get("a2a-status") == "offline")
            dead = await ask(requester(settings, topics, "default"), "mortal", send("anyone?"))
            assert dead == [(REPLY_ERROR, "mortal is offline")]
            await leaver.deregister()  # an empty retained card: the A2A card is cleared too
            await disc.until(lambda: "leaver" not in disc.cards)
            gateway.kill()  # the gateway dies: every card it served goes offline by its Last Will
            await disc.until(lambda: disc.status.get("mortal", {}).get("a2a-status-source") == "lwt")
            assert disc.status["mortal"]["a2a-status"] == "offline"
            validate_card(disc.cards["mortal"])
    finally:
        for p in (proc, gateway):
            if p is not None:
                p.kill()
                p.wait()
                p.stdout.close()


def test_the_gateway_unit_verifies_and_runs_a_valid_command(tmp_path):
    from edgecoop.cli import build_parser
    from tests.test_systemd import EDGECOOP_BIN, UNIT_DIR, parse_unit, verify

    name = "edgecoop-a2a-gateway.service"
    fake = tmp_path / "edgecoop"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    (tmp_path / name).write_text((UNIT_DIR / name).read_text().replace(EDGECOOP_BIN, str(fake)))
    assert verify(tmp_path / name) == "rc=0"
    unit = parse_unit(UNIT_DIR / name)
    assert unit["Service"]["Type"] == ["notify"] and unit["Install"]["WantedBy"] == ["edgecoop.target"]
    [exec_start] = unit["Service"]["ExecStart"]
    args = build_parser().parse_args(shlex.split(exec_start)[1:])
    assert args.func.__name__ == "cmd_a2a_gateway" and args.org == "edgecoop"


@pytest.mark.timeout(120)
def test_bench_a2a_reports_both_sides_from_one_run():
    from edgecoop.benchmarks.a2a import A2AParams, run

    r = run(A2AParams(sequential=40, warmup=10, pipelined=60, in_flight=4, blocks=2))
    assert r["sequential_samples"] == 40 and r["a2a_answers"] == 60 and r["a2a_error_replies"] == 0
    assert r["a2a_p50_ms"] > 0 and r["ours_p50_ms"] > 0 and r["a2a_rps"] > 0
    assert r["params"]["tcp_nodelay"] is True


@pytest.mark.parametrize("request_id", ["r-1", 7, None, 'q"uote'])
def test_a_reply_around_an_encoded_result_is_the_same_json(request_id):
    from edgecoop.interop.a2a import json_bytes, raw_result_reply, result_reply, task

    t = task(str(uuid.uuid4()), "ctx", "completed", text='ünïcode "quoted"', metadata={"n": 1.5})
    assert json.loads(raw_result_reply(request_id, json_bytes(t), wrap="task")) == json.loads(
        result_reply(request_id, {"task": t})
    )
    assert json.loads(raw_result_reply(request_id, json_bytes(t))) == json.loads(result_reply(request_id, t))


@pytest.mark.llm
@pytest.mark.timeout(180)
async def test_an_slm_answers_send_streaming_message_token_by_token(settings, topics, make_agent):
    """The real SmolLM2-135M through llama.cpp: its tokens stream as A2A artifact updates, then the whole answer."""
    pytest.importorskip("llama_cpp")
    from edgecoop.models import resolve_model

    options = {"model": str(resolve_model("smollm2-135m")), "max_tokens": 24, "n_threads": 1}
    caps = [{"kind": "slm", "max_concurrency": 1, "options": options}]
    async with make_agent("slm-a2a", capabilities=caps), A2AGateway(settings, topics=topics, org=_org(topics),
                                                                     orchestrator=None):  # fmt: skip
        async with RawClient(settings, topics, "default") as raw:
            body = json.loads(send("Name one colour of the sky."))
            body["method"] = "SendStreamingMessage"
            topic = TopicSpace(org=_org(topics), unit="default").request("slm-a2a")
            corr = await raw.send(topic, json.dumps(body).encode())
            async with asyncio.timeout(120):
                while not raw.replies.get(corr) or "statusUpdate" not in raw.replies[corr][-1].get("result", {}):
                    raw.arrived.clear()
                    await raw.arrived.wait()
            items = raw.replies[corr]
        for item in items:
            validate_stream_item(item)
        updates = [i["result"]["artifactUpdate"] for i in items if "artifactUpdate" in i["result"]]
        tokens = [u["artifact"]["parts"][0]["text"] for u in updates if u["artifact"]["artifactId"] == "stream"]
        [final] = [u for u in updates if u["artifact"]["artifactId"] == "result"]
        assert len(tokens) >= 2, items  # streamed, not one final message
        answer = final["artifact"]["parts"][0]["text"]
        assert answer.strip() and answer.strip() == "".join(tokens).strip(), (answer, tokens)
        assert items[-1]["result"]["statusUpdate"]["status"]["state"] == "TASK_STATE_COMPLETED"
