"""MQTT 5 request/response over a real broker: deadlines, JSON clients, bad input, hostile routes."""

import asyncio
import json
import threading

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgecoop.connection import props
from edgecoop.errors import RemoteError, RequestTimeout
from edgecoop.messages import Request
from edgecoop.wire import MAX_PAYLOAD, decode, encode


async def test_round_trip_and_no_pending_leak(make_agent, client):
    async with make_agent("a1"):
        resp = await client.req.request("a1", "echo", {"x": 1, "s": "é"}, timeout=5)
        assert resp.ok and resp.result == {"echo": {"x": 1, "s": "é"}} and resp.agent_id == "a1"
        results = await asyncio.gather(*[client.req.request("a1", "echo", {"i": i}, timeout=10) for i in range(300)])
        assert [r.result["echo"]["i"] for r in results] == list(range(300))
    assert client.req.in_flight == 0


async def test_deadline_expiry_raises_and_cleans_up(make_agent, client):
    async with make_agent("slow", capabilities=[{"kind": "echo", "max_concurrency": 1}]) as agent:
        with pytest.raises(RequestTimeout) as exc:
            await client.req.request("slow", "echo", {"delay_s": 2}, timeout=0.3)
        assert exc.value.agent_id == "slow"
        assert client.req.in_flight == 0
        # the agent gave up at the same deadline and is free again
        resp = await client.req.request("slow", "echo", {"ok": True}, timeout=5)
        assert resp.ok
        assert agent.counters["timeouts"] + agent.counters["expired"] >= 1


async def test_unknown_agent_times_out_cleanly(client):
    with pytest.raises(RequestTimeout):
        await client.req.request("nobody", "echo", {}, timeout=0.3)
    assert client.req.in_flight == 0


async def test_unknown_capability_gets_an_error_reply(make_agent, client):
    async with make_agent("a1"):
        with pytest.raises(RemoteError) as exc:
            await client.req.request("a1", "teleport", {}, timeout=5)
        assert exc.value.code == "unknown_capability"


async def test_streaming_partials_arrive_before_the_final_reply(make_agent, client):
    chunks = []
    async with make_agent("a1"):
        resp = await client.req.request("a1", "echo", {"text": "one two three"}, timeout=5, on_partial=chunks.append)
    assert [c.result["token"] for c in chunks] == ["one", "two", "three"]
    assert [c.seq for c in chunks] == [1, 2, 3] and resp.seq == 4


def _paho_client(port):
    c = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    c.connect("127.0.0.1", port)
    return c


async def _raw_exchange(broker, topics, topic, payload, *, content_type=None, response_topic=None):
    """Publish with plain paho (like any MQTT client would) and return the decoded reply."""
    got: dict = {}
    done = threading.Event()
    c = _paho_client(broker.port)
    rt = response_topic or topics.reply("human-1")

    def on_message(client, userdata, msg):
        if msg.retain:  # a retained message already on the topic is not a reply
            return
        got["payload"] = msg.payload
        got["ctype"] = getattr(msg.properties, "ContentType", None)
        got["corr"] = getattr(msg.properties, "CorrelationData", None)
        done.set()

    c.on_message = on_message
    c.subscribe(rt, qos=1)
    c.loop_start()
    p = Properties(PacketTypes.PUBLISH)
    p.ResponseTopic = rt
    p.CorrelationData = b"corr-42"
    if content_type:
        p.ContentType = content_type
    c.publish(topic, payload, qos=1, properties=p).wait_for_publish(5)
    ok = await asyncio.to_thread(done.wait, 5)
    c.loop_stop()
    c.disconnect()
    return got if ok else None


async def test_json_client_gets_a_json_answer(make_agent, broker, topics):
    async with make_agent("a1"):
        body = json.dumps({"input": {"q": "hello"}}).encode()
        got = await _raw_exchange(broker, topics, topics.request("a1", "echo"), body, content_type="application/json")
    assert got is not None and got["ctype"] == "application/json" and got["corr"] == b"corr-42"
    reply = json.loads(got["payload"])
    assert reply["ok"] is True and reply["result"] == {"echo": {"q": "hello"}}


async def test_json_without_content_type_is_sniffed(make_agent, broker, topics):
    async with make_agent("a1"):
        got = await _raw_exchange(broker, topics, topics.request("a1", "echo"), b'{"input": {"n": 1}}')
    assert json.loads(got["payload"])["result"] == {"echo": {"n": 1}}


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"\xc1\xc1", "bad_payload"),
        (b'{"input": [1, 2]}', "bad_schema"),
        (b'{"input": {"x": NaN}}', "bad_payload"),
        (b"\x91" * (MAX_PAYLOAD + 1), "too_large"),
        (encode({"v": 2, "input": {}}), "bad_schema"),
    ],
)
@pytest.mark.allow_error_logs
async def test_malformed_requests_get_error_replies_and_the_agent_keeps_running(
    make_agent, broker, topics, client, payload, code
):
    async with make_agent("a1") as agent:
        got = await _raw_exchange(broker, topics, topics.request("a1", "echo"), payload)
        assert got is not None, "no error reply"
        reply, _ = decode(got["payload"])
        assert reply["ok"] is False and reply["error"]["code"] == code
        assert agent.counters["bad_request"] == 1
        assert (await client.req.request("a1", "echo", {"still": "alive"}, timeout=5)).ok


async def test_response_topic_outside_reply_namespace_is_refused(make_agent, broker, topics, client):
    async with make_agent("a1") as agent, make_agent("victim"):
        # a request trying to make a1 write onto victim's card topic
        got = await _raw_exchange(
            broker, topics, topics.request("a1", "echo"), encode(Request("echo", {}).to_dict()),
            response_topic=topics.card("victim"),
        )  # fmt: skip
        assert got is None
        assert agent.counters["no_reply_route"] == 1
        assert (await client.req.request("a1", "echo", {}, timeout=5)).ok


async def test_request_without_response_topic_is_counted(make_agent, client, topics):
    async with make_agent("a1") as agent:
        await client.conn.publish(topics.request("a1", "echo"), encode(Request("echo").to_dict()), properties=props())
        await client.req.request("a1", "echo", {}, timeout=5)  # ordered after the bad one on the same connection
        assert agent.counters["no_reply_route"] == 1


async def test_hostile_capability_names_never_reach_the_broker(client):
    from edgecoop.errors import TopicError

    for bad in ("a/b", "#", "+", "$x", "nul\x00"):
        with pytest.raises(TopicError):
            await client.req.request("a1", bad, {}, timeout=1)
        with pytest.raises(TopicError):
            await client.req.request(bad, "echo", {}, timeout=1)
    assert client.req.in_flight == 0
