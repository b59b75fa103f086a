"""The MQTT core on both of its paths: paho's public socket API, and the fast path over paho's internals (on only
for the paho release it was checked against). Each test runs once per path against the session's real Mosquitto."""

from __future__ import annotations

import asyncio
import uuid

import paho.mqtt
import pytest

from edgecoop.connection import BrokerSettings, Connection, LastWill, Message, props
from edgecoop.errors import BrokerError, ConnectError
from edgecoop.mqtt import gate
from edgecoop.mqtt.fastpath import BufferedReader
from edgecoop.mqtt.properties import FastProperties


@pytest.fixture(params=["public", "fast"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "fast" and not gate.fast_allowed(env={}):
        pytest.skip(f"the fast path is only for paho-mqtt {gate.TESTED_PAHO}, not {paho.mqtt.__version__}")
    monkeypatch.setattr(gate, "FAST", request.param == "fast")
    return str(request.param)


def cid(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:6]}"


async def until(predicate, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while True:
            if predicate():
                return
            await asyncio.sleep(0.01)


def test_the_gate_opens_for_the_tested_release_only():
    assert gate.fast_allowed(gate.TESTED_PAHO, env={})
    assert not gate.fast_allowed("2.3.0", env={}), "another release: the public path"
    assert not gate.fast_allowed(gate.TESTED_PAHO, env={"EDGECOOP_MQTT_FASTPATH": "0"})


async def test_request_reply_properties_and_both_qos_round_trip(path, settings, topics):
    got: list[Message] = []
    t = f"{topics.prefix}/core/x"
    async with (
        Connection(settings, cid("sub"), subscriptions=[(f"{topics.prefix}/core/#", 1)], handler=got.append,
                   clean_start=True) as sub,
        Connection(settings, cid("pub"), clean_start=True) as pub,
    ):  # fmt: skip
        assert pub.session is not None and pub.session.fast is (path == "fast")
        assert isinstance(pub.session._reader, BufferedReader) is (path == "fast")
        p = props(ResponseTopic=f"{topics.prefix}/reply", CorrelationData=b"\x00\x01", ContentType="application/json")
        assert isinstance(p, FastProperties) is (path == "fast")
        await pub.publish(t, b"one", qos=1, properties=p)
        await pub.publish(t, "two", qos=0)
        await pub.publish(t, b"x" * 200_000, qos=1)  # larger than one socket read
        await until(lambda: len(got) == 3)
        assert [m.payload for m in got[:2]] == [b"one", b"two"] and len(got[2].payload) == 200_000
        first = got[0]
        assert (first.topic, first.qos, first.retain) == (t, 1, False)
        assert first.properties is not None
        assert first.properties.ResponseTopic == f"{topics.prefix}/reply"
        assert first.properties.CorrelationData == b"\x00\x01"
        assert sub.counters.messages == 3 and sub.counters.handler_errors == 0


async def test_publishes_beyond_the_in_flight_window_are_all_acknowledged_in_order(path, settings, topics):
    got: list[Message] = []
    async with (
        Connection(settings, cid("sub"), subscriptions=[(f"{topics.prefix}/w", 1)], handler=got.append,
                   clean_start=True),
        Connection(settings, cid("pub"), clean_start=True) as pub,
    ):  # fmt: skip
        await asyncio.gather(*(pub.publish(f"{topics.prefix}/w", b"%d" % i, qos=1) for i in range(300)))
        await until(lambda: len(got) == 300)
    assert [m.payload for m in got] == [b"%d" % i for i in range(300)], "in order, none lost"


async def test_retained_messages_reach_a_late_subscriber(path, settings, topics):
    async with Connection(settings, cid("pub"), clean_start=True) as pub:
        for i in range(50):
            await pub.publish(f"{topics.prefix}/r/{i}", b"card %d" % i, retain=True)
    got: list[Message] = []
    async with Connection(settings, cid("late"), subscriptions=[(f"{topics.prefix}/r/+", 1)], handler=got.append,
                          clean_start=True):  # fmt: skip
        await until(lambda: len(got) == 50)
    assert all(m.retain for m in got)
    async with Connection(settings, cid("clean"), clean_start=True) as pub:
        for i in range(50):
            await pub.publish(f"{topics.prefix}/r/{i}", b"", retain=True)


async def test_a_lost_socket_fires_the_will_and_the_connection_comes_back(path, settings, topics):
    got: list[Message] = []
    will = f"{topics.prefix}/will"
    async with Connection(settings, cid("watch"), subscriptions=[(will, 1)], handler=got.append, clean_start=True):
        conn = Connection(settings, cid("dies"), will=lambda: LastWill(will, b"gone", qos=1),
                          subscriptions=[(f"{topics.prefix}/in", 1)])  # fmt: skip
        async with conn:
            session = conn.session
            assert session is not None
            sock = session.paho.socket()
            assert sock is not None
            sock.shutdown(2)  # the network drops the link: the broker sends the Last Will
            await until(lambda: got and got[0].payload == b"gone")
            async with asyncio.timeout(10):
                await conn.disconnected.wait()
                await conn.connected.wait()
            assert conn.session is not session and conn.counters.connects == 2 and conn.counters.disconnects == 1
            await conn.publish(f"{topics.prefix}/in", b"after", qos=1)  # works on the new connection


async def test_a_clean_exit_sends_no_will_and_delivers_what_was_queued(path, settings, topics):
    got: list[Message] = []
    async with Connection(settings, cid("watch"), subscriptions=[(f"{topics.prefix}/q/#", 1)], handler=got.append,
                          clean_start=True):  # fmt: skip
        conn = Connection(settings, cid("leaves"), will=lambda: LastWill(f"{topics.prefix}/q/will", b"WILL"),
                          clean_start=True)  # fmt: skip
        async with conn:
            await asyncio.gather(*(conn.publish(f"{topics.prefix}/q/d", b"%d" % i) for i in range(200)))
            assert conn.session is not None
            conn.session.paho.publish(f"{topics.prefix}/q/d", b"last", 1)  # not awaited: DISCONNECT goes after it
        await until(lambda: len(got) >= 201)
        await asyncio.sleep(0.2)  # a will would arrive by now
    assert [m.payload for m in got] == [b"%d" % i for i in range(200)] + [b"last"]


async def test_a_broker_restart_reconnects_and_resubscribes(path, private_broker, topics):
    settings = BrokerSettings(port=private_broker.port, keepalive=5)
    got: list[Message] = []
    async with (
        Connection(settings, cid("sub"), subscriptions=[(f"{topics.prefix}/b", 1)], handler=got.append,
                   clean_start=True) as sub,
        Connection(settings, cid("pub"), clean_start=True) as pub,
    ):  # fmt: skip
        private_broker.stop()
        async with asyncio.timeout(10):
            await sub.disconnected.wait()
        with pytest.raises(BrokerError):
            await pub.publish(f"{topics.prefix}/b", b"while down", wait=0.1)
        private_broker.start()
        async with asyncio.timeout(20):  # the backoff is capped at ~8 s
            await sub.connected.wait()
            await pub.connected.wait()
        await pub.publish(f"{topics.prefix}/b", b"back")
        await until(lambda: [m.payload for m in got] == [b"back"])


async def test_nobody_listening_is_a_connect_error_within_the_timeout(path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connections are refused
        with pytest.raises(ConnectError, match="could not connect"):
            async with Connection(BrokerSettings(port=port), cid("nobody"), connect_timeout=1):
                pass


async def test_routes_deliver_by_filter_and_unrouting_unsubscribes(path, settings, topics):
    p = topics.prefix
    cams, cams_too, air, rest, late = [], [], [], [], []
    conn = Connection(settings, cid("router"), subscriptions=[(f"{p}/misc/#", 1)], handler=rest.append,
                      clean_start=True)  # fmt: skip
    conn.route(f"{p}/cams/+/x", cams.append)
    stop_cams_too = conn.route(f"{p}/cams/+/x", cams_too.append)  # a second route on the same filter
    stop_air = conn.route(f"{p}/air/#", air.append)
    async with conn, Connection(settings, cid("pub"), clean_start=True) as pub:
        await pub.publish(f"{p}/cams/c1/x", b"1")  # both routes of its filter get it, the default handler not
        await pub.publish(f"{p}/air/a1/x", b"2")
        await pub.publish(f"{p}/misc/m", b"3")  # no route matches: the constructor's handler
        await until(lambda: len(cams) == len(cams_too) == len(air) == len(rest) == 1)
        assert [m.payload for m in cams + cams_too + air + rest] == [b"1", b"1", b"2", b"3"]
        # added on a running connection: subscribed at once
        await conn.subscribe(f"{p}/late/#", handler=late.append)
        await pub.publish(f"{p}/late/1", b"4")
        await until(lambda: len(late) == 1)
        await stop_air()  # its filter is unsubscribed: nothing of air/... arrives any more
        await stop_cams_too()  # the filter stays subscribed for the other route
        await pub.publish(f"{p}/air/a1/x", b"5")
        await pub.publish(f"{p}/cams/c1/x", b"6")
        await until(lambda: len(cams) == 2)
        await asyncio.sleep(0.1)
        assert [m.payload for m in air] == [b"2"] and len(cams_too) == 1 and len(rest) == 1
    assert conn.counters.handler_errors == 0


@pytest.mark.allow_error_logs
async def test_a_failing_route_does_not_keep_the_message_from_the_others(path, settings, topics):
    got: list[bytes] = []

    def broken(m: Message) -> None:
        raise RuntimeError("handler bug")

    conn = Connection(settings, cid("router"), clean_start=True)
    conn.route(f"{topics.prefix}/t", broken)
    conn.route(f"{topics.prefix}/t", lambda m: got.append(m.payload))
    async with conn, Connection(settings, cid("pub"), clean_start=True) as pub:
        await pub.publish(f"{topics.prefix}/t", b"x")
        await until(lambda: got == [b"x"])
    assert conn.counters.handler_errors == 1
