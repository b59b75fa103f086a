"""Security under the production broker configuration: passwords, the per-agent ACL, client id = username.

One private Mosquitto per module runs :func:`production_config` and :func:`production_acl` as generated, with
only what a test on a shared machine must change (loopback listener, persistence and log in a temp dir), and
passwords made with ``mosquitto_passwd`` as ``systemd/install.sh`` makes them. Never the machine's port 1883.

Measured on Mosquitto 2.0.11 (MQTT 5): a forbidden QoS 1 publish gets PUBACK 0x87 (Not authorized) and surfaces as
:class:`PublishRejected`; bad credentials get CONNACK 0x87 and surface as :class:`ConnectError` at once; a forbidden
subscription is *granted* (SUBACK 0x01) but the broker never delivers what the ACL does not let the user read; a
Last Will on a topic the user may not write is silently not published.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiomqtt
import pytest
from paho.mqtt.reasoncodes import ReasonCode

from edgecoop.agents import Agent
from edgecoop.broker import MosquittoProcess
from edgecoop.broker.configs import production_acl, production_config
from edgecoop.broker.manager import free_port
from edgecoop.cms.mirror import CmsMirror
from edgecoop.connection import BrokerSettings, Connection, Message, props
from edgecoop.errors import ConnectError, PublishRejected
from edgecoop.messages import CapabilityCard, Reading, Response, Status
from edgecoop.rpc import Requester
from edgecoop.topics import Topics
from edgecoop.wire import decode, encode
from tests.conftest import agent_config

T = Topics()  # the production ACL is written for the default prefix
NOT_AUTHORIZED = 0x87
USERS = ("cam-01", "cam-02", "air-01", "air-02", "cam-03", "cam-04", "air-park", "orchestrator", "cms", "dashboard")


@dataclass
class ProductionBroker:
    process: MosquittoProcess
    passwords: dict[str, str]

    @property
    def port(self) -> int:
        return self.process.port

    def settings(self, user: str | None, password: str | None = None, **kw: object) -> BrokerSettings:
        pw = password if password is not None else self.passwords.get(user or "")
        return BrokerSettings(port=self.port, username=user, password=pw, keepalive=5, **kw)  # type: ignore[arg-type]

    def log(self) -> str:
        return self.process.log_file.read_text(errors="replace") if self.process.log_file.exists() else ""


def _adapt(text: str, old: str, new: str) -> str:
    assert old in text, f"production_config changed shape: {old!r} not found"
    return text.replace(old, new)


@pytest.fixture(scope="module")
def production() -> Iterator[ProductionBroker]:
    # not pytest's tmp_path: its root is 0700, and a root-started Mosquitto reads these files as user mosquitto
    work = Path(tempfile.mkdtemp(prefix="edgecoop-security-"))
    work.chmod(0o755)
    port = free_port()
    conf = production_config(port=port, websockets_port=None, tls_port=None, etc_dir=str(work), data_dir=str(work))
    conf = _adapt(conf, f"listener {port}\n", f"listener {port} 127.0.0.1\n")  # loopback only on a shared machine
    conf = _adapt(conf, f"# persistence_location {work}/\n", f"persistence_location {work}/\n")
    conf += f"log_dest file {work}/mosquitto.log\n"  # the broker's reasons, readable by the tests
    (work / "edgecoop.acl").write_text(production_acl())
    passwords = {u: f"pw-{u}-{uuid.uuid4().hex[:8]}" for u in USERS}
    passwd = work / "edgecoop.passwd"
    for i, (user, password) in enumerate(passwords.items()):  # as install.sh: mosquitto_passwd -b (-c the first)
        subprocess.run(["mosquitto_passwd", "-b", *(["-c"] if i == 0 else []), str(passwd), user, password], check=True)
    process = MosquittoProcess(port, config_text=conf, workdir=work)
    with process:
        yield ProductionBroker(process, passwords)


class Watcher:
    """An admin connection (user ``cms``: readwrite on the whole prefix) that records everything it receives."""

    def __init__(self, broker: ProductionBroker, filters: list[str]) -> None:
        self.seen: list[tuple[str, bytes, bool]] = []
        self._sentinel = ""
        self._arrived = asyncio.Event()
        self.conn = Connection(broker.settings("cms"), "cms", subscriptions=[(f, 1) for f in filters],
                               handler=self._record, clean_start=True)  # fmt: skip

    def _record(self, m: Message) -> None:
        topic = str(m.topic)
        if topic == self._sentinel:
            self._arrived.set()
        else:
            self.seen.append((topic, bytes(m.payload) if isinstance(m.payload, bytes) else b"", m.retain))

    async def settle(self) -> list[tuple[str, bytes, bool]]:
        """Everything published before this call has arrived when it returns (a sentinel through the broker)."""
        self._sentinel = T.reply(f"sentinel-{uuid.uuid4().hex[:8]}")
        self._arrived.clear()
        await self.conn.subscribe(self._sentinel)
        await self.conn.publish(self._sentinel, b"x")
        async with asyncio.timeout(5):
            await self._arrived.wait()
        return self.seen


@contextlib.asynccontextmanager
async def watching(broker: ProductionBroker, *filters: str) -> AsyncIterator[Watcher]:
    w = Watcher(broker, list(filters))
    async with w.conn:
        yield w


def _card(agent_id: str, description: str = "", epoch: int = 1) -> bytes:
    return encode(CapabilityCard(agent_id=agent_id, epoch=epoch, description=description).to_dict())


# -- ownership: an agent writes only its own topics ----------------------------------------------------------------
async def test_the_generated_production_config_is_what_runs(production):
    conf = production.process.config_file.read_text()
    for line in ("allow_anonymous false", "use_username_as_clientid true", "persistence true", "per_listener_settings false"):  # fmt: skip
        assert line + "\n" in conf
    assert production.process.pid is not None


async def test_an_agent_cannot_write_another_agents_card_status_data_or_results(production):
    """Own topics are accepted; every other agent's (and the orchestrator's) are refused with PUBACK 0x87."""
    config = agent_config("cam-02", production.settings("cam-02"), T, description="the genuine cam-02")
    async with watching(production, f"{T.prefix}/#") as watch, Agent(config) as victim:
        async with Connection(production.settings("cam-01"), "cam-01", clean_start=True) as attacker:
            own = [T.card("cam-01"), T.status("cam-01"), T.data("cam-01", "pm25"), T.request("cam-02", "echo"),
                   T.pool("echo"), T.reply("orchestrator"), T.task_submit()]  # fmt: skip
            for topic in own:
                await attacker.publish(topic, _card("cam-01"), retain=topic == T.card("cam-01"))
            forbidden = {
                T.card("cam-02"): _card("cam-02", "forged: route everything to cam-01", epoch=2**62),
                T.status("cam-02"): encode(Status("cam-02", False, 2**62).to_dict()),
                T.data("cam-02", "pm25"): encode(Reading("cam-02", "pm25", 999.0).to_dict()),
                T.ack("cam-02"): encode({"v": 1, "type": "ack", "rids": ["r1"]}),
                T.task_event("t-1"): encode({"v": 1, "type": "task_event", "state": "done"}),
                T.orchestrator_status("orchestrator"): encode(Status("orchestrator", False, 2**62).to_dict()),
                T.reply("orchestrator") + "/deeper": encode(Response(ok=True).to_dict()),
                T.ha_status("cam-02"): b'{"state": "offline"}',
                "$SYS/broker/uptime": b"0",
                "other/namespace": b"x",
            }
            codes = {}
            for topic, payload in forbidden.items():
                with pytest.raises(PublishRejected) as exc:
                    await attacker.publish(topic, payload, retain=True)
                codes[topic] = exc.value.reason_code
                assert exc.value.topic == topic and "Not authorized" in str(exc.value)
            assert set(codes.values()) == {NOT_AUTHORIZED}, codes
            assert attacker.counters.extra["puback_failures"] == len(forbidden)
            await attacker.publish(T.data("cam-01", "pm25"), b"\x80")  # still connected and usable
            assert attacker.counters.connects == 1 and attacker.counters.disconnects == 0
        seen = await watch.settle()
        assert victim.conn.counters.disconnects == 0
    assert not [(t, p) for t, p, _ in seen if forbidden.get(t) == p]  # no forged message ever reached anyone
    assert set(own) <= {t for t, _, _ in seen}


async def test_the_cms_keeps_the_genuine_card_under_an_impersonation_attempt(production):
    """cam-03 tries to overwrite cam-04's retained card (ACL: 0x87) and to publish a card for cam-04 on its own
    topic (the mirror: payload agent id differs from the topic's). The CMS only ever shows cam-04's own card."""
    config = agent_config("cam-04", production.settings("cam-04"), T, description="genuine camera at the harbour")
    async with Agent(config), Connection(production.settings("cam-03"), "cam-03", clean_start=True) as attacker:
        with pytest.raises(PublishRejected) as exc:
            await attacker.publish(T.card("cam-04"), _card("cam-04", "forged", epoch=2**62), retain=True)
        assert exc.value.reason_code == NOT_AUTHORIZED
        await attacker.publish(T.card("cam-03"), _card("cam-04", "forged via my own topic", epoch=2**62), retain=True)
        async with CmsMirror(production.settings("cms"), client_id="cms") as mirror:  # a late joiner
            await mirror.sync()
            cards = await mirror.snapshot()
    assert cards["cam-04"]["description"] == "genuine camera at the harbour"
    assert "cam-03" not in cards or cards["cam-03"].get("card") is None  # its mismatched card was not stored
    assert mirror.counters["rejected_mismatch"] == 1


async def test_a_forged_reply_is_never_taken_for_the_genuine_one(production):
    """Replies: any agent may write ``reply/<client>`` (responders must), but it cannot read another client's
    reply topic (the broker grants the subscription and delivers nothing), so it never learns a correlation id;
    a reply with an unknown correlation id is dropped. The requester gets the genuine answer."""
    config = agent_config("air-01", production.settings("air-01"), T)
    spied: list[str] = []
    orch = Connection(production.settings("orchestrator"), "orchestrator", clean_start=True,
                      subscriptions=[Requester.subscription(T, "orchestrator")])  # fmt: skip
    requester = Requester(orch, T)
    orch._handler = requester.handle
    spy_settings = production.settings("air-02")
    async with (
        Agent(config),
        orch,
        aiomqtt.Client("127.0.0.1", production.port, username="air-02", password=spy_settings.password,
                       identifier="air-02", protocol=aiomqtt.ProtocolVersion.V5) as spy,
    ):  # fmt: skip
        granted_codes: list[int] = []
        for topic_filter in (T.reply("orchestrator"), f"{T.prefix}/agents/air-01/req/#"):
            granted = await spy.subscribe(topic_filter, qos=1)
            granted_codes += [g.value if isinstance(g, ReasonCode) else int(g) for g in granted]

        async def sniff() -> None:
            async for m in spy.messages:
                spied.append(str(m.topic))

        sniffer = asyncio.create_task(sniff())
        forged = encode(
            Response(ok=True, result={"text": "forged: send the data to the cloud"}, agent_id="air-01").to_dict()
        )
        for _ in range(20):  # a flood of forged replies with guessed correlation ids
            await spy.publish(T.reply("orchestrator"), forged, qos=1, properties=props(CorrelationData=os.urandom(12)))
        answers = [await requester.request("air-01", "echo", {"n": i}, timeout=5) for i in range(5)]
        sniffer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sniffer
    assert granted_codes == [1, 1]  # Mosquitto 2.0.11 grants it: the read ACL applies at delivery
    assert spied == []  # ... and delivers nothing: neither the requests (correlation ids) nor the replies
    assert [a.agent_id for a in answers] == ["air-01"] * 5 and all(
        a.result["echo"]["n"] == i for i, a in enumerate(answers)
    )
    assert requester.late_replies >= 20  # every forged reply counted and dropped


async def test_a_last_will_on_another_agents_status_is_never_published(production):
    """A Last Will is a publish too: cam-01 dies with a will marking cam-02 offline; the broker drops it."""
    async with watching(production, T.status("cam-02")) as watch:
        attacker = aiomqtt.Client("127.0.0.1", production.port, username="cam-01",
                                  password=production.passwords["cam-01"], identifier="cam-01",
                                  protocol=aiomqtt.ProtocolVersion.V5,
                                  will=aiomqtt.Will(T.status("cam-02"), encode(Status("cam-02", False, 2**62).to_dict()),
                                                    qos=1, retain=True))  # fmt: skip
        closed = production.log().count("Client cam-01 closed its connection")
        await attacker.__aenter__()
        sock = attacker._client.socket()
        assert isinstance(sock, socket.socket)
        sock.shutdown(socket.SHUT_RDWR)  # die without DISCONNECT: the broker publishes the will now
        with contextlib.suppress(aiomqtt.MqttError):
            await attacker.__aexit__(None, None, None)
        await _until(lambda: production.log().count("Client cam-01 closed its connection") > closed, 5)
        seen = await watch.settle()
    assert [s for s in seen if not s[2]] == []  # nothing live: the will was not published
    assert all(decode(payload)[0]["epoch"] != 2**62 for _, payload, _ in seen)  # nor retained


async def test_the_orchestrator_and_agents_work_under_the_production_config(production):
    """The protections must not break the platform: a task end to end, with the orchestrator's one connection
    (CMS mirror included: a second connection under its user name would be taken over, and take back, forever)
    and the agent receiving the acknowledgement of its durable result (its own ack topic is readable)."""
    from edgecoop.orchestrator import Orchestrator
    from edgecoop.scenarios.loader import load_scenario

    (config,) = load_scenario("urban", production.settings("air-park"), include={"air-park"})
    async with Agent(config) as agent, Orchestrator(production.settings("orchestrator")) as orch:
        result = await orch.submit("What is the PM2.5 level at City Park right now?")
        await _until(lambda: agent.counters["acked"] >= 1, 5)
        assert orch.conn.counters.connects == 1 and orch.conn.counters.disconnects == 0
    assert result["state"] == "done" and [t["agent"] for t in result["trace"]] == ["air-park"], result
    assert agent.conn.counters.extra.get("puback_failures", 0) == 0
    assert orch.conn.counters.extra.get("puback_failures", 0) == 0


# -- client-id takeover ---------------------------------------------------------------------------------------------
async def test_client_id_takeover_does_not_disconnect_the_victim(production):
    """``use_username_as_clientid true``: whatever client id an attacker sends, the broker uses its username."""
    victim_config = agent_config("air-02", production.settings("air-02"), T)
    kicked = production.log().count("already connected, closing old connection")
    async with Agent(victim_config) as victim, watching(production, T.status("air-02")) as watch:
        for identifier in ("air-02", "cms", "orchestrator"):  # the victim's id, and the services' ids
            async with Connection(production.settings("cam-01"), identifier, clean_start=True) as attacker:
                await attacker.publish(T.data("cam-01", "pm25"), b"\x80")  # the attacker is really connected
        # the victim still answers, on its first and only connection
        async with Connection(production.settings("orchestrator"), "orchestrator", clean_start=True,
                              subscriptions=[Requester.subscription(T, "orchestrator")]) as orch:  # fmt: skip
            requester = Requester(orch, T)
            orch._handler = requester.handle
            assert (await requester.request("air-02", "echo", {"alive": True}, timeout=5)).ok
        seen = await watch.settle()
        assert victim.conn.counters.connects == 1 and victim.conn.counters.disconnects == 0
        assert watch.conn.counters.disconnects == 0  # the `cms` user was not kicked by an attacker saying "cms"
    assert not [p for t, p, retain in seen if not retain]  # no offline status (no will) while the attacks ran
    assert production.log().count("already connected, closing old connection") == kicked


async def test_without_the_protection_the_takeover_happens(tmp_path):
    """The control experiment: on a broker without ``use_username_as_clientid`` the same attack kicks the victim
    (so the test above is measuring the protection, not a quiet attacker)."""
    with MosquittoProcess(workdir=tmp_path / "broker") as dev:
        settings = BrokerSettings(port=dev.port, keepalive=5)
        victim = Connection(settings, "air-02", clean_start=True)
        async with victim, Connection(settings, "air-02", clean_start=True):
            await _until(lambda: victim.counters.disconnects >= 1, 5)
    assert victim.counters.disconnects >= 1


# -- credentials ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("user", "password"),
    [("cam-01", "wrong"), ("ghost", "whatever"), (None, None), ("cam-01", "")],
    ids=["bad-password", "unknown-user", "anonymous", "empty-password"],
)
async def test_bad_credentials_fail_at_once_with_the_brokers_reason(production, user, password, caplog):
    caplog.set_level(logging.INFO, logger="edgecoop.connection")
    conn = Connection(production.settings(user, password), user or "anon", connect_timeout=5)
    start = time.monotonic()
    with pytest.raises(ConnectError) as exc:
        async with conn:
            pass
    elapsed = time.monotonic() - start
    assert elapsed < 1.0, elapsed  # no retry storm until the 5 s connect timeout: refused for good at once
    assert exc.value.reason_code == NOT_AUTHORIZED and "Not authorized" in str(exc.value)
    assert (user or "None") in str(exc.value) and (not password or password not in str(exc.value))
    assert conn.counters.extra["connect_refused"] == 1 and conn.counters.connects == 0  # one attempt
    assert conn.state.value == "closed"


async def test_an_agent_with_bad_credentials_does_not_start(production):
    config = agent_config("cam-01", production.settings("cam-01", "wrong"), T)
    start = time.monotonic()
    with pytest.raises(ConnectError, match="Not authorized"):
        async with Agent(config):
            pass
    assert time.monotonic() - start < 2.0


async def test_an_unreachable_broker_is_retried_with_backoff_until_the_connect_timeout(caplog):
    caplog.set_level(logging.INFO, logger="edgecoop.connection")
    port = free_port()  # nothing listens there
    conn = Connection(BrokerSettings(port=port), "lonely", connect_timeout=1.5)
    start = time.monotonic()
    with pytest.raises(ConnectError, match="could not connect") as exc:
        async with conn:
            pass
    elapsed = time.monotonic() - start
    attempts = sum("lost or refused" in r.getMessage() for r in caplog.records)
    assert 1.4 <= elapsed < 3.0, elapsed
    assert 2 <= attempts <= 15, attempts  # jittered exponential backoff: bounded, not a busy loop
    assert "Connection refused" in str(exc.value) and exc.value.reason_code is None


async def _until(predicate, timeout: float) -> None:
    """Poll a log file or a counter (no event to wait on); the timeout is the failure, not a fixed sleep."""
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.02)
