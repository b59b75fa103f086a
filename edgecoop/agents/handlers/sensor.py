"""The ``sensor`` capability: simulated (or CSV-replayed) sensors that publish readings and answer queries.

Every sensor samples on a fixed grid: sample ``k`` has timestamp ``k / rate_hz`` (Unix seconds) and a value that
is a pure function of the sensor's spec and ``k``. Ground truth for any scenario is therefore computable
anywhere with :func:`expected_value` / :func:`expected_window`, without listening to the agent.

Options (``[capabilities.options]``)::

    sensors = [{name = "pm25", pattern = "pm25", rate_hz = 1.0, seed = 7},
               {name = "hr", pattern = "heart_rate", base = 72, rate_hz = 2},
               {name = "flow", source = "csv:data/flow.csv", unit = "veh/min", rate_hz = 0.5}]
    buffer_s = 600      # ring buffer length per sensor, seconds (bounded by max_buffer samples)

Requests: ``{"op": "list"}``, ``{"op": "latest", "sensor": name}``,
``{"op": "window", "sensor": name, "seconds": 60, "agg": "mean"|"min"|"max"|"count"|"sum"|"last"}``.
"""

from __future__ import annotations

import asyncio
import csv
import dataclasses
import functools
import hashlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgecoop.agents.handlers.base import AgentContext, CallContext, Handler
from edgecoop.errors import CapabilityError, ConfigError, EdgecoopError, TopicError
from edgecoop.messages import Reading, SensorInfo
from edgecoop.topics import validate_id
from edgecoop.wire import WIRE_VERSION, encode

if TYPE_CHECKING:
    from edgecoop.agents.config import AgentConfig, CapabilitySpec

__all__ = [
    "AGGREGATES",
    "PATTERNS",
    "Episode",
    "SensorHandler",
    "SensorSpec",
    "expected_value",
    "expected_window",
    "sample_index",
]

log = logging.getLogger(__name__)

AGGREGATES = ("mean", "min", "max", "count", "sum", "last")
MAX_RATE_HZ = 100.0
_MAX_BUFFER = 100_000


# -- deterministic noise -------------------------------------------------------------------------------------
def _unit(seed: int, key: str, k: int) -> float:
    """A uniform number in [0, 1) that depends only on (seed, key, k)."""
    digest = hashlib.blake2b(f"{seed}|{key}|{k}".encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "little") >> 11) / float(1 << 53)


def _gauss(seed: int, key: str, k: int) -> float:
    """A standard normal number that depends only on (seed, key, k) (Box-Muller)."""
    u1 = max(_unit(seed, key + "/a", k), 1e-12)
    u2 = _unit(seed, key + "/b", k)
    return math.sqrt(-2.0 * math.log(u1)) * math.cos(2 * math.pi * u2)


def _smooth(seed: int, key: str, x: float) -> float:
    """Smooth value noise in [-1, 1]: random values at integers, smoothstep-interpolated in between."""
    i = math.floor(x)
    f = x - i
    a = 2 * _unit(seed, key, i) - 1
    b = 2 * _unit(seed, key, i + 1) - 1
    s = f * f * (3 - 2 * f)
    return a + (b - a) * s


def _drift(seed: int, key: str, x: float) -> float:
    """Three octaves of value noise, roughly in [-1, 1]: a bounded random-walk-like wander, O(1) at any time."""
    return (
        0.6 * _smooth(seed, key + "/1", x)
        + 0.3 * _smooth(seed, key + "/2", 2.7 * x)
        + 0.1 * _smooth(seed, key + "/3", 7.3 * x)
    )


def _hour(t: float, utc_offset_h: float) -> float:
    return ((t / 3600.0) + utc_offset_h) % 24.0


def _bump(h: float, centre: float, width: float) -> float:
    d = min(abs(h - centre), 24 - abs(h - centre))
    return math.exp(-0.5 * (d / width) ** 2)


def _rush(h: float) -> float:
    """Urban weekday profile in [0, 1]: morning peak 08:00, evening peak 17:30, low at night."""
    return min(1.0, _bump(h, 8.0, 1.3) + 0.9 * _bump(h, 17.5, 1.8) + 0.35 * _bump(h, 13.0, 3.0))


# -- patterns ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class _Preset:
    modality: str
    unit: str
    base: float
    amplitude: float
    noise: float
    decimals: int
    lo: float = -math.inf
    hi: float = math.inf


PATTERNS: dict[str, _Preset] = {
    # generic shapes
    "constant": _Preset("generic", "", 0.0, 0.0, 0.0, 3),
    "sine": _Preset("generic", "", 0.0, 1.0, 0.0, 3),
    "diurnal": _Preset("generic", "", 0.0, 1.0, 0.0, 3),
    "rush_hour": _Preset("generic", "", 0.0, 1.0, 0.0, 3),
    "random_walk": _Preset("generic", "", 0.0, 1.0, 0.0, 3),
    "csv": _Preset("generic", "", 0.0, 0.0, 0.0, 6),
    # urban
    "pm25": _Preset("air_quality", "µg/m³", 8.0, 14.0, 1.0, 1, lo=0.0),
    "pm10": _Preset("air_quality", "µg/m³", 15.0, 20.0, 2.0, 1, lo=0.0),
    "no2": _Preset("air_quality", "µg/m³", 15.0, 35.0, 2.0, 1, lo=0.0),
    "traffic_flow": _Preset("traffic", "vehicles/min", 3.0, 27.0, 1.5, 0, lo=0.0),
    "bus_occupancy": _Preset("transit", "passengers", 4.0, 60.0, 3.0, 0, lo=0.0, hi=90.0),
    "noise_level": _Preset("noise", "dB(A)", 48.0, 20.0, 1.5, 1, lo=20.0),
    # health
    "heart_rate": _Preset("vital_signs", "bpm", 70.0, 6.0, 1.0, 0, lo=25.0, hi=230.0),
    "spo2": _Preset("vital_signs", "%", 97.5, 1.0, 0.4, 0, lo=50.0, hi=100.0),
    "body_temperature": _Preset("vital_signs", "°C", 36.8, 0.15, 0.03, 2, lo=30.0, hi=43.0),
    "respiration_rate": _Preset("vital_signs", "breaths/min", 15.0, 2.0, 0.5, 0, lo=4.0, hi=60.0),
}


@dataclass(frozen=True, slots=True)
class Episode:
    """A periodic deviation added to the pattern: ``delta`` during ``[offset_s, offset_s + duration_s)``
    of every ``every_s`` seconds (absolute Unix time), e.g. a tachycardia episode or a pollution spike."""

    every_s: float
    duration_s: float
    delta: float
    offset_s: float = 0.0

    def active(self, t: float) -> bool:
        phase = (t - self.offset_s) % self.every_s
        return 0 <= phase < self.duration_s


_NUMBER = ((int, float), "a number")
#: the expected type of each scalar sensor option (SensorSpec's fields)
_OPTION_TYPES: dict[str, tuple[type | tuple[type, ...], str]] = {
    **dict.fromkeys(("name", "pattern", "modality", "unit", "label", "source"), (str, "a string")),
    **dict.fromkeys(
        ("rate_hz", "base", "amplitude", "noise", "period_s", "peak_hour", "utc_offset_h", "time_scale", "lo", "hi"),
        _NUMBER,
    ),
    **dict.fromkeys(("seed", "decimals"), (int, "an integer")),
    "episodes": (list, "an array of tables {every_s, duration_s, delta, offset_s}"),
}


@dataclass(frozen=True, slots=True)
class SensorSpec:
    """One configured sensor; unset numbers come from the pattern's preset."""

    name: str
    pattern: str = "constant"
    modality: str = ""
    unit: str = ""
    #: what people call it ("noise level") and the words they use for it: vocabulary the orchestrator learns
    label: str = ""
    words: tuple[str, ...] = ()
    rate_hz: float = 1.0
    source: str = "simulated"
    base: float | None = None
    amplitude: float | None = None
    noise: float | None = None
    seed: int | None = None
    decimals: int | None = None
    period_s: float = 300.0  # sine period / random-walk correlation time
    peak_hour: float = 15.0  # diurnal: local hour of the maximum
    utc_offset_h: float = 0.0
    time_scale: float = 1.0  # simulated seconds per real second (demos compress a day into minutes)
    lo: float | None = None
    hi: float | None = None
    episodes: tuple[Episode, ...] = ()
    csv_path: Path | None = field(default=None, compare=False)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, base_dir: Path | None = None) -> SensorSpec:
        """Validate one entry of ``options.sensors``; raise :class:`ConfigError` with the field at fault."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"sensor entries must be tables, not {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)} - {"csv_path"}
        unknown = sorted(set(d) - known)
        name = d.get("name")
        where = f"sensor {name!r}"
        if unknown:
            raise ConfigError(f"{where}: unknown option(s) {unknown}; known: {sorted(known)}")
        for key, value in d.items():  # types first: `rate_hz = "fast"` is a message, not a TypeError later
            expected = _OPTION_TYPES.get(key)
            if expected is not None and (isinstance(value, bool) or not isinstance(value, expected[0])):
                raise ConfigError(f"{where}: {key} must be {expected[1]}, not {value!r}")
        try:
            validate_id(name, "sensor name")
        except TopicError as exc:
            raise ConfigError(f"{where}: {exc}") from exc
        values: dict[str, Any] = dict(d)
        words = values.get("words", ())
        if not isinstance(words, list | tuple) or not all(isinstance(w, str) for w in words):
            raise ConfigError(f"{where}: words must be a list of strings")
        values["words"] = tuple(words)
        source = str(values.get("source", "simulated"))
        csv_path = None
        if source.startswith("csv:"):
            csv_path = Path(source[4:])
            if not csv_path.is_absolute() and base_dir is not None:
                csv_path = base_dir / csv_path
            values.setdefault("pattern", "csv")
        elif source != "simulated":
            raise ConfigError(f"{where}: source must be 'simulated' or 'csv:<path>', not {source!r}")
        pattern = str(values.get("pattern", "constant"))
        if pattern not in PATTERNS:
            raise ConfigError(f"{where}: unknown pattern {pattern!r}; known: {', '.join(PATTERNS)}")
        if (pattern == "csv") != (csv_path is not None):
            raise ConfigError(f"{where}: pattern 'csv' goes with source = 'csv:<path>' and only with it")
        try:
            values["episodes"] = tuple(
                ep if isinstance(ep, Episode) else Episode(**ep) for ep in values.get("episodes", ())
            )
            spec = cls(**values, csv_path=csv_path)
        except TypeError as exc:
            raise ConfigError(f"{where}: {exc}") from exc
        if not 0 < spec.rate_hz <= MAX_RATE_HZ:
            raise ConfigError(f"{where}: rate_hz must be in (0, {MAX_RATE_HZ}]")
        if spec.time_scale <= 0 or spec.period_s <= 0 or any(e.every_s <= 0 for e in spec.episodes):
            raise ConfigError(f"{where}: time_scale, period_s and episodes[].every_s must be positive")
        return spec

    @property
    def preset(self) -> _Preset:
        return PATTERNS[self.pattern]

    def resolved_seed(self) -> int:
        return self.seed if self.seed is not None else int.from_bytes(hashlib.blake2b(self.name.encode()).digest()[:4])

    def info(self) -> SensorInfo:
        p = self.preset
        return SensorInfo(
            self.name, self.modality or p.modality, self.unit or p.unit, self.rate_hz, self.label, self.words
        )


# -- ground truth -----------------------------------------------------------------------------------------
def sample_index(spec: SensorSpec, t: float) -> int:
    """Index of the latest sample at or before time ``t``."""
    return math.floor(t * spec.rate_hz + 1e-6)


def sample_time(spec: SensorSpec, k: int) -> float:
    return k / spec.rate_hz


@functools.lru_cache(maxsize=32)
def _csv_values(path: Path) -> tuple[float, ...]:
    """The value column of a CSV file: a column named ``value``, else the last column; non-numbers skipped."""
    try:
        with path.open(newline="") as f:
            rows = list(csv.reader(f))
    except OSError as exc:
        raise ConfigError(f"cannot read sensor CSV {path}: {exc}") from exc
    if not rows:
        raise ConfigError(f"sensor CSV {path} is empty")
    col = -1
    header = [c.strip().lower() for c in rows[0]]
    if "value" in header:
        col = header.index("value")
    values = []
    for row in rows:
        try:
            v = float(row[col])
        except (ValueError, IndexError):
            continue
        if math.isfinite(v):
            values.append(v)
    if not values:
        raise ConfigError(f"sensor CSV {path} has no numeric values")
    return tuple(values)


def _value_at(spec: SensorSpec, k: int) -> float:
    p = spec.preset
    base = p.base if spec.base is None else spec.base
    amp = p.amplitude if spec.amplitude is None else spec.amplitude
    noise = p.noise if spec.noise is None else spec.noise
    seed = spec.resolved_seed()
    t = sample_time(spec, k) * spec.time_scale
    h = _hour(t, spec.utc_offset_h)
    name = spec.name
    pattern = spec.pattern
    if pattern == "csv":
        assert spec.csv_path is not None
        values = _csv_values(spec.csv_path)
        v = values[k % len(values)]
    elif pattern == "constant":
        v = base
    elif pattern == "sine":
        v = base + amp * math.sin(2 * math.pi * t / spec.period_s)
    elif pattern == "diurnal":
        v = base + amp * math.cos(2 * math.pi * (h - spec.peak_hour) / 24)
    elif pattern == "random_walk":
        v = base + amp * _drift(seed, name, t / spec.period_s)
    elif pattern in ("rush_hour", "traffic_flow", "bus_occupancy", "no2"):
        v = base + amp * _rush(h) * (1 + 0.15 * _drift(seed, name, t / 900))
    elif pattern in ("pm25", "pm10"):
        # particulates: rush-hour traffic on top of a slowly wandering regional background
        v = base * (1 + 0.4 * _drift(seed, name, t / 7200)) + amp * _rush(h) * 0.6
    elif pattern == "noise_level":
        v = base + amp * _rush(h) + 2 * _drift(seed, name, t / 60)
    elif pattern == "heart_rate":
        # circadian (lowest around 04:00) + slow wander + respiratory sinus arrhythmia
        v = base + 4 * math.cos(2 * math.pi * (h - 16) / 24) + amp * _drift(seed, name, t / 300)
        v += 1.5 * math.sin(2 * math.pi * t / 4.0)
    elif pattern == "spo2":
        v = base + amp * _drift(seed, name, t / 120)
    elif pattern == "body_temperature":
        v = base + 0.3 * math.cos(2 * math.pi * (h - 18) / 24) + amp * _drift(seed, name, t / 1800)
    elif pattern == "respiration_rate":
        v = base + amp * _drift(seed, name, t / 180)
    else:  # pragma: no cover - from_dict validates patterns
        raise ConfigError(f"unknown pattern {pattern!r}")
    for ep in spec.episodes:
        if ep.active(t):
            v += ep.delta
    if noise:
        v += noise * _gauss(seed, name, k)
    lo = p.lo if spec.lo is None else spec.lo
    hi = p.hi if spec.hi is None else spec.hi
    v = min(hi, max(lo, v))
    decimals = p.decimals if spec.decimals is None else spec.decimals
    return round(v, decimals)


def expected_value(spec: SensorSpec | Mapping[str, Any], t: float) -> float:
    """The value the sensor reports at (or last reported before) Unix time ``t``: scenario ground truth."""
    s = spec if isinstance(spec, SensorSpec) else SensorSpec.from_dict(spec)
    return _value_at(s, sample_index(s, t))


def expected_window(
    spec: SensorSpec | Mapping[str, Any], t_end: float, seconds: float, agg: str = "mean"
) -> tuple[float | None, int]:
    """``(value, n)`` of ``agg`` over the samples with ``t_end - seconds < ts <= t_end``."""
    s = spec if isinstance(spec, SensorSpec) else SensorSpec.from_dict(spec)
    k_end = sample_index(s, t_end)
    k_start = math.floor((t_end - seconds) * s.rate_hz + 1e-6) + 1
    values = [_value_at(s, k) for k in range(k_start, k_end + 1)]
    return _aggregate(values, agg), len(values)


def _aggregate(values: Sequence[float], agg: str) -> float | None:
    if agg == "count":
        return float(len(values))
    if not values:
        return None
    ops: dict[str, Callable[[Sequence[float]], float]] = {
        "mean": lambda v: sum(v) / len(v),
        "min": min,
        "max": max,
        "sum": sum,
        "last": lambda v: v[-1],
    }
    return ops[agg](values)


# -- the handler ----------------------------------------------------------------------------------------
class SensorHandler(Handler):
    """Publishes sensor readings on data topics and answers latest/window/list queries from a ring buffer."""

    kind = "sensor"
    cooperation = "data"

    def __init__(self, spec: CapabilitySpec, config: AgentConfig) -> None:
        super().__init__(spec, config)
        base_dir = config.source.parent if config.source is not None else None
        entries = self.options.get("sensors", [])
        if not isinstance(entries, list) or not entries:
            raise ConfigError(f"capability {spec.name!r}: options.sensors must be a non-empty list of tables")
        self.specs: dict[str, SensorSpec] = {}
        for entry in entries:
            s = SensorSpec.from_dict(entry, base_dir=base_dir)
            if s.name in self.specs:
                raise ConfigError(f"capability {spec.name!r}: sensor {s.name!r} is configured twice")
            self.specs[s.name] = s
        buffer_s = float(self.options.get("buffer_s", 600))
        if buffer_s <= 0:
            raise ConfigError(f"capability {spec.name!r}: buffer_s must be positive")
        #: per-sensor ring buffer of (sample index, value); ts = index / rate_hz; the oldest samples fall off
        self.buffers: dict[str, deque[tuple[int, float]]] = {
            name: deque(maxlen=max(1, min(_MAX_BUFFER, math.ceil(buffer_s * s.rate_hz) + 1)))
            for name, s in self.specs.items()
        }
        self.published = 0
        self.dropped = 0
        self._ready = {name: asyncio.Event() for name in self.specs}

    def sensors(self) -> list[SensorInfo]:
        return [s.info() for s in self.specs.values()]

    async def start(self, ctx: AgentContext) -> None:
        # Load CSV sources off the event loop now, so a bad file fails the agent start, not a request.
        for s in self.specs.values():
            if s.csv_path is not None:
                await asyncio.to_thread(_csv_values, s.csv_path)

    async def run(self, ctx: AgentContext) -> None:
        async with asyncio.TaskGroup() as tg:
            for s in self.specs.values():
                tg.create_task(self._sample_loop(ctx, s), name=f"agent[{ctx.agent_id}].sensor.{s.name}")

    async def _sample_loop(self, ctx: AgentContext, s: SensorSpec) -> None:
        topic = ctx.topics.data(ctx.agent_id, s.name)
        unit = s.info().unit
        buf = self.buffers[s.name]
        k = sample_index(s, time.time())
        catch_up = max(1, math.ceil(5 * s.rate_hz))  # after a long stall, skip ahead instead of flooding
        while True:
            now_k = sample_index(s, time.time())
            if now_k - k > catch_up:
                k = now_k
            while k <= now_k:
                value = _value_at(s, k)
                buf.append((k, value))
                self._ready[s.name].set()
                await self._publish(ctx, topic, Reading(ctx.agent_id, s.name, value, unit, sample_time(s, k)))
                k += 1
            await asyncio.sleep(max(0.0, sample_time(s, k) - time.time()))

    async def _publish(self, ctx: AgentContext, topic: str, reading: Reading) -> None:
        payload = encode({"v": WIRE_VERSION, "type": "reading", **dataclasses.asdict(reading)})
        try:
            # QoS 0, not retained, and no waiting for a connection: sensor data may be dropped, never queued
            await ctx.conn.publish(topic, payload, qos=0, retain=False, wait=0)
            self.published += 1
            if ctx.config.home_assistant:
                from edgecoop.agents.hass import publish_ha_reading

                await publish_ha_reading(ctx.conn, ctx.topics, reading)
        except EdgecoopError as exc:
            self.dropped += 1
            log.debug("%s: reading on %s dropped: %s", ctx.agent_id, topic, exc)

    # -- requests --------------------------------------------------------------------------------------
    def _spec(self, request_input: Mapping[str, Any]) -> SensorSpec:
        name = request_input.get("sensor")
        if name is None and len(self.specs) == 1:
            return next(iter(self.specs.values()))
        if not isinstance(name, str) or name not in self.specs:
            raise CapabilityError(f"unknown sensor {name!r}; this agent has {', '.join(self.specs)}")
        return self.specs[name]

    async def handle(self, request_input: Mapping[str, Any], call: CallContext) -> Mapping[str, Any]:
        op = request_input.get("op", "latest")
        if op == "list":
            return {
                "sensors": [
                    {**dataclasses.asdict(s.info()), "n": len(self.buffers[s.name]), "pattern": s.pattern}
                    for s in self.specs.values()
                ]
            }
        if op not in ("latest", "window"):
            raise CapabilityError(f"unknown sensor op {op!r}; use latest, window or list")
        s = self._spec(request_input)
        info = s.info()
        buf = self.buffers[s.name]
        if not buf:  # the sampler has not run yet (request right after start): wait for its first sample
            async with asyncio.timeout(max(2.0, 2 / s.rate_hz)):
                await self._ready[s.name].wait()
        out: dict[str, Any] = {"sensor": s.name, "unit": info.unit, "modality": info.modality}
        if op == "latest":
            k, value = buf[-1]
            return {**out, "value": value, "ts": sample_time(s, k), "n": 1, "agg": "last"}
        seconds = request_input.get("seconds", 60)
        agg = request_input.get("agg", "mean")
        if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not 0 < seconds <= 86400 * 7:
            raise ValueError("seconds must be a number in (0, 604800]")
        if agg not in AGGREGATES:
            raise ValueError(f"agg must be one of {', '.join(AGGREGATES)}, not {agg!r}")
        t_end = sample_time(s, buf[-1][0])
        k_start = math.floor((t_end - seconds) * s.rate_hz + 1e-6) + 1  # as in expected_window
        window = [(k, v) for k, v in buf if k >= k_start]
        return {
            **out,
            "value": _aggregate([v for _, v in window], agg),
            "ts": t_end,
            "n": len(window),
            "agg": agg,
            "seconds": seconds,
            "from_ts": sample_time(s, window[0][0]) if window else None,
        }
