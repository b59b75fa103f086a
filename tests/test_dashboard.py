"""The live dashboard: state bounds, HTTP edge cases, SSE, and the page rendered by headless Chromium.

The browser test drives Chromium over ``--remote-debugging-pipe`` (the DevTools protocol as NUL-separated JSON on
file descriptors 3 and 4): real waiting for live updates, no websocket dependency. ``--dump-dom`` with a virtual
time budget cannot be used: the page's open event stream keeps virtual time from advancing.

Set ``EDGECOOP_SCREENSHOTS=1`` to refresh docs/screenshots/dashboard.png; otherwise the screenshot goes to tmp.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from edgecoop.connection import BrokerSettings, Connection
from edgecoop.dashboard import Dashboard, DashboardState, parse_task_event
from edgecoop.errors import SchemaError
from edgecoop.messages import Reading, Status
from edgecoop.wire import encode

REPO = Path(__file__).resolve().parent.parent
SCREENSHOT = REPO / "docs" / "screenshots" / "dashboard.png"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


# -- helpers ------------------------------------------------------------------------------------------------
def task_event(task_id: str, state: str, **fields: Any) -> bytes:
    return encode({"v": 1, "type": "task_event", "task_id": task_id, "state": state, "ts": time.time(), **fields})


PLAN = {
    "shape": "parallel",
    "steps": [
        {"agent": "cam-central", "capability": "count_vehicles", "tier": "edge"},
        {"agent": "air-market", "capability": "air_quality", "tier": "edge"},
    ],
}
LIFECYCLE = [
    ("received", {"question": "How busy is the central station, and is the air ok?"}),
    (
        "classified",
        {
            "classification": {
                "cooperation": ["data", "computation"],
                "domain": "traffic",
                "difficulty": "easy",
                "privacy": "site",
                "edge_capable": True,
            }
        },
    ),
    ("planned", {"plan": PLAN}),
    (
        "step_done",
        {"step": {"agent": "cam-central", "capability": "count_vehicles", "tier": "edge", "ms": 41.0, "ok": True}},
    ),
    (
        "step_done",
        {"step": {"agent": "air-market", "capability": "air_quality", "tier": "edge", "ms": 12.5, "ok": True}},
    ),
    (
        "done",
        {
            "answer": "412 vehicles in the last hour; PM2.5 is 14 µg/m³ (good).",
            "tier": "edge",
            "latency_ms": 88.0,
            "cost": 0.0,
        },
    ),
]


async def publish_lifecycle(conn: Connection, topics, task_id: str, events=LIFECYCLE) -> None:
    for state, fields in events:
        await conn.publish(topics.task_event(task_id), task_event(task_id, state, **fields), qos=1)


async def http(
    port: int, target: str, method: str = "GET", raw: bytes | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One raw HTTP/1.1 exchange (no client-side path normalisation, so traversal attempts reach the server)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        request = f"{method} {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode("latin-1")
        writer.write(raw if raw is not None else request)
        await writer.drain()
        async with asyncio.timeout(5):
            data = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split(" ")[1]), headers, body


async def api_state(port: int) -> dict[str, Any]:
    status, _, body = await http(port, "/api/state")
    assert status == 200
    state: dict[str, Any] = json.loads(body)
    return state


async def wait_state(port: int, predicate, timeout: float = 5.0) -> dict[str, Any]:
    async with asyncio.timeout(timeout):
        while True:
            state = await api_state(port)
            if predicate(state):
                return state
            await asyncio.sleep(0.05)


async def eventually(predicate, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while True:
            if predicate():
                return
            await asyncio.sleep(0.01)


@pytest.fixture
async def publisher(settings):
    async with Connection(settings, f"pub-{os.getpid()}-{time.monotonic_ns()}", clean_start=True) as conn:
        yield conn


@pytest.fixture
async def dashboard(settings, topics):
    async with Dashboard(settings, topics, port=0) as dash:
        yield dash


# -- state model (no broker) ------------------------------------------------------------------------------------
def test_state_is_bounded_and_task_events_merge():
    state = DashboardState(max_tasks=3, readings_per_sensor=5)
    for i in range(5):
        state.apply_task_event(
            parse_task_event({"type": "task_event", "task_id": f"t{i}", "state": "received", "ts": i}, f"t{i}")
        )
    assert list(state.tasks) == ["t2", "t3", "t4"]
    assert state.counters["tasks_evicted"] == 2
    for i in range(12):
        state.apply_reading("a", "pm25", Reading("a", "pm25", float(i), "ug", ts=float(i)).to_dict())
    assert [v for _, v in state.series[("a", "pm25")].points] == [7.0, 8.0, 9.0, 10.0, 11.0]

    ev = {"type": "task_event", "task_id": "t4", "ts": 10.0}
    state.apply_task_event(parse_task_event({**ev, "state": "done", "tier": "cloud", "answer": "x"}, "t4"), now=600)
    events = state.apply_task_event(parse_task_event({**ev, "state": "step_done"}, "t4"), now=600)
    assert state.tasks["t4"]["state"] == "done", "a finished task never goes back to in flight"
    assert [name for name, _ in events] == ["task"], "a finished task is counted in the split once"
    assert state.split_json() == {
        "minutes": [{"t": 600, "edge": 0, "cloud": 1, "none": 0, "failed": 0}],
        "totals": {"edge": 0, "cloud": 1, "none": 0, "failed": 0},
        "comparison": {"edge": 0, "cloud": 0, "none": 0, "failed": 0},
    }


def test_failed_tasks_count_as_failed_and_baseline_runs_are_kept_apart():
    """A failed edge task is not "answered at the edge"; the demo's cloud-only baseline is not live traffic."""
    state = DashboardState()
    finished = [
        ("t-edge", "done", "edge"),
        ("t-failed-at-edge", "failed", "edge"),  # what the orchestrator sends when every edge agent failed
        ("t-timed-out", "timed_out", "none"),
        ("t-refused", "done", "none"),  # refused or asked back by the orchestrator itself
        ("baseline-1", "done", "cloud"),  # the demo's comparison run
        ("bench-7", "failed", "cloud"),
    ]
    for task_id, final, tier in finished:
        state.apply_task_event(parse_task_event({"type": "task_event", "task_id": task_id, "state": "received",
                                                 "ts": 1, "strategy": "cloud-only"}, task_id))  # fmt: skip
        state.apply_task_event(
            parse_task_event(
                {"type": "task_event", "task_id": task_id, "state": final, "ts": 2, "tier": tier}, task_id
            ),
            now=600,
        )
    split = state.split_json()
    assert split["totals"] == {"edge": 1, "cloud": 0, "none": 1, "failed": 2}
    assert split["minutes"] == [{"t": 600, "edge": 1, "cloud": 0, "none": 1, "failed": 2}]
    assert split["comparison"] == {"edge": 0, "cloud": 1, "none": 0, "failed": 1}
    assert [t for t, rec in state.tasks.items() if rec["comparison"]] == ["baseline-1", "bench-7"]
    assert state.tasks["baseline-1"]["strategy"] == "cloud-only"


def test_a_degraded_answer_keeps_its_state_and_confidence():
    """The cloud was unreachable: the task's history shows "degraded" and its confidence is kept for the badge."""
    state = DashboardState()
    ev = {"type": "task_event", "task_id": "t-d"}
    state.apply_task_event(parse_task_event({**ev, "state": "received", "ts": 1}, "t-d"))
    state.apply_task_event(parse_task_event({**ev, "state": "degraded", "ts": 2, "confidence": 0.25,
                                             "reason": "cloud failed"}, "t-d"))  # fmt: skip
    state.apply_task_event(parse_task_event({**ev, "state": "done", "ts": 3, "tier": "edge", "answer": "x"}, "t-d"))
    task = state.tasks["t-d"]
    assert [h["state"] for h in task["history"]] == ["received", "degraded", "done"]
    assert task["confidence"] == 0.25 and task["tier"] == "edge"


def test_orchestrator_status_and_alarm_are_kept():
    state = DashboardState()
    state.apply_orchestrator_status("orch", {"agent_id": "orch", "state": "online", "epoch": 3, "ts": 5.0})
    assert state.apply_orchestrator_status("orch", {"agent_id": "orch", "state": "offline", "epoch": 2}) == []
    [(name, data)] = state.apply_orchestrator_alarm("orch", {
        "v": 1, "type": "alarm", "alarm": "broker_dropped", "active": True, "dropped": 30, "dropped_total": 30,
        "since": 7.0, "ts": 8.0, "suspects": [{"agent_id": "cam-01", "outstanding": 12}, "junk"], "extra": "x",
    })  # fmt: skip
    assert name == "orchestrator" and data["online"] is True
    assert data["alarm"] == {"alarm": "broker_dropped", "active": True, "dropped": 30, "dropped_total": 30,
                             "since": 7.0, "ts": 8.0, "suspects": [{"agent_id": "cam-01", "outstanding": 12}]}  # fmt: skip
    with pytest.raises(SchemaError):
        state.apply_orchestrator_alarm("orch", {"type": "alarm", "active": "yes"})
    with pytest.raises(SchemaError):
        state.apply_orchestrator_status("orch", {"agent_id": "other", "state": "online", "epoch": 9})
    assert state.snapshot()["orchestrators"] == [data]
    assert state.apply_orchestrator_status("orch", None) == [("orchestrator_removed", {"id": "orch"})]


@pytest.mark.parametrize(
    "event",
    [
        {"type": "card", "task_id": "t1", "state": "done", "ts": 1},
        {"type": "task_event", "task_id": "other", "state": "done", "ts": 1},
        {"type": "task_event", "task_id": "t1", "state": "exploded", "ts": 1},
        {"type": "task_event", "task_id": "t1", "state": "done"},
        {"type": "task_event", "task_id": "t1/x", "state": "done", "ts": 1},
    ],
)
def test_bad_task_events_are_rejected(event):
    with pytest.raises(SchemaError):
        parse_task_event(event, "t1")


def test_task_event_fields_are_sanitised():
    event = parse_task_event(
        {
            "type": "task_event", "task_id": "t1", "state": "planned", "ts": 1, "question": "q" * 10_000,
            "plan": {"shape": "weird", "steps": [{"agent": "a", "capability": "c", "tier": "moon"}, "junk"] * 100},
            "latency_ms": float("inf"), "extra": {"ignored": True},
        },
        "t1",
    )  # fmt: skip
    assert len(event["question"]) == 500
    assert event["plan"]["shape"] == "single"
    assert len(event["plan"]["steps"]) <= 32 and event["plan"]["steps"][0]["tier"] == "edge"
    assert "latency_ms" not in event and "extra" not in event


def test_stale_will_does_not_override_a_newer_birth():
    state = DashboardState()
    state.apply_status("a", {"agent_id": "a", "state": "online", "epoch": 2})
    assert state.apply_status("a", {"agent_id": "a", "state": "offline", "epoch": 1}) == []
    assert state.agents["a"].online is True and state.counters["stale_status"] == 1


# -- HTTP ---------------------------------------------------------------------------------------------------------
async def test_page_and_static_files_are_served(dashboard):
    status, headers, body = await http(dashboard.port, "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert b'src="/static/app.js"' in body and b"http" not in body.replace(b"http-equiv", b""), "no external URLs"
    assert "default-src 'self'" in headers["content-security-policy"]
    for name, ctype in [("app.js", "javascript"), ("app.css", "text/css")]:
        status, headers, body = await http(dashboard.port, f"/static/{name}")
        assert status == 200 and ctype in headers["content-type"] and int(headers["content-length"]) == len(body) > 0
    status, headers, body = await http(dashboard.port, "/static/app.css", method="HEAD")
    assert status == 200 and body == b"" and int(headers["content-length"]) > 0


@pytest.mark.parametrize("target", ["/nope", "/static/", "/static/missing.js", "/api", "/api/state/x", "/index.htm"])
async def test_unknown_paths_are_404(dashboard, target):
    status, _, body = await http(dashboard.port, target)
    assert status == 404 and json.loads(body)["status"] == 404


@pytest.mark.parametrize(
    "target",
    [
        "/static/../server.py",
        "/static/%2e%2e/server.py",
        "/static/..%2fserver.py",
        "/static/%2E%2E%2F%2E%2E%2F%2E%2E%2Fetc%2Fpasswd",
        "/../../../../etc/passwd",
        "/static/..\\server.py",
        "/static/%5c..%5cserver.py",
        "/static//etc/passwd",
        "/static/app.js%00.png",
        "/./static/app.js",
    ],
)
async def test_path_traversal_is_refused(dashboard, target):
    status, _, body = await http(dashboard.port, target)
    assert status == 403, (target, status)
    assert b"import" not in body and b"root:" not in body
    assert dashboard.statistics()["http_traversal_refused"] >= 1


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"POST /api/state HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 405),
        (b"DELETE / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 405),
        (b"GET /\r\n\r\n", 400),
        (b"GET http://evil/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 400),
        (b"GET /%ff%fe HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 400),
        # h11 refuses a head over 8 KiB (uvicorn answers every unparsable request with 400)
        (b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n", 400),
    ],
)
async def test_malformed_requests_get_4xx(dashboard, raw, expected):
    status, headers, _ = await http(dashboard.port, "", raw=raw)
    assert status == expected
    if expected == 405:
        assert headers["allow"] == "GET, HEAD"


async def test_silent_client_times_out_and_the_server_keeps_serving(settings, topics):
    async with Dashboard(settings, topics, port=0, header_timeout=0.2) as dash:
        reader, writer = await asyncio.open_connection("127.0.0.1", dash.port)
        writer.write(b"GET / HTTP/1.1\r\n")  # never finishes its head
        async with asyncio.timeout(5):
            data = await reader.read()
        writer.close()
        await writer.wait_closed()
        assert data.startswith(b"HTTP/1.1 408 ")
        assert (await http(dash.port, "/api/state"))[0] == 200


async def test_api_state_has_agents_readings_tasks_and_counts_bad_payloads(dashboard, make_agent, publisher, topics):
    async with make_agent("cam-central", description="Traffic camera at the central station", site="district-1"):
        await publisher.publish(
            topics.data("cam-central", "pm25"), encode(Reading("cam-central", "pm25", 14.5, "ug/m3").to_dict())
        )
        await publish_lifecycle(publisher, topics, "t-1")
        for bad in [b"\xc1", b"{not json", encode({"v": 1, "type": "task_event"}), encode({"v": 99})]:
            await publisher.publish(topics.task_event("t-bad"), bad)
        await publisher.publish(
            topics.data("cam-central", "pm25"), encode({"v": 1, "agent_id": "other", "sensor": "pm25", "value": 1})
        )
        await publisher.publish(
            topics.card("intruder"), encode({"v": 1, "type": "card", "agent_id": "cam-central", "epoch": 1})
        )
        state = await wait_state(
            dashboard.port,
            lambda s: s["tasks"] and s["tasks"][0]["state"] == "done" and s["server"].get("bad_payload", 0) >= 6,
        )
    assert state["prefix"] == topics.prefix
    [agent] = [a for a in state["agents"] if a["id"] == "cam-central"]
    assert agent["online"] is True and agent["card"]["description"] == "Traffic camera at the central station"
    assert agent["card"]["site"] == "district-1" and agent["card"]["capabilities"][0]["kind"] == "echo"
    assert "intruder" not in {a["id"] for a in state["agents"]}, (
        "a card whose agent_id differs from its topic is refused"
    )
    [series] = state["sensors"]
    assert (series["agent"], series["sensor"], series["unit"]) == ("cam-central", "pm25", "ug/m3")
    assert series["points"][0][1] == 14.5
    [task] = state["tasks"]
    assert task["task_id"] == "t-1" and task["tier"] == "edge" and task["latency_ms"] == 88.0
    assert [h["state"] for h in task["history"]] == [s for s, _ in LIFECYCLE]
    assert task["plan"] == PLAN and [s["agent"] for s in task["steps"]] == ["cam-central", "air-market"]
    assert task["classification"]["cooperation"] == ["data", "computation"]
    assert state["split"]["totals"] == {"edge": 1, "cloud": 0, "none": 0, "failed": 0}
    assert state["server"]["bad_payload"] == 6


async def test_metrics_endpoint_exports_every_counter_in_prometheus_format(dashboard, publisher, topics):
    await publisher.publish(topics.task_event("t-bad"), b"{not json")
    await wait_state(dashboard.port, lambda s: s["server"].get("bad_payload") == 1)
    assert (await http(dashboard.port, "/nope"))[0] == 404
    status, headers, body = await http(dashboard.port, "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain; version=")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    got = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    me = (("id", dashboard.conn.client_id),)
    assert got[("edgecoop_dashboard_bad_payload_total", me)] == 1
    assert got[("edgecoop_dashboard_http_404_total", me)] == 1
    assert got[("edgecoop_dashboard_http_requests_total", me)] >= 3
    assert (
        got[("edgecoop_dashboard_sse_clients", me)] == 0 and families["edgecoop_dashboard_sse_clients"].type == "gauge"
    )
    assert got[("edgecoop_mqtt_connects_total", (("component", "dashboard"), *me))] == 1
    assert families["edgecoop_mqtt_messages"].type == "counter"


async def test_deregistered_agent_disappears(dashboard, make_agent):
    async with make_agent("short-lived") as agent:
        await wait_state(dashboard.port, lambda s: any(a["id"] == "short-lived" for a in s["agents"]))
        await agent.deregister()
        await wait_state(dashboard.port, lambda s: not s["agents"])


async def read_sse_event(reader: asyncio.StreamReader, name: str, match=lambda data: True) -> dict[str, Any]:
    async with asyncio.timeout(5):
        while True:
            block = (await reader.readuntil(b"\n\n")).decode()
            fields = dict(line.split(": ", 1) for line in block.strip().split("\n") if ": " in line)
            data: dict[str, Any] = json.loads(fields["data"]) if "data" in fields else {}
            if fields.get("event") == name and match(data):
                return data


def alarm(active: bool, dropped: int = 30) -> bytes:
    return encode({"v": 1, "type": "alarm", "alarm": "broker_dropped", "source": "orch", "active": active,
                   "dropped": dropped, "dropped_total": dropped, "since": time.time() - 5, "ts": time.time(),
                   "suspects": [{"agent_id": "cam-central", "outstanding": 12}] if active else []})  # fmt: skip


async def test_orchestrator_status_and_alarms_reach_the_api(dashboard, publisher, topics):
    online = encode(Status("orch", True, 5).to_dict())
    await publisher.publish(topics.orchestrator_status("orch"), online, qos=1, retain=True)
    await publisher.publish(topics.orchestrator_alarm("orch"), alarm(True), qos=1, retain=True)
    state = await wait_state(dashboard.port, lambda s: s["orchestrators"] and s["orchestrators"][0]["alarm"])
    [orch] = state["orchestrators"]
    assert (orch["id"], orch["online"], orch["alarm"]["active"], orch["alarm"]["dropped"]) == ("orch", True, True, 30)
    # its Last Will, then the alarm cleared
    await publisher.publish(topics.orchestrator_status("orch"), encode(Status("orch", False, 5).to_dict()), retain=True)
    await publisher.publish(topics.orchestrator_alarm("orch"), alarm(False), qos=1, retain=True)
    state = await wait_state(dashboard.port, lambda s: s["orchestrators"][0]["alarm"]["active"] is False)
    assert state["orchestrators"][0]["online"] is False
    for topic in (topics.orchestrator_status("orch"), topics.orchestrator_alarm("orch")):
        await publisher.publish(topic, b"", qos=1, retain=True)


async def test_broker_loss_and_return_are_in_the_state(private_broker, topics):
    settings = BrokerSettings(port=private_broker.port, keepalive=5)
    async with Dashboard(settings, topics, port=0) as dash:
        assert (await api_state(dash.port))["broker"]["connected"] is True
        private_broker.stop()
        async with asyncio.timeout(10):
            await dash.conn.disconnected.wait()
        state = await wait_state(dash.port, lambda s: not s["broker"]["connected"])
        assert state["broker"]["url"] == settings.url and state["broker"]["since"] > 0
        private_broker.start()
        async with asyncio.timeout(20):  # the reconnect backoff is capped at ~8 s
            await dash.conn.connected.wait()
        await wait_state(dash.port, lambda s: s["broker"]["connected"])


async def test_sse_streams_a_snapshot_then_changes(dashboard, publisher, topics):
    reader, writer = await asyncio.open_connection("127.0.0.1", dashboard.port)
    try:
        writer.write(b"GET /events HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ") and b"text/event-stream" in head
        snapshot = await read_sse_event(reader, "snapshot")
        assert snapshot["prefix"] == topics.prefix and snapshot["tasks"] == []
        await publish_lifecycle(publisher, topics, "t-sse")
        done = await read_sse_event(reader, "task", lambda t: t["state"] == "done")
        assert done["task_id"] == "t-sse" and done["answer"].startswith("412 vehicles")
        split = await read_sse_event(reader, "split")
        assert split["totals"]["edge"] == 1
        assert dashboard.statistics()["sse_clients"] == 1
    finally:
        writer.close()
        await writer.wait_closed()


async def test_slow_sse_client_is_dropped_and_others_keep_streaming(settings, topics):
    async with Dashboard(settings, topics, port=0, sse_queue_size=4) as dash:
        slow = socket.socket()
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow.connect(("127.0.0.1", dash.port))
        slow.sendall(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")  # ... and never reads
        reader, writer = await asyncio.open_connection("127.0.0.1", dash.port)
        try:
            writer.write(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
            await read_sse_event(reader, "snapshot")
            async with asyncio.timeout(10):
                await eventually(lambda: dash.statistics()["sse_clients"] == 2)
                blob = "x" * 50_000
                while not dash.statistics().get("sse_dropped"):
                    dash.broadcast([("test", {"blob": blob})])
                    await read_sse_event(reader, "test")  # the fast client keeps up, one event at a time
            assert dash.statistics()["sse_clients"] == 1, "only the slow client was dropped"
            dash.broadcast([("test", {"after": True})])
            assert await read_sse_event(reader, "test", lambda d: d.get("after"))
        finally:
            slow.close()
            writer.close()
            await writer.wait_closed()


async def test_too_many_sse_clients_get_503(settings, topics):
    async with Dashboard(settings, topics, port=0, max_sse_clients=1) as dash:
        reader, writer = await asyncio.open_connection("127.0.0.1", dash.port)
        try:
            writer.write(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
            await read_sse_event(reader, "snapshot")
            assert (await http(dash.port, "/events"))[0] == 503
        finally:
            writer.close()
            await writer.wait_closed()


# -- the page in headless Chromium ---------------------------------------------------------------------------------
def find_chromium() -> str:
    for candidate in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    pytest.fail(
        "headless Chromium is required for the dashboard browser test but was not found at /usr/bin/chromium: "
        "install it with `apt-get install -y chromium` (scripts/setup does this)",
        pytrace=False,
    )


class Chromium:
    """Headless Chromium driven over the DevTools pipe (fd 3: commands in, fd 4: replies out, NUL-separated)."""

    def __init__(self, exe: str, profile: Path, width: int = 1400, height: int = 1000) -> None:
        cmd_r, self._cmd_w = os.pipe()
        self._out_r, out_w = os.pipe()
        # move the child's ends above 9 so the shell's 3<& / 4>& redirections cannot clobber them
        child_in, child_out = fcntl.fcntl(cmd_r, fcntl.F_DUPFD, 10), fcntl.fcntl(out_w, fcntl.F_DUPFD, 10)
        os.close(cmd_r)
        os.close(out_w)
        flags = [*CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--remote-debugging-pipe", "--hide-scrollbars",
                 f"--window-size={width},{height}", "about:blank"]  # fmt: skip
        self.proc = subprocess.Popen(
            ["bash", "-c", f'exec "$0" "$@" 3<&{child_in} 4>&{child_out} {child_in}<&- {child_out}>&-', exe, *flags],
            pass_fds=(child_in, child_out),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        os.close(child_in)
        os.close(child_out)
        self._buf = b""
        self._id = 0
        self.session = ""
        self.exceptions: list[dict[str, Any]] = []

    def _message(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no reply from Chromium")
            if select.select([self._out_r], [], [], left)[0]:
                chunk = os.read(self._out_r, 1 << 20)
                if not chunk:
                    raise EOFError(f"Chromium exited (code {self.proc.poll()})")
                self._buf += chunk
        raw, _, self._buf = self._buf.partition(b"\0")
        message: dict[str, Any] = json.loads(raw)
        return message

    def call(self, method: str, timeout: float = 15.0, **params: Any) -> dict[str, Any]:
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params}
        if self.session and not method.startswith(("Target.", "Browser.")):
            msg["sessionId"] = self.session
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._message(deadline)
            if reply.get("method") == "Runtime.exceptionThrown":
                self.exceptions.append(reply["params"]["exceptionDetails"])
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                result: dict[str, Any] = reply.get("result", {})
                return result

    def open(self, url: str) -> None:
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Runtime.enable")
        self.call("Page.enable")
        self.call("Page.navigate", url=url)

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page error evaluating {expression!r}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 10.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(f"(() => {{ try {{ return ({expression}); }} catch (e) {{ return false; }} }})()")
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"page never satisfied {expression!r}")
            time.sleep(0.05)

    def screenshot(self, path: Path) -> None:
        width, height = self.evaluate("[document.documentElement.scrollWidth, document.documentElement.scrollHeight]")
        data = self.call(
            "Page.captureScreenshot",
            format="png",
            captureBeyondViewport=True,
            clip={"x": 0, "y": 0, "width": width, "height": height, "scale": 1},
        )["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.call("Browser.close", timeout=5)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the process group we started, nothing else
            self.proc.wait(5)
        finally:
            os.close(self._cmd_w)
            os.close(self._out_r)


AGENTS = [
    ("cam-central", "Traffic camera at the central station (YOLO-nano on a Jetson Orin Nano)", "count_vehicles"),
    ("air-market", "PM2.5 and temperature sensor, Market Square", "air_quality"),
    ("slm-pi4", "SmolLM2-135M-Instruct on a Raspberry Pi 4", "summarize"),
]


@pytest.mark.browser
async def test_dashboard_in_headless_chromium(dashboard, make_agent, publisher, topics, tmp_path):
    exe = find_chromium()
    async with contextlib.AsyncExitStack() as stack:
        for agent_id, description, capability in AGENTS:
            caps = [{"kind": "echo", "name": capability, "description": description.split(",")[0]}]
            await stack.enter_async_context(
                make_agent(agent_id, description=description, site="district-1", capabilities=caps)
            )
        start = time.time() - 120
        for i in range(120):
            for sensor, unit, value in [
                ("pm25", "µg/m³", 12 + 4 * ((i % 40) / 20 - 1) ** 2),
                ("temp", "°C", 18 + i / 30),
            ]:
                reading = Reading("air-market", sensor, round(value, 2), unit, ts=start + i)
                await publisher.publish(topics.data("air-market", sensor), encode(reading.to_dict()), qos=0)
        # earlier traffic for the split chart and an in-flight, sequential task with an edge -> cloud plan
        await publish_lifecycle(publisher, topics, "t-0", [
            ("received", {"question": "Write a short poem about the station"}),
            ("escalated", {}),
            ("step_done", {"step": {"agent": "cloud-gw", "capability": "chat", "tier": "cloud", "ms": 910.0, "ok": True}}),
            ("done", {"answer": "Steel rails hum ...", "tier": "cloud", "latency_ms": 955.0, "cost": 0.0021}),
        ])  # fmt: skip
        await publish_lifecycle(publisher, topics, "t-2", [
            ("received", {"question": "Summarise today's incidents near the market"}),
            ("planned", {"plan": {"shape": "sequential", "steps": [
                {"agent": "slm-pi4", "capability": "summarize", "tier": "edge"},
                {"agent": "cloud-gw", "capability": "chat", "tier": "cloud"}]}}),
            ("step_done", {"step": {"agent": "slm-pi4", "capability": "summarize", "tier": "edge", "ms": 310.0, "ok": True}}),
        ])  # fmt: skip
        # a failed task (it tried the edge), the demo's cloud-only baseline run, an orchestrator in overload
        await publish_lifecycle(publisher, topics, "t-3", [
            ("received", {"question": "How many buses are late at the market?"}),
            ("failed", {"tier": "edge", "latency_ms": 5000.0}),
        ])  # fmt: skip
        await publish_lifecycle(publisher, topics, "baseline-1", [
            ("received", {"question": "How busy is the central station, and is the air ok?", "strategy": "cloud-only"}),
            ("done", {"answer": "Probably busy (a guess).", "tier": "cloud", "latency_ms": 900.0, "cost": 0.002}),
        ])  # fmt: skip
        await publisher.publish(topics.orchestrator_status("orchestrator"),
                                encode(Status("orchestrator", True, 1).to_dict()), qos=1, retain=True)  # fmt: skip
        await publisher.publish(topics.orchestrator_alarm("orchestrator"), alarm(True), qos=1, retain=True)
        await wait_state(
            dashboard.port,
            lambda s: (
                len(s["agents"]) == 3
                and len(s["tasks"]) == 4
                and [len(x["points"]) for x in s["sensors"]] == [120, 120]
                and s["orchestrators"]
                and s["orchestrators"][0]["alarm"]
            ),
        )

        browser = await asyncio.to_thread(Chromium, exe, tmp_path / "profile")
        try:
            await asyncio.to_thread(browser.open, dashboard.url + "/")
            # live: the event stream is open before the task below even starts
            await asyncio.to_thread(browser.wait_for, "document.getElementById('conn').dataset.state === 'live'")
            await publish_lifecycle(publisher, topics, "t-1", [LIFECYCLE[0], LIFECYCLE[2], *LIFECYCLE[3:]])
            selector = '[data-task-id="t-1"][data-state="done"]'
            await asyncio.to_thread(browser.wait_for, f"document.querySelector('{selector}') !== null")
            dom = await asyncio.to_thread(
                browser.evaluate,
                """(() => {
                  const task = document.querySelector('[data-task-id="t-1"]');
                  return {
                    agents: [...document.querySelectorAll('[data-agent-id]')].map(a => [a.dataset.agentId, a.dataset.online, a.textContent]),
                    task: task.textContent,
                    inDone: task.parentElement.id,
                    graphAgents: [...task.querySelectorAll('svg.graph g.step')].map(g => [g.dataset.agent, g.getAttribute('class')]),
                    timeline: [...task.querySelectorAll('.timeline li')].map(li => li.textContent.split(' +')[0]),
                    inflight: [...document.querySelectorAll('#tasks-inflight [data-task-id]')].map(t => t.dataset.taskId),
                    sensors: [...document.querySelectorAll('[data-sensor]')].map(s => [s.dataset.sensor, s.querySelector('polyline').getAttribute('points').split(' ').length]),
                    split: document.getElementById('split').textContent,
                    summary: document.getElementById('summary').textContent,
                    done: [...document.querySelectorAll('#tasks-done [data-task-id]')].map(t => t.dataset.taskId),
                    comparison: [...document.querySelectorAll('#tasks-comparison [data-task-id]')].map(t => [t.dataset.taskId, t.textContent.includes('baseline run')]),
                    comparisonHidden: document.getElementById('comparison-section').hidden,
                    orchestrators: [...document.querySelectorAll('[data-orchestrator-id]')].map(o => [o.dataset.orchestratorId, o.dataset.online, o.dataset.alarm, o.textContent]),
                    conn: document.getElementById('conn').textContent,
                    html: document.documentElement.outerHTML,
                  };
                })()""",
            )
            await asyncio.to_thread(
                browser.screenshot, SCREENSHOT if os.environ.get("EDGECOOP_SCREENSHOTS") else tmp_path / "dashboard.png"
            )
            assert browser.exceptions == [], f"JavaScript errors on the page: {browser.exceptions}"
        finally:
            await asyncio.to_thread(browser.close)

    assert sorted(a[0] for a in dom["agents"]) == ["air-market", "cam-central", "slm-pi4"]
    assert all(online == "true" for _, online, _ in dom["agents"])
    cam = next(text for agent_id, _, text in dom["agents"] if agent_id == "cam-central")
    assert "Traffic camera at the central station" in cam and "count_vehicles" in cam and "online" in cam
    assert dom["inDone"] == "tasks-done"
    assert "How busy is the central station" in dom["task"] and "412 vehicles" in dom["task"]
    assert [a for a, _ in dom["graphAgents"]] == ["cam-central", "air-market"]
    assert all("tier-edge" in cls and "done" in cls for _, cls in dom["graphAgents"])
    assert dom["timeline"] == ["received", "planned", "step done", "step done", "done"]
    assert dom["inflight"] == ["t-2"]
    assert sorted(dom["sensors"]) == [["pm25", 120], ["temp", 120]]
    # the failed task counts as failed; the baseline run is listed apart and counted nowhere else
    assert "edge 1 (33 %)" in dom["split"] and "cloud 1 (33 %)" in dom["split"] and "failed 1 (33 %)" in dom["split"]
    assert "not counted: 1 baseline run" in dom["split"]
    assert dom["summary"] == "3 agents · 4 tasks · 1 answered at the edge, 1 in the cloud, 1 failed", dom["summary"]
    assert sorted(dom["done"]) == ["t-0", "t-1", "t-3"] and dom["comparison"] == [["baseline-1", True]]
    assert dom["comparisonHidden"] is False
    [(orch_id, orch_online, orch_alarm, orch_text)] = dom["orchestrators"]
    assert (orch_id, orch_online, orch_alarm) == ("orchestrator", "online", "true")
    assert (
        "degraded" in orch_text and "dropped 30 messages" in orch_text and "cam-central (12 outstanding)" in orch_text
    )
    assert dom["conn"] == "live"
    assert "<script>" not in dom["html"] and "https://" not in dom["html"], (
        "offline page: no inline or external scripts"
    )


@pytest.mark.browser
async def test_broker_loss_turns_the_live_badge_off_in_headless_chromium(private_broker, topics, tmp_path):
    """With the broker down the page says so, and no agent is shown as online or offline; back when it is back."""
    exe = find_chromium()
    settings = BrokerSettings(port=private_broker.port, keepalive=5)
    from edgecoop.agents import Agent
    from tests.conftest import agent_config

    async with Dashboard(settings, topics, port=0) as dash, Agent(agent_config("cam-central", settings, topics)):
        await wait_state(dash.port, lambda s: [a["online"] for a in s["agents"]] == [True])
        browser = await asyncio.to_thread(Chromium, exe, tmp_path / "profile")
        try:
            await asyncio.to_thread(browser.open, dash.url + "/")
            await asyncio.to_thread(browser.wait_for, "document.getElementById('conn').dataset.state === 'live'")
            await asyncio.to_thread(
                browser.wait_for, "document.getElementById('agents-count').textContent === '1 online / 1'"
            )
            private_broker.stop()
            await asyncio.to_thread(browser.wait_for, "document.getElementById('conn').dataset.state === 'broker-down'")
            down = await asyncio.to_thread(
                browser.evaluate,
                """({
                conn: document.getElementById('conn').textContent,
                count: document.getElementById('agents-count').textContent,
                agent: document.querySelector('[data-agent-id="cam-central"]').dataset.online,
                badge: document.querySelector('[data-agent-id="cam-central"] .badge').textContent,
            })""",
            )
            private_broker.start()
            await asyncio.to_thread(browser.wait_for, "document.getElementById('conn').dataset.state === 'live'", 20)
            await asyncio.to_thread(browser.wait_for,
                                    "document.querySelector('[data-agent-id=\"cam-central\"]').dataset.online === 'true'",
                                    20)  # fmt: skip
            assert browser.exceptions == [], f"JavaScript errors on the page: {browser.exceptions}"
        finally:
            await asyncio.to_thread(browser.close)
    assert down["conn"].startswith("broker down since ")
    # (how many were online when last seen depends on whether the stopping broker delivered the agent's will first)
    assert down["count"].startswith("broker unreachable: 1 known, online status unknown ("), down["count"]
    assert (down["agent"], down["badge"]) == ("unknown", "unknown")
