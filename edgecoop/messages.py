"""Typed, frozen message objects of the wire schema (version :data:`edgecoop.wire.WIRE_VERSION`).

Each class has ``to_dict()`` (what goes through :func:`edgecoop.wire.encode`) and ``from_dict()`` which
validates a decoded, untrusted map and raises :class:`~edgecoop.errors.SchemaError` with the field name.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

from edgecoop.errors import SchemaError, TopicError
from edgecoop.topics import validate_id
from edgecoop.wire import WIRE_VERSION

__all__ = [
    "PRIVACY_CLASSES",
    "Ack",
    "CapabilityCard",
    "CapabilityInfo",
    "Hardware",
    "Load",
    "Location",
    "ModelInfo",
    "Reading",
    "Request",
    "Response",
    "SensorInfo",
    "Status",
]

#: public: may go anywhere incl. cloud; site: stays within the site; private: never leaves the edge.
PRIVACY_CLASSES = ("public", "site", "private")
_MAX_TEXT = 4096
_MAX_LIST = 256
#: integers are signed 64-bit (what SQLite stores and every float() takes)
_INT_MIN, _INT_MAX = -(2**63), 2**63 - 1

T = TypeVar("T")


def _req(d: Mapping[str, Any], key: str, typ: type[T] | tuple[type, ...], where: str) -> T:
    if key not in d:
        raise SchemaError(f"{where}: missing field {key!r}")
    return _typed(d[key], typ, f"{where}.{key}")


def _opt(d: Mapping[str, Any], key: str, typ: type[T] | tuple[type, ...], default: T, where: str) -> T:
    value = d.get(key)
    if value is None:
        return default
    return _typed(value, typ, f"{where}.{key}")


def _typed(value: Any, typ: type[T] | tuple[type, ...], where: str) -> T:
    # bool is an int in Python; never accept it where a number is wanted
    if isinstance(value, bool) and typ in (int, float, (int, float)):
        raise SchemaError(f"{where}: expected a number, got a boolean")
    if isinstance(value, int) and not _INT_MIN <= value <= _INT_MAX and typ in (int, float, (int, float)):
        # JSON integers are unbounded and msgpack's go to 2**64-1: neither float() nor SQLite take them all
        raise SchemaError(f"{where}: number out of range")
    if typ is float and isinstance(value, int):
        value = float(value)
    if not isinstance(value, typ):
        name = typ.__name__ if isinstance(typ, type) else "/".join(t.__name__ for t in typ)
        raise SchemaError(f"{where}: expected {name}, got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise SchemaError(f"{where}: non-finite number")
    if isinstance(value, str) and len(value) > _MAX_TEXT:
        raise SchemaError(f"{where}: text longer than {_MAX_TEXT} characters")
    if isinstance(value, list) and len(value) > _MAX_LIST:
        raise SchemaError(f"{where}: more than {_MAX_LIST} entries")
    return value  # type: ignore[return-value]


def _ident(value: Any, where: str) -> str:
    try:
        return validate_id(value, where)
    except TopicError as exc:
        raise SchemaError(f"{where}: {exc}") from exc


def _str_list(d: Mapping[str, Any], key: str, where: str) -> tuple[str, ...]:
    items = _opt(d, key, list, [], where)
    return tuple(_typed(i, str, f"{where}.{key}[]") for i in items)


def _rid(value: str) -> str:
    if len(value) > 200:
        raise SchemaError("request.rid: longer than 200 characters")
    return value


def _map(value: Any, where: str) -> Mapping[str, Any]:
    return _typed(value, dict, where)


@dataclass(frozen=True, slots=True)
class Location:
    name: str = ""
    lat: float | None = None
    lon: float | None = None
    #: other names people use for the place ("the kitchen"): vocabulary for the Classifier Engine
    aliases: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Location:
        w = "location"
        return cls(
            _opt(d, "name", str, "", w),
            _opt(d, "lat", float, None, w),
            _opt(d, "lon", float, None, w),
            _str_list(d, "aliases", w),
        )


@dataclass(frozen=True, slots=True)
class Hardware:
    cpu: str = ""
    cores: int = 1
    ram_mb: int = 0
    accelerator: str = "none"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Hardware:
        w = "hardware"
        return cls(
            _opt(d, "cpu", str, "", w),
            _opt(d, "cores", int, 1, w),
            _opt(d, "ram_mb", int, 0, w),
            _opt(d, "accelerator", str, "none", w),
        )


@dataclass(frozen=True, slots=True)
class ModelInfo:
    name: str
    params: str = ""
    quant: str = ""
    ctx: int = 0
    tokens_per_s: float = 0.0
    #: share of ``edgecoop models eval``'s small evaluation the model passed (0 = not measured)
    quality: float = 0.0

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelInfo:
        w = "models[]"
        return cls(
            _req(d, "name", str, w),
            _opt(d, "params", str, "", w),
            _opt(d, "quant", str, "", w),
            _opt(d, "ctx", int, 0, w),
            _opt(d, "tokens_per_s", float, 0.0, w),
            _opt(d, "quality", float, 0.0, w),
        )


@dataclass(frozen=True, slots=True)
class SensorInfo:
    name: str
    modality: str
    unit: str = ""
    rate_hz: float = 0.0
    #: what people call it and the words they use for it (vocabulary, declared by the agent)
    label: str = ""
    words: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SensorInfo:
        w = "sensors[]"
        return cls(
            _ident(_req(d, "name", str, w), f"{w}.name"),
            _req(d, "modality", str, w),
            _opt(d, "unit", str, "", w),
            _opt(d, "rate_hz", float, 0.0, w),
            _opt(d, "label", str, "", w),
            _str_list(d, "words", w),
        )


@dataclass(frozen=True, slots=True)
class CapabilityInfo:
    """One thing an agent can be asked to do: ``kind`` is the handler (slm, vision, sensor, ...)."""

    name: str
    kind: str
    description: str = ""
    tags: tuple[str, ...] = ()
    cooperation: str = "computation"  # data | computation | knowledge
    #: the worker pool this capability also serves (``<prefix>/pool/<pool>``), "" for none
    pool: str = ""
    #: requests the agent serves at once on this capability (its config's ``max_concurrency``); 0 = not declared.
    #: The orchestrator's bulkheads size themselves from it (edgecoop.orchestrator.admission).
    max_concurrency: int = 0
    #: what a knowledge capability's documents are about (their headings' and recurring words), so a question is
    #: routed to the agent whose documents hold its words; derived from the documents, not written by hand
    topics: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CapabilityInfo:
        w = "capabilities[]"
        coop = _opt(d, "cooperation", str, "computation", w)
        if coop not in ("data", "computation", "knowledge"):
            raise SchemaError(f"{w}.cooperation: unknown cooperation type {coop!r}")
        pool = _opt(d, "pool", str, "", w)
        return cls(
            _ident(_req(d, "name", str, w), f"{w}.name"),
            _req(d, "kind", str, w),
            _opt(d, "description", str, "", w),
            _str_list(d, "tags", w),
            coop,
            _ident(pool, f"{w}.pool") if pool else "",
            max(0, _opt(d, "max_concurrency", int, 0, w)),
            _str_list(d, "topics", w),
        )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "tags": list(self.tags), "topics": list(self.topics)}


@dataclass(frozen=True, slots=True)
class Load:
    queue: int = 0
    busy: bool = False
    inflight: int = 0

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Load:
        w = "load"
        return cls(_opt(d, "queue", int, 0, w), _opt(d, "busy", bool, False, w), _opt(d, "inflight", int, 0, w))


@dataclass(frozen=True, slots=True)
class CapabilityCard:
    """The retained, device-level description of one agent."""

    agent_id: str
    epoch: int
    site: str = "default"
    description: str = ""
    location: Location = field(default_factory=Location)
    hardware: Hardware = field(default_factory=Hardware)
    models: tuple[ModelInfo, ...] = ()
    sensors: tuple[SensorInfo, ...] = ()
    domains: tuple[str, ...] = ()
    capabilities: tuple[CapabilityInfo, ...] = ()
    cost_per_call: float = 0.0
    latency_ms: float = 0.0
    privacy: str = "public"
    load: Load = field(default_factory=Load)
    ts: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "v": WIRE_VERSION,
            "type": "card",
            "agent_id": self.agent_id,
            "epoch": self.epoch,
            "site": self.site,
            "description": self.description,
            "location": {**asdict(self.location), "aliases": list(self.location.aliases)},
            "hardware": asdict(self.hardware),
            "models": [asdict(m) for m in self.models],
            "sensors": [{**asdict(s), "words": list(s.words)} for s in self.sensors],
            "domains": list(self.domains),
            "capabilities": [c.to_dict() for c in self.capabilities],
            "cost": {"per_call": self.cost_per_call, "latency_ms": self.latency_ms},
            "privacy": self.privacy,
            "load": asdict(self.load),
            "ts": self.ts,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CapabilityCard:
        w = "card"
        if d.get("type", "card") != "card":
            raise SchemaError(f"{w}: type is {d.get('type')!r}, expected 'card'")
        privacy = _opt(d, "privacy", str, "public", w)
        if privacy not in PRIVACY_CLASSES:
            raise SchemaError(f"{w}.privacy: {privacy!r} is not one of {PRIVACY_CLASSES}")
        cost = _map(d.get("cost") or {}, f"{w}.cost")
        return cls(
            agent_id=_ident(_req(d, "agent_id", str, w), f"{w}.agent_id"),
            epoch=_req(d, "epoch", int, w),
            site=_ident(_opt(d, "site", str, "default", w), f"{w}.site"),
            description=_opt(d, "description", str, "", w),
            location=Location.from_dict(_map(d.get("location") or {}, f"{w}.location")),
            hardware=Hardware.from_dict(_map(d.get("hardware") or {}, f"{w}.hardware")),
            models=tuple(ModelInfo.from_dict(_map(m, f"{w}.models[]")) for m in _opt(d, "models", list, [], w)),
            sensors=tuple(SensorInfo.from_dict(_map(s, f"{w}.sensors[]")) for s in _opt(d, "sensors", list, [], w)),
            domains=_str_list(d, "domains", w),
            capabilities=tuple(
                CapabilityInfo.from_dict(_map(c, f"{w}.capabilities[]")) for c in _opt(d, "capabilities", list, [], w)
            ),
            cost_per_call=_opt(cost, "per_call", float, 0.0, f"{w}.cost"),
            latency_ms=_opt(cost, "latency_ms", float, 0.0, f"{w}.cost"),
            privacy=privacy,
            load=Load.from_dict(_map(d.get("load") or {}, f"{w}.load")),
            ts=_opt(d, "ts", float, 0.0, w),
        )

    def text(self) -> str:
        """All human-readable text of the card, for semantic ranking."""
        parts = [self.agent_id, self.description, self.location.name, " ".join(self.domains)]
        parts += [f"{c.name} {c.kind} {c.cooperation} {c.description} {' '.join(c.tags)}" for c in self.capabilities]
        parts += [f"{s.name} {s.modality} {s.unit}" for s in self.sensors]
        parts += [m.name for m in self.models]
        return " ".join(p for p in parts if p)


@dataclass(frozen=True, slots=True)
class Status:
    agent_id: str
    online: bool
    epoch: int
    ts: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "v": WIRE_VERSION,
            "type": "status",
            "agent_id": self.agent_id,
            "state": "online" if self.online else "offline",
            "epoch": self.epoch,
            "ts": self.ts,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Status:
        w = "status"
        state = _req(d, "state", str, w)
        if state not in ("online", "offline"):
            raise SchemaError(f"{w}.state: {state!r} is not online/offline")
        return cls(
            _ident(_req(d, "agent_id", str, w), f"{w}.agent_id"),
            state == "online",
            _req(d, "epoch", int, w),
            _opt(d, "ts", float, 0.0, w),
        )


@dataclass(frozen=True, slots=True)
class Request:
    """A request to one capability; routing data (reply topic, correlation) travels in MQTT 5 properties."""

    capability: str
    input: Mapping[str, Any] = field(default_factory=dict)
    task_id: str = ""
    deadline_ms: int = 0
    stream: bool = False
    #: request id of a durable request: stable across re-sends, so the agent executes it once and keeps the
    #: result in its outbox until the requester acknowledges it
    rid: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = {
            "v": WIRE_VERSION,
            "type": "request",
            "capability": self.capability,
            "input": dict(self.input),
            "task_id": self.task_id,
            "deadline_ms": self.deadline_ms,
            "stream": self.stream,
        }
        if self.rid:
            d["rid"] = self.rid
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, capability: str | None = None) -> Request:
        w = "request"
        cap = _opt(d, "capability", str, capability or "", w)
        if not cap:
            raise SchemaError(f"{w}: missing field 'capability'")
        return cls(
            _ident(cap, f"{w}.capability"),
            _map(d.get("input") or {}, f"{w}.input"),
            _opt(d, "task_id", str, "", w),
            _opt(d, "deadline_ms", int, 0, w),
            _opt(d, "stream", bool, False, w),
            _rid(_opt(d, "rid", str, "", w)),
        )


@dataclass(frozen=True, slots=True)
class Response:
    """A reply: ``ok`` with ``result``, or an error ``code`` and ``message``. ``partial`` marks stream chunks."""

    ok: bool
    result: Mapping[str, Any] = field(default_factory=dict)
    code: str = ""
    message: str = ""
    agent_id: str = ""
    partial: bool = False
    seq: int = 0
    elapsed_ms: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "v": WIRE_VERSION,
            "type": "response",
            "ok": self.ok,
            "agent_id": self.agent_id,
            "partial": self.partial,
            "seq": self.seq,
            "elapsed_ms": self.elapsed_ms,
        }
        if self.ok:
            d["result"] = dict(self.result)
        else:
            d["error"] = {"code": self.code, "message": self.message}
        return d

    @classmethod
    def error(cls, code: str, message: str, agent_id: str = "") -> Response:
        return cls(ok=False, code=code, message=message, agent_id=agent_id)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Response:
        w = "response"
        ok = _req(d, "ok", bool, w)
        err = _map(d.get("error") or {}, f"{w}.error")
        return cls(
            ok=ok,
            result=_map(d.get("result") or {}, f"{w}.result"),
            code=_opt(err, "code", str, "" if ok else "error", f"{w}.error"),
            message=_opt(err, "message", str, "", f"{w}.error"),
            agent_id=_opt(d, "agent_id", str, "", w),
            partial=_opt(d, "partial", bool, False, w),
            seq=_opt(d, "seq", int, 0, w),
            elapsed_ms=_opt(d, "elapsed_ms", float, 0.0, w),
        )


@dataclass(frozen=True, slots=True)
class Reading:
    """One sensor reading on a data topic."""

    agent_id: str
    sensor: str
    value: float
    unit: str = ""
    ts: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return {
            "v": WIRE_VERSION,
            "type": "reading",
            "agent_id": self.agent_id,
            "sensor": self.sensor,
            "value": self.value,
            "unit": self.unit,
            "ts": self.ts,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Reading:
        w = "reading"
        return cls(
            _ident(_req(d, "agent_id", str, w), f"{w}.agent_id"),
            _ident(_req(d, "sensor", str, w), f"{w}.sensor"),
            _req(d, "value", float, w),
            _opt(d, "unit", str, "", w),
            _opt(d, "ts", float, 0.0, w),
        )


#: an ack names at most this many request ids (a requester acknowledges one task's results per message)
MAX_ACK_RIDS = 1000


@dataclass(frozen=True, slots=True)
class Ack:
    """A requester's acknowledgement of durable results (``<prefix>/ack/<agent>``): the agent may drop them from
    its outbox."""

    rids: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"v": WIRE_VERSION, "type": "ack", "rids": list(self.rids)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Ack:
        rids = d.get("rids")
        if not isinstance(rids, list) or not all(isinstance(r, str) for r in rids):
            raise SchemaError("ack: 'rids' must be a list of strings")
        if len(rids) > MAX_ACK_RIDS:
            raise SchemaError(f"ack: more than {MAX_ACK_RIDS} rids")
        return cls(tuple(_rid(r) for r in rids))
