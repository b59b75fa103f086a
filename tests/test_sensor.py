"""The sensor capability over a real broker: readings on data topics at the configured rate, queries that match
the computable ground truth, and clear errors."""

import asyncio
import itertools
import time
import uuid

import pytest

from edgecoop.agents.handlers.sensor import (
    PATTERNS,
    SensorSpec,
    expected_value,
    expected_window,
)
from edgecoop.connection import Connection
from edgecoop.errors import ConfigError, RemoteError
from edgecoop.messages import SensorInfo
from edgecoop.wire import decode

HR = {"name": "hr", "pattern": "heart_rate", "rate_hz": 20, "seed": 1}
PM = {"name": "pm25", "pattern": "pm25", "rate_hz": 10}


def sensors(*specs, **options):
    return [{"kind": "sensor", "options": {"sensors": list(specs), **options}}]


class DataListener:
    """Subscribes to every data topic and wakes the test when enough readings arrived."""

    def __init__(self, settings, topics, want: int):
        self.readings: list[tuple[float, str, dict, int, bool]] = []
        self.want = want
        self.enough = asyncio.Event()
        self.conn = Connection(
            settings,
            f"data-{uuid.uuid4().hex[:8]}",
            subscriptions=[(topics.all_data(), 0)],
            handler=self.on_message,
            clean_start=True,
        )

    def on_message(self, message):
        payload, _ = decode(message.payload)
        self.readings.append((time.monotonic(), str(message.topic), payload, message.qos, message.retain))
        if sum(1 for r in self.readings if r[2]["sensor"] == "hr") >= self.want:
            self.enough.set()


# -- ground truth functions ----------------------------------------------------------------------------------
def test_expected_values_are_deterministic_and_plausible():
    t0 = 1_700_000_000.0
    for pattern, preset in PATTERNS.items():
        if pattern == "csv":
            continue
        spec = SensorSpec.from_dict({"name": "x", "pattern": pattern, "rate_hz": 1})
        values = [expected_value(spec, t0 + h * 3600) for h in range(24)]
        assert values == [expected_value(spec, t0 + h * 3600) for h in range(24)]
        assert all(preset.lo <= v <= preset.hi for v in values)
    hr = [expected_value(HR, t0 + s) for s in range(0, 86400, 600)]
    assert min(hr) > 50 and max(hr) < 95  # a resting adult
    spo2 = [expected_value({"name": "o", "pattern": "spo2"}, t0 + s) for s in range(0, 3600, 60)]
    assert all(94 <= v <= 100 for v in spo2)
    # the same sample index gives the same value whatever the exact time inside the sample period
    assert expected_value(HR, t0 + 0.0) == expected_value(HR, t0 + 0.049)
    # a different seed gives a different series
    other = {**HR, "seed": 2}
    assert [expected_value(HR, t0 + s) for s in range(60)] != [expected_value(other, t0 + s) for s in range(60)]


def test_urban_patterns_follow_the_rush_hour():
    flow = {"name": "flow", "pattern": "traffic_flow", "noise": 0}
    night, morning = expected_value(flow, 3 * 3600), expected_value(flow, 8 * 3600)
    assert night < 8 and morning > 20


def test_episodes_and_csv_replay(tmp_path):
    base = {"name": "hr", "pattern": "constant", "base": 70, "noise": 0, "rate_hz": 1}
    spiky = {**base, "episodes": [{"every_s": 3600, "duration_s": 300, "delta": 50}]}
    assert expected_value(spiky, 7200 + 10) == 120 and expected_value(spiky, 7200 + 400) == 70
    f = tmp_path / "flow.csv"
    f.write_text("ts,value\n0,5\n1,7.5\n2,9\n")
    csv_spec = SensorSpec.from_dict({"name": "flow", "source": f"csv:{f}", "rate_hz": 1})
    assert [expected_value(csv_spec, t) for t in range(3, 7)] == [5, 7.5, 9, 5]


@pytest.mark.parametrize(
    ("entry", "text"),
    [
        ({"name": "x", "pattern": "tides"}, "unknown pattern"),
        ({"name": "a/b"}, "forbidden"),
        ({"name": "x", "rate_hz": 0}, "rate_hz"),
        ({"name": "x", "colour": "red"}, "unknown option"),
        ({"name": "x", "source": "http://x"}, "source must be"),
        ({"name": "x", "episodes": [{"every_s": 10}]}, "missing"),
    ],
)
def test_bad_sensor_options_are_config_errors(make_agent, entry, text):
    with pytest.raises(ConfigError, match=text):
        make_agent("s1", capabilities=sensors(entry))


# -- over the broker -------------------------------------------------------------------------------------
async def test_readings_arrive_on_data_topics_at_the_configured_rate(make_agent, settings, topics):
    listener = DataListener(settings, topics, want=30)
    async with listener.conn, make_agent("s1", capabilities=sensors(HR, PM)) as agent:
        async with asyncio.timeout(10):
            await listener.enough.wait()
    hr = [r for r in listener.readings if r[2]["sensor"] == "hr"]
    assert {r[1] for r in hr} == {topics.data("s1", "hr")}
    assert all(qos == 0 and not retain for *_, qos, retain in hr)
    first = hr[0][2]
    assert first["type"] == "reading" and first["agent_id"] == "s1" and first["unit"] == "bpm"
    # timestamps sit on the 20 Hz sample grid, consecutive, and every value is the computable ground truth
    ts = [r[2]["ts"] for r in hr]
    assert all(b - a == pytest.approx(0.05, abs=1e-4) for a, b in itertools.pairwise(ts))
    assert all(r[2]["value"] == expected_value(HR, r[2]["ts"]) for r in hr)
    # arrival rate is about the configured rate (measured over the arrivals, not assumed from sleeps)
    span = hr[-1][0] - hr[5][0]
    rate = (len(hr) - 6) / span
    assert 12 < rate < 30, rate
    assert any(r[2]["sensor"] == "pm25" for r in listener.readings)
    assert agent.handlers["sensor"].published >= 30
    assert SensorInfo("hr", "vital_signs", "bpm", 20.0) in agent.card().sensors


async def test_latest_and_window_match_the_ground_truth(make_agent, client, settings, topics):
    listener = DataListener(settings, topics, want=15)
    async with listener.conn, make_agent("s1", capabilities=sensors(HR, PM)):
        async with asyncio.timeout(10):
            await listener.enough.wait()
        latest = (await client.req.request("s1", "sensor", {"op": "latest", "sensor": "hr"}, timeout=5)).result
        assert latest["value"] == expected_value(HR, latest["ts"])
        assert (latest["unit"], latest["modality"], latest["n"]) == ("bpm", "vital_signs", 1)
        for agg in ("mean", "min", "max", "count", "sum", "last"):
            inp = {"op": "window", "sensor": "hr", "seconds": 0.5, "agg": agg}
            r = (await client.req.request("s1", "sensor", inp, timeout=5)).result
            value, n = expected_window(HR, r["ts"], 0.5, agg)
            assert r["n"] == n == 10 and r["value"] == pytest.approx(value), agg
        listed = (await client.req.request("s1", "sensor", {"op": "list"}, timeout=5)).result
        assert [s["name"] for s in listed["sensors"]] == ["hr", "pm25"]
        assert listed["sensors"][1]["unit"] == "µg/m³"


async def test_latest_right_after_start_waits_for_the_first_sample(make_agent, client):
    async with make_agent("s1", capabilities=sensors({"name": "t", "pattern": "body_temperature", "rate_hz": 2})):
        r = (await client.req.request("s1", "sensor", {"sensor": "t"}, timeout=5)).result
    assert r["unit"] == "°C" and 35 < r["value"] < 38.5


@pytest.mark.parametrize(
    ("inp", "code", "text"),
    [
        ({"op": "latest", "sensor": "nope"}, "capability", "unknown sensor 'nope'; this agent has hr, pm25"),
        ({"op": "latest"}, "capability", "unknown sensor None"),
        ({"op": "explode", "sensor": "hr"}, "capability", "unknown sensor op"),
        ({"op": "window", "sensor": "hr", "agg": "median"}, "bad_input", "agg must be one of"),
        ({"op": "window", "sensor": "hr", "seconds": -1}, "bad_input", "seconds must be"),
    ],
)
async def test_bad_queries_get_clear_error_replies(make_agent, client, inp, code, text):
    async with make_agent("s1", capabilities=sensors(HR, PM)):
        with pytest.raises(RemoteError) as exc:
            await client.req.request("s1", "sensor", inp, timeout=5)
    assert exc.value.code == code and text in exc.value.remote_message


async def test_ring_buffer_is_bounded(make_agent, client, settings, topics):
    listener = DataListener(settings, topics, want=30)
    async with listener.conn, make_agent("s1", capabilities=sensors(HR, buffer_s=1)) as agent:
        async with asyncio.timeout(10):
            await listener.enough.wait()
        buf = agent.handlers["sensor"].buffers["hr"]
        assert buf.maxlen == 21 and len(buf) == 21
        r = await client.req.request("s1", "sensor", {"op": "window", "seconds": 60, "agg": "count"}, timeout=5)
        assert r.result["value"] == 21  # only one sensor configured: "sensor" may be omitted
