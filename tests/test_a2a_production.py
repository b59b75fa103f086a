"""The A2A gateway under the production broker configuration, as generated: passwords, the ACL with its `$a2a` lines,
``use_username_as_clientid`` on the agents' listener and the gateway's own loopback listener
(``production_config(a2a_port=...)``). One private Mosquitto for the module, never the machine's port 1883."""

from __future__ import annotations

import asyncio
import json
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from edgecoop.agents import Agent
from edgecoop.broker import MosquittoProcess
from edgecoop.broker.configs import production_acl, production_config
from edgecoop.broker.manager import free_port
from edgecoop.connection import BrokerSettings, Connection, Message, props
from edgecoop.errors import ConfigError, PublishRejected
from edgecoop.interop import A2AGateway
from edgecoop.scenarios.loader import load_scenario

pytestmark = pytest.mark.timeout(90)

ORG, UNIT = "edgecoop", "district-1"
ME, OTHER = f"{ORG}/{UNIT}/me", f"{ORG}/home-1/other"  # A2A clients: user name = the binding's client id
USERS = ("air-park", "cam-01", "a2a-gateway", ME, OTHER)
NOT_AUTHORIZED = 0x87


@dataclass
class Broker:
    process: MosquittoProcess
    a2a_port: int
    passwords: dict[str, str]

    def settings(self, user: str, *, gateway_listener: bool = False) -> BrokerSettings:
        port = self.a2a_port if gateway_listener else self.process.port
        return BrokerSettings(port=port, username=user, password=self.passwords[user], keepalive=5)

    def kicked(self) -> int:
        log = self.process.log_file
        return log.read_text(errors="replace").count("already connected, closing old connection") if log.exists() else 0


@pytest.fixture(scope="module")
def production() -> Iterator[Broker]:
    work = Path(tempfile.mkdtemp(prefix="edgecoop-a2a-prod-"))
    work.chmod(0o755)  # a root-started Mosquitto reads these files as user mosquitto
    port, a2a_port = free_port(), free_port()
    conf = production_config(port=port, websockets_port=None, tls_port=None, etc_dir=str(work), data_dir=str(work),
                             a2a_port=a2a_port)  # fmt: skip
    assert f"listener {a2a_port} 127.0.0.1\n" in conf
    conf = conf.replace(f"listener {port}\n", f"listener {port} 127.0.0.1\n")  # loopback only on a shared machine
    conf = conf.replace(f"# persistence_location {work}/\n", f"persistence_location {work}/\n")
    conf += f"log_dest file {work}/mosquitto.log\n"
    (work / "edgecoop.acl").write_text(production_acl())
    passwords = {u: f"pw-{uuid.uuid4().hex[:8]}" for u in USERS}
    passwd = work / "edgecoop.passwd"
    for i, (user, password) in enumerate(passwords.items()):
        subprocess.run(["mosquitto_passwd", "-b", *(["-c"] if i == 0 else []), str(passwd), user, password], check=True)
    with MosquittoProcess(port, config_text=conf, workdir=work) as process:
        yield Broker(process, a2a_port, passwords)


class A2AClient:
    """An A2A requester provisioned as the production ACL expects: user name = client id ``{org}/{unit}/{name}``."""

    def __init__(self, broker: Broker, user: str) -> None:
        self.user = user
        self.reply_topic = f"$a2a/v1/reply/{user}/{uuid.uuid4().hex[:8]}"
        self.cards: dict[str, tuple[dict[str, Any], dict[str, str]]] = {}
        self.replies: dict[bytes, dict[str, Any]] = {}
        self.foreign: list[str] = []  # messages on reply topics that are not ours
        self.changed = asyncio.Event()
        s = broker.settings(user)
        self.conn = Connection(s, user, clean_start=True, handler=self._on_message,
                               subscriptions=[(f"$a2a/v1/discovery/{ORG}/+/+", 1), (self.reply_topic, 1)])  # fmt: skip

    def _on_message(self, m: Message) -> None:
        topic = str(m.topic)
        payload = m.payload if isinstance(m.payload, bytes) else b""
        if topic.startswith("$a2a/v1/discovery/") and payload:
            self.cards[topic.rsplit("/", 1)[-1]] = (json.loads(payload), dict(m.properties.UserProperty))
        elif topic.startswith("$a2a/v1/reply/"):
            if topic != self.reply_topic:
                self.foreign.append(topic)
            self.replies[bytes(m.properties.CorrelationData)] = json.loads(payload)
        self.changed.set()

    async def until(self, predicate, timeout: float = 20.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                self.changed.clear()
                await self.changed.wait()

    async def send(self, agent: str, text: str, *, reply_topic: str | None = None) -> bytes:
        corr = uuid.uuid4().bytes
        body = {"jsonrpc": "2.0", "id": 1, "method": "SendMessage", "params": {"message": {
            "messageId": uuid.uuid4().hex, "role": "ROLE_USER", "parts": [{"text": text}], "taskId": str(uuid.uuid4())}}}  # fmt: skip
        await self.conn.publish(f"$a2a/v1/request/{ORG}/{UNIT}/{agent}", json.dumps(body).encode(),
                                properties=props(ResponseTopic=reply_topic or self.reply_topic, CorrelationData=corr))  # fmt: skip
        return corr


async def test_the_gateway_works_on_its_listener_and_clients_see_only_their_own_replies(production):
    (config,) = load_scenario("urban", production.settings("air-park"), include={"air-park"})
    kicked = production.kicked()
    gw_settings = production.settings("a2a-gateway", gateway_listener=True)
    me, other = A2AClient(production, ME), A2AClient(production, OTHER)
    async with (
        Agent(config),
        A2AGateway(gw_settings, org=ORG, site=UNIT, orchestrator="city") as gw,
        me.conn,
        other.conn,
    ):
        await me.until(lambda: me.cards.get("air-park", ({}, {}))[1].get("a2a-status") == "online")
        card, _ = me.cards["air-park"]
        assert card["skills"][0]["id"] == "air" and "city" in me.cards

        corr = await me.send("air-park", "pm25")
        await me.until(lambda: corr in me.replies)
        task = me.replies[corr]["result"]["task"]
        assert task["status"]["state"] == "TASK_STATE_COMPLETED", me.replies[corr]
        assert task["artifacts"][0]["parts"][1]["data"]["sensor"] == "pm25"

        # another unit's client subscribed to my reply topic (the broker grants it) never receives my answer
        await other.conn.subscribe(f"$a2a/v1/reply/{ME}/#")
        corr = await me.send("air-park", "no2")
        mine = await other.send("air-park", "pm25")  # answered after mine: other's own reply arrives last
        await me.until(lambda: corr in me.replies)
        await other.until(lambda: mine in other.replies)
        assert corr not in other.replies and not other.foreign

        # every gateway connection kept its client id: none was taken over, none reconnected
        conns = [gw.conn, *(ep.conn for ep in gw.endpoints.values())]
        assert gw._city is not None
        conns.append(gw._city.conn)
        assert all(c.counters.connects == 1 and c.counters.disconnects == 0 for c in conns)
        assert {ep.conn.client_id for ep in gw.endpoints.values()} == {f"{ORG}/{UNIT}/air-park"}
    assert production.kicked() == kicked


async def test_an_agent_may_publish_only_its_own_a2a_card(production):
    async with Connection(production.settings("air-park"), "air-park", clean_start=True) as agent:
        await agent.publish("$a2a/v1/discovery/some-org/some-unit/air-park", b"{}", qos=1)
        for foreign in ("$a2a/v1/discovery/some-org/some-unit/cam-01", f"$a2a/v1/discovery/{ORG}/{UNIT}/city"):
            with pytest.raises(PublishRejected) as err:
                await agent.publish(foreign, b"{}", qos=1)
            assert err.value.reason_code == NOT_AUTHORIZED
        await agent.publish("$a2a/v1/discovery/some-org/some-unit/air-park", b"", qos=1, retain=True)
    async with Connection(production.settings(ME), ME, clean_start=True) as client:
        await client.publish(f"$a2a/v1/discovery/{ME}", b"", qos=1, retain=True)  # an A2A client: its own card
        with pytest.raises(PublishRejected):
            await client.publish(f"$a2a/v1/discovery/{OTHER}", b"{}", qos=1)


async def test_on_the_agents_listener_the_gateway_refuses_to_start(production):
    """``use_username_as_clientid`` would give every per-agent connection the client id ``a2a-gateway``: the gateway
    finds out with two probe connections and says so, instead of connections taking each other over forever."""
    gw = A2AGateway(production.settings("a2a-gateway"), org=ORG, site=UNIT)
    with pytest.raises(ConfigError, match="use_username_as_clientid"):
        async with asyncio.timeout(20):
            await gw.__aenter__()
    assert not gw.endpoints


def test_the_gateway_listener_is_opt_in_and_the_only_one_without_the_client_id_rule(capsys):
    from edgecoop.cli import main

    assert main(["broker", "--print-config", "production"]) == 0
    assert "127.0.0.1" not in capsys.readouterr().out
    assert main(["broker", "--print-config", "production", "--a2a-listener", "1884"]) == 0
    listeners = capsys.readouterr().out.split("\nlistener ")[1:]
    rule = {block.split("\n", 1)[0]: "use_username_as_clientid true" in block for block in listeners}
    assert rule == {"1883": True, "8883": True, "9001": True, "1884 127.0.0.1": False}, rule
