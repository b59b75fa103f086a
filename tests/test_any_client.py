"""Any MQTT client can ask: plain text is the question, errors come back in the asker's format, and MQTT 3.1.1
clients (Node-RED's and many devices' default) name their reply topic inside the payload."""

from __future__ import annotations

import asyncio
import json
import uuid

import msgpack
import pytest

from edgecoop.errors import SchemaError
from edgecoop.orchestrator import Orchestrator
from edgecoop.rpc import payload_reply_context
from edgecoop.topics import Topics
from edgecoop.wire import Format, plain_text, sniff_format


async def _ask(broker, topics, message: bytes, *, version: str, reply_topic: str, properties=()) -> bytes:
    """mosquitto_sub for the answer, mosquitto_pub for the question, as a user would type them."""
    sub = await asyncio.create_subprocess_exec(
        "mosquitto_sub", "-V", version, "-p", str(broker.port), "-t", reply_topic, "-C", "1", "-W", "60",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert sub.stdout is not None
    # mosquitto_sub has no readiness signal: publish again while no answer came (a task without an id just reruns)
    for _ in range(10):
        pub = await asyncio.create_subprocess_exec(
            "mosquitto_pub", "-V", version, "-p", str(broker.port), "-t", topics.task_submit(), *properties, "-s",
            stdin=asyncio.subprocess.PIPE,
        )  # fmt: skip
        await pub.communicate(message)
        try:
            line = await asyncio.wait_for(sub.stdout.readline(), 5)
        except TimeoutError:
            continue
        await sub.wait()
        return line
    sub.kill()
    await sub.wait()
    return b""


async def test_plain_text_is_the_question_and_the_answer_is_json(settings, topics, broker):
    reply_topic = f"answers/{uuid.uuid4().hex[:8]}"
    async with Orchestrator(settings, topics=topics):
        out = await _ask(broker, topics, b"How full is bus 42?", version="5", reply_topic=reply_topic,
                         properties=("-D", "publish", "response-topic", reply_topic))  # fmt: skip
    reply = json.loads(out)  # JSON, because a human typed text
    assert reply["question"] == "How full is bus 42?"
    assert reply["state"] in ("done", "failed", "timed_out", "refused", "ask_back"), reply


async def test_mqtt_311_client_names_its_reply_topic(settings, topics, broker):
    reply_topic = f"nodered/answers/{uuid.uuid4().hex[:8]}"
    body = json.dumps({"question": "How full is bus 42?", "reply_to": reply_topic, "task_id": "v311-1"}).encode()
    async with Orchestrator(settings, topics=topics) as orch:
        out = await _ask(broker, topics, body, version="mqttv311", reply_topic=reply_topic)
        assert orch.counters["accepted"] == 1
    reply = json.loads(out)
    assert reply["task_id"] == "v311-1" and reply["question"] == "How full is bus 42?"


async def test_errors_answer_in_the_askers_format(settings, topics, broker):
    reply_topic = f"answers/{uuid.uuid4().hex[:8]}"
    rt = ("-D", "publish", "response-topic", reply_topic)
    async with Orchestrator(settings, topics=topics):
        # JSON with a bad field, to a 3.1.1 client's reply_to: a JSON error
        out = await _ask(broker, topics, json.dumps({"question": "", "reply_to": reply_topic}).encode(),
                         version="mqttv311", reply_topic=reply_topic)  # fmt: skip
        assert json.loads(out)["error"]["code"] == "bad_schema"
        # msgpack with a bad field: a msgpack error (mosquitto_sub prints the binary payload and a newline)
        out = await _ask(broker, topics, msgpack.packb({"question": 5}), version="5", reply_topic=reply_topic,
                         properties=rt)  # fmt: skip
        assert msgpack.unpackb(out.rstrip(b"\n"))["error"]["code"] == "bad_schema"


async def test_a_forbidden_reply_to_is_refused(settings, topics, broker):
    """reply_to follows the Response Topic rules: never a card, status or request topic of ours, no $ or wildcards."""
    async with Orchestrator(settings, topics=topics) as orch:
        for bad in [topics.card("victim"), "$SYS/x", "answers/#", topics.request("victim", "echo")]:
            orch.counters["bad_submission"] = 0
            proc = await asyncio.create_subprocess_exec(
                "mosquitto_pub", "-V", "mqttv311", "-p", str(broker.port), "-t", topics.task_submit(), "-q", "1",
                "-m", json.dumps({"question": "How full is bus 42?", "reply_to": bad}),
            )  # fmt: skip
            await proc.wait()
            async with asyncio.timeout(10):
                while not orch.counters["bad_submission"]:  # noqa: ASYNC110 - a counter, no event to wait on
                    await asyncio.sleep(0.02)
        assert orch.counters["accepted"] == 0


@pytest.mark.parametrize(
    ("payload", "content_type", "text"),
    [
        (b"How full is bus 42?", None, "How full is bus 42?"),
        ("  Wie voll ist Bus 42 am Südbahnhof?\n".encode(), None, "Wie voll ist Bus 42 am Südbahnhof?"),
        (b'{"question": "x"}', None, None),
        (b"[1]", None, None),
        (msgpack.packb({"question": "x"}), None, None),
        (b"\xc1\xff", None, None),
        (b"bell\x07", None, None),
        (b"How full?", "text/plain; charset=utf-8", "How full?"),
        (b"How full?", "application/json", None),
        (b"", None, None),
    ],
)
def test_plain_text_detection(payload, content_type, text):
    assert plain_text(payload, content_type) == text
    if text is not None and content_type is None:
        assert sniff_format(payload, content_type) is Format.JSON  # errors to text go back as JSON


def test_reply_to_rules():
    t = Topics("edgecoop/v1")
    assert payload_reply_context({"reply_to": "nodered/answers"}, t, Format.JSON).response_topic == "nodered/answers"
    assert payload_reply_context({"reply_to": "edgecoop/v1/reply/me"}, t, Format.JSON) is not None
    assert payload_reply_context({}, t, Format.JSON) is None
    for bad in ["edgecoop/v1/agents/a/card", "a/+", "$SYS/x", 5, "", "x" * 2000]:
        with pytest.raises(SchemaError, match="reply_to"):
            payload_reply_context({"reply_to": bad}, t, Format.JSON)
